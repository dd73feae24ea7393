r"""A VAE whose prior is the VampPrior (Tomczak and Welling 2018, "VAE with a VampPrior"): the
mixture of the guide at M learned pseudo-inputs u_1..u_M,

.. math::

    p_\lambda(z) = \frac1M \sum_{m=1}^M q_\phi(z \mid u_m),

so the prior is fitted to the aggregate posterior the guide produces instead of being fixed at
N(0, I). It is written as a user would write a pair: a :class:`~pyro_vae.models.vae.VAE` whose
``model`` samples ``z`` from :class:`PseudoInputMixture`; no estimator knows about it. The KL
to this prior has no closed form, so ``meanfield`` uses the Monte Carlo term log q − log p for
it (:mod:`pyro_vae.infer.meanfield_elbo`), and the fused training path, which assumes N(0, I),
is not taken.

Pseudo-inputs are stored unconstrained and mapped into the pixels' range: clamped to [0, 1]
(``hardtanh``, as in the paper) for Bernoulli pixels, left as they are for Gaussian ones. They
start at N(0.05, 0.01²) per pixel, the paper's initialization for MNIST.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import pyro
import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn
from torch.nn import functional as F

from pyro_vae.models.vae import DATA_PLATE, LATENT_SITE, OBS_SITE, VAE, register_module
from pyro_vae.util.errors import ConfigError, check_count

PSEUDO_INIT = (0.05, 0.01)


class PseudoInputMixture(TorchDistribution):
    r"""The equally weighted mixture of M diagonal Gaussians N(loc_m, diag scale_m²) over
    vectors, ``loc`` and ``scale`` ``[M, L]``, with any batch shape (every batch element the
    same mixture).

    ``log_prob`` expands the squares, Σ_d (z_d − μ_md)²/σ²_md = z²·σ⁻² − 2 z·(μσ⁻²) + μ²·σ⁻²,
    as two matrix products in float64: memory ``[rows, M]`` instead of the ``[rows, M, L]``
    of a broadcast, and no cancellation error at float32 precision. Sampling picks a component
    uniformly, then draws from it (no reparameterization: the prior is never a proposal)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        batch_shape: Sequence[int] = (),
        validate_args: bool | None = None,
    ):
        if loc.dim() != 2 or loc.shape != scale.shape:
            raise ConfigError(
                f"a pseudo-input mixture needs loc and scale of one shape [M, L], "
                f"got {list(loc.shape)} and {list(scale.shape)}"
            )
        self.loc, self.scale = loc, scale
        super().__init__(torch.Size(batch_shape), loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape: Sequence[int], _instance=None) -> PseudoInputMixture:
        return PseudoInputMixture(
            self.loc, self.scale, batch_shape, validate_args=self._validate_args
        )

    @property
    def num_components(self) -> int:
        return self.loc.shape[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = value.double()
        loc, scale = self.loc.double(), self.scale.double()
        precision = scale.pow(-2)
        squares = (
            (z * z) @ precision.T - 2 * (z @ (loc * precision).T) + (loc * loc * precision).sum(-1)
        )
        log_norm = -scale.log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        components = log_norm - 0.5 * squares.clamp_min(0)
        log_p = torch.logsumexp(components, -1) - math.log(self.num_components)
        return log_p.to(value.dtype).expand(
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape)
        )

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            index = torch.randint(self.num_components, shape, device=self.loc.device)
            noise = torch.randn(
                *shape, self.loc.shape[-1], device=self.loc.device, dtype=self.loc.dtype
            )
            return self.loc[index] + self.scale[index] * noise


class PseudoInputs(nn.Module):
    """M learned inputs, mapped into the pixels' range (``[0, 1]`` for Bernoulli pixels)."""

    def __init__(self, count: int, input_dim: int, clamp: bool):
        super().__init__()
        self.raw = nn.Parameter(torch.empty(count, input_dim).normal_(*PSEUDO_INIT))
        self.clamp = clamp

    def forward(self) -> torch.Tensor:
        return F.hardtanh(self.raw, 0.0, 1.0) if self.clamp else self.raw


class VampPriorVAE(VAE):
    """The VAE with p(z) = (1/M) Σ_m q(z | u_m) over ``pseudo_inputs`` = M learned inputs (see
    the module docstring). The guide is the VAE's diagonal Gaussian; the prior reuses its
    encoder. ``VampPriorVAE(784, 50, (200, 200), pseudo_inputs=500, activation="tanh")`` is
    the one-layer MNIST model with the paper's 500 pseudo-inputs."""

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (128,),
        scale_fn: str = "softplus",
        name: str = "vampprior",
        *,
        pseudo_inputs: int = 500,
        likelihood: str = "bernoulli",
        obs_scale: float | None = None,
        activation: str = "softplus",
    ):
        check_count("pseudo_inputs", pseudo_inputs)
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
        self.config = replace(self.config, family="vampprior", pseudo_inputs=pseudo_inputs)
        self.pseudo_inputs = PseudoInputs(pseudo_inputs, input_dim, clamp=likelihood == "bernoulli")
        #: float64 values per datapoint-particle that the prior's density keeps beside the
        #: networks' activations (for the memory estimate, :mod:`pyro_vae.util.memory`)
        self.activations_per_row = 8 * pseudo_inputs

    def prior(self) -> PseudoInputMixture:
        """p(z): the guide's Gaussians at the pseudo-inputs, equally weighted."""
        return PseudoInputMixture(*self.encoder(self.pseudo_inputs()))

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """p(z) p(x|z) with the VampPrior; ``x=None`` samples ``num_data`` images (default 1)."""
        self._register_decoder()
        register_module(f"{self.name}.encoder", self.encoder)
        register_module(f"{self.name}.pseudo_inputs", self.pseudo_inputs)
        n, _ = self._plate_size_and_zero(x, num_data)
        with pyro.plate(DATA_PLATE, n):
            z = pyro.sample(LATENT_SITE, self.prior().expand([n]))
            return pyro.sample(OBS_SITE, self.observation_dist(self.decoder(z)), obs=x)

    @torch.no_grad()
    def sample(
        self, num_samples: int, mean: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """New images: z from the VampPrior, then the decoder's mean (or a draw of x)."""
        prior = self.prior()
        device = self._device()
        index = torch.randint(
            prior.num_components, (num_samples,), device=device, generator=generator
        )
        noise = torch.randn(num_samples, self.latent_dim, device=device, generator=generator)
        z = prior.loc[index] + prior.scale[index] * noise
        means = self.observation_mean(self.decoder(z))
        return means if mean else self._draw(means, generator)
