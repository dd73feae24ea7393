"""A VAE with two stochastic layers (the second architecture of Burda et al., 2016, "Importance
Weighted Autoencoders").

Generative model, for each datapoint n in ``pyro.plate("data", N)``::

    z2_n ~ N(0, I),   z1_n | z2_n ~ N(μ(z2_n), diag σ(z2_n)²),   x_n | z1_n ~ Bernoulli(f(z1_n))

Guide, in the opposite direction::

    z1_n | x_n ~ N(μ(x_n), diag σ(x_n)²),   z2_n | z1_n ~ N(μ(z1_n), diag σ(z1_n)²)

The paper's MNIST networks are latents 100 (z1) and 50 (z2), deterministic layers 200-200 between
x and z1 and 100-100 between z1 and z2, tanh activations:
``VAE2(784, 100, (200, 200), latent2_dim=50, hidden2=(100, 100), activation="tanh")``.
The guide is hierarchical (z2's distribution depends on the sampled z1), which every estimator of
:mod:`pyro_vae.infer` and the evaluator handle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pyro
import pyro.distributions as dist
import torch

from pyro_vae.models.nets import GaussianEncoder
from pyro_vae.models.vae import DATA_PLATE, OBS_SITE, VAE, register_module

TOP_SITE = "z2"
BOTTOM_SITE = "z1"


class VAE2(VAE):
    """Two stochastic layers z2 → z1 → x with diagonal Gaussian conditionals (see the module
    docstring). ``latent_dim``/``hidden`` size the x ↔ z1 networks, ``latent2_dim``/``hidden2``
    the z1 ↔ z2 ones."""

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (128,),
        scale_fn: str = "softplus",
        name: str = "vae2",
        *,
        latent2_dim: int = 4,
        hidden2: Sequence[int] = (64,),
        likelihood: str = "bernoulli",
        obs_scale: float | None = None,
        activation: str = "softplus",
    ):
        super().__init__(
            input_dim,
            latent_dim,
            hidden,
            scale_fn,
            name,
            likelihood=likelihood,
            obs_scale=obs_scale,
            activation=activation,
        )
        self.latent2_dim = latent2_dim
        hidden2 = tuple(hidden2)
        self.config = replace(self.config, family="vae2", latent2_dim=latent2_dim, hidden2=hidden2)
        self.prior_net = GaussianEncoder(
            latent2_dim, tuple(reversed(hidden2)), latent_dim, scale_fn, activation
        )
        self.top_encoder = GaussianEncoder(latent_dim, hidden2, latent2_dim, scale_fn, activation)

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """p(z2) p(z1 | z2) p(x | z1); ``x=None`` samples ``num_data`` images (default 1)."""
        self._register_decoder()
        register_module(f"{self.name}.prior_net", self.prior_net)
        n, zeros = self._plate_size_and_zero(x, num_data)
        with pyro.plate(DATA_PLATE, n):
            top = dist.Normal(zeros, 1.0).expand([self.latent2_dim]).to_event(1)
            z2 = pyro.sample(TOP_SITE, top)
            z1 = pyro.sample(BOTTOM_SITE, dist.Normal(*self.prior_net(z2)).to_event(1))
            return pyro.sample(OBS_SITE, self.observation_dist(self.decoder(z1)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z1 | x) q(z2 | z1)."""
        register_module(f"{self.name}.encoder", self.encoder)
        register_module(f"{self.name}.top_encoder", self.top_encoder)
        self.check_images(x)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z1 = pyro.sample(BOTTOM_SITE, dist.Normal(*self.encoder(x)).to_event(1))
            return pyro.sample(TOP_SITE, dist.Normal(*self.top_encoder(z1)).to_event(1))

    @torch.no_grad()
    def sample(
        self, num_samples: int, mean: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z2 ~ N(0, I), z1 ~ p(z1 | z2), then the decoder's mean (or a draw of x)."""
        device = self._device()
        z2 = torch.randn(num_samples, self.latent2_dim, device=device, generator=generator)
        loc, scale = self.prior_net(z2)
        z1 = loc + scale * torch.randn(loc.shape, device=device, generator=generator)
        means = self.observation_mean(self.decoder(z1))
        return means if mean else self._draw(means, generator)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top layer's guide mean and scale, at the bottom layer's guide mean."""
        return self.top_encoder(self.encoder(x)[0])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_latent: bool = False) -> torch.Tensor:
        loc, scale = self.encoder(x)
        z1 = loc + scale * torch.randn_like(loc) if sample_latent else loc
        return self.observation_mean(self.decoder(z1))
