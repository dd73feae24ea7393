"""The conditional VAE: p(x | z, y) and q(z | x, y) with the label y as an extra input.

Generative model, for each datapoint n in ``pyro.plate("data", N)``::

    y_n ~ Categorical(π),   z_n ~ N(0, I_d),   x_n | z_n, y_n ~ Bernoulli(sigmoid(f(z_n, y_n)))

(or any likelihood and guide of :class:`~pyro_vae.models.vae.VAE`: ``likelihood="gaussian"``,
``guide="full"``) with π the class frequencies (a fixed buffer, set from the training labels,
each class counted once more so none has probability 0). The label site ``"y"``
is observed when labels are given, so a per-datapoint log-weight is an estimate of
log p(x, y) = log p(x | y) + log π_y; with ``y=None`` the model draws y from π (generation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn import functional as F

from pyro_vae.models.vae import DATA_PLATE, LATENT_SITE, OBS_SITE, VAE, register_module
from pyro_vae.util.errors import ConfigError, DataError

LABEL_SITE = "y"


class _Conditioned(nn.Module):
    """Runs ``net`` on its first input concatenated with the one-hot label."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.num_classes = num_classes

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor):
        one_hot = F.one_hot(labels, self.num_classes).to(inputs.dtype)
        one_hot = one_hot.expand(*inputs.shape[:-1], self.num_classes)
        return self.net(torch.cat([inputs, one_hot], dim=-1))


class CVAE(VAE):
    """Conditional VAE: :class:`~pyro_vae.models.vae.VAE`'s likelihoods and guides (``**options``:
    ``likelihood``, ``obs_scale``, ``guide``, ``activation``) with the label as an extra input.

    ``model(x, y)`` / ``guide(x, y)`` are twins over the sites ``"z"`` (latent), ``"y"`` (label,
    observed) and ``"x"`` (image, observed), all inside ``pyro.plate("data", N)``.
    """

    conditional = True

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (128,),
        scale_fn: str = "softplus",
        name: str = "cvae",
        class_probs: torch.Tensor | None = None,
        **options,
    ):
        if num_classes < 2:
            raise ConfigError(f"a CVAE needs at least 2 classes, got {num_classes}")
        super().__init__(
            input_dim,
            latent_dim,
            hidden,
            scale_fn,
            name=name,
            encoder_input_dim=input_dim + num_classes,
            decoder_input_dim=latent_dim + num_classes,
            **options,
        )
        self.config = replace(self.config, family="cvae")
        self.num_classes = num_classes
        self.encoder = _Conditioned(self.encoder, num_classes)
        self.decoder = _Conditioned(self.decoder, num_classes)
        probs = (
            torch.full((num_classes,), 1.0 / num_classes)
            if class_probs is None
            else torch.as_tensor(class_probs, dtype=torch.float32)
        )
        self.register_buffer("class_probs", probs / probs.sum())

    def set_class_probs(self, labels: torch.Tensor) -> None:
        """Set π to the label frequencies (every class gets at least one count)."""
        counts = torch.bincount(labels.cpu(), minlength=self.num_classes).float() + 1.0
        self.class_probs.copy_(counts / counts.sum())

    def _decoder_net(self):
        return self.decoder.net

    def check_labels(self, y: torch.Tensor, n: int) -> None:
        if y.dim() != 1 or y.shape[0] != n:
            raise DataError(f"expected {n} labels, got a tensor of shape {list(y.shape)}")
        if y.is_floating_point() or ((y < 0) | (y >= self.num_classes)).any():
            raise DataError(f"labels must be integers in 0..{self.num_classes - 1}")

    def model(
        self,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        num_data: int | None = None,
    ) -> torch.Tensor:
        """π(y) p(z) p(x | z, y); ``y=None`` draws the labels, ``x=None`` draws the images."""
        self._register_decoder()
        if x is not None:
            self.check_images(x)
            n = x.shape[0]
        elif y is not None:
            n = y.shape[0]
        else:
            n = 1 if num_data is None else num_data
        if y is not None and is_validation_enabled():
            self.check_labels(y, n)
        probs = self.class_probs
        with pyro.plate(DATA_PLATE, n):
            y = pyro.sample(LABEL_SITE, dist.Categorical(probs), obs=y)
            prior = dist.Normal(probs.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample(LATENT_SITE, prior)
            return pyro.sample(OBS_SITE, self.observation_dist(self.decoder(z, y)), obs=x)

    def guide(
        self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None
    ) -> torch.Tensor:
        """q(z | x, y). The labels are observed, so the guide needs them."""
        register_module(f"{self.name}.encoder", self.encoder)
        if y is None:
            raise DataError("the CVAE's guide q(z | x, y) needs the labels y")
        self.check_images(x)
        if is_validation_enabled():
            self.check_labels(y, x.shape[0])
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample(LATENT_SITE, self.latent_dist(*self.encoder(x, y)))

    @torch.no_grad()
    def sample(
        self,
        num_samples: int,
        mean: bool = True,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """New images for ``labels`` (default: labels drawn from π)."""
        device = self.class_probs.device
        if labels is None:
            labels = torch.multinomial(
                self.class_probs, num_samples, replacement=True, generator=generator
            )
        labels = torch.as_tensor(labels, device=device)
        self.check_labels(labels, num_samples)
        z = torch.randn(num_samples, self.latent_dim, device=device, generator=generator)
        means = self.decode(z, labels)
        return means if mean else self._draw(means, generator)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's mean and marginal standard deviations given images and labels."""
        loc, scale = self.encoder(x, y)
        if self.guide_family == "full":
            scale = scale.pow(2).sum(-1).sqrt()
        return loc, scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Decoder mean for latent codes ``z`` under labels ``y``."""
        return self.observation_mean(self.decoder(z, y))

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, y: torch.Tensor, sample_latent: bool = False
    ) -> torch.Tensor:
        params = self.encoder(x, y)
        z = self.latent_dist(*params).sample() if sample_latent else params[0]
        return self.decode(z, y)

    @torch.no_grad()
    def transfer(
        self, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Style transfer: encode ``x`` with its label, decode the same z (the guide mean) with
        every target label. Returns ``[N, len(targets), D]`` decoder means."""
        if targets is None:
            targets = torch.arange(self.num_classes, device=x.device)
        self.check_labels(y, x.shape[0])
        self.check_labels(targets, targets.shape[0])
        loc = self.encoder(x, y)[0]
        n, t = loc.shape[0], targets.shape[0]
        z = loc.unsqueeze(1).expand(n, t, self.latent_dim)
        return self.decode(z, targets.expand(n, t))
