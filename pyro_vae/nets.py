"""Plain ``torch.nn`` networks: no Pyro calls, no training logic."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def mlp(sizes: Sequence[int], activation: type[nn.Module] = nn.Softplus) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, ``activation`` after every layer but the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class GaussianEncoder(nn.Module):
    """x ↦ (loc, scale) of a diagonal Gaussian over the latent code.

    The scale is ``softplus(raw)`` or ``exp(raw)``; a small floor keeps it strictly positive.
    """

    min_scale = 1e-5

    def __init__(self, input_dim: int, hidden: Sequence[int], latent_dim: int,
                 scale_fn: str = "softplus", activation: type[nn.Module] = nn.Softplus):
        super().__init__()
        if scale_fn not in ("softplus", "exp"):
            raise ValueError(f"scale_fn must be 'softplus' or 'exp', got {scale_fn!r}")
        self.scale_fn = scale_fn
        self.latent_dim = latent_dim
        self.body = mlp([input_dim, *hidden], activation)
        self.body.append(activation())
        self.head = nn.Linear(hidden[-1] if hidden else input_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.head(self.body(x)).chunk(2, dim=-1)
        scale = F.softplus(raw_scale) if self.scale_fn == "softplus" else raw_scale.exp()
        return loc, scale + self.min_scale


class LogitDecoder(nn.Module):
    """z ↦ logits of independent Bernoulli pixels (an MLP mirroring the encoder)."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], output_dim: int,
                 activation: type[nn.Module] = nn.Softplus):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden), output_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def set_output_bias(self, mean_image: torch.Tensor, eps: float = 1e-3) -> None:
        """Start the decoder at the data's marginal: output bias = logit(mean pixel intensity)."""
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.logit(mean_image.clamp(eps, 1 - eps)))
