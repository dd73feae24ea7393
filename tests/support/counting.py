"""A small built-in VAE whose networks count their calls: what a computation runs, in network
calls rather than seconds."""

from __future__ import annotations

import collections

import torch

from pyro_vae import VAE


def counted_vae() -> tuple[VAE, collections.Counter, torch.Tensor]:
    """A 16-pixel VAE (3 latents), a counter of its ``encoder``/``decoder`` calls, and 12
    binary images."""
    torch.manual_seed(0)
    vae = VAE(16, latent_dim=3, hidden=(8,))
    calls: collections.Counter = collections.Counter()
    for name in ("encoder", "decoder"):
        getattr(vae, name).register_forward_hook(
            lambda module, args, out, name=name: calls.update([name])
        )
    x = (torch.rand(12, 16, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    return vae, calls, x
