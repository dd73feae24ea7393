"""The VAE as a Pyro model/guide pair.

``model`` and ``guide`` are twins: the same latent site ``"z"`` inside the same
``pyro.plate("data", N)`` with ``.to_event(1)`` over the latent dimension. Tensors are created from
the input, so the pair runs wherever its data and parameters live.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from pyro.params import param_with_module_name
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl
from torch.distributions.utils import broadcast_all
from torch.nn import functional as F

from pyro_vae.core.traces import DATA_PLATE
from pyro_vae.models.config import GUIDES, LIKELIHOODS, ModelConfig
from pyro_vae.models.nets import (
    Decoder,
    FullCovarianceEncoder,
    GaussianEncoder,
    ObservationScale,
    activation_class,
)
from pyro_vae.util.errors import ConfigError, DataError

LATENT_SITE = "z"
OBS_SITE = "x"
LOGIT_EPS = 1e-3


def register_module(name: str, module: nn.Module) -> None:
    """Register ``module``'s parameters with Pyro's param store (as ``pyro.module`` does).

    Unlike ``pyro.module`` it never binds the name to parameters that another module put in the
    store first: entries under ``name`` always point at this module's own tensors, so two models
    with one name never silently share (or swap) parameters; the one that ran last is registered.
    Every parameter is sent as a ``pyro.param`` message on every call, so effect handlers
    (``SVI``'s param capture, ``poutine.trace``, ``poutine.block``) see them as they would see
    ``pyro.module``'s. Only Pyro's public API is used.
    """
    store = pyro.get_param_store()
    for key, value in module.named_parameters():
        full_name = param_with_module_name(name, key)
        if pyro.param(full_name, value) is not value:
            del store[full_name]
            pyro.param(full_name, value)


def forget_params(name: str) -> None:
    """Drop the param-store entries registered under ``name`` (and only those)."""
    store = pyro.get_param_store()
    for key in [key for key in store.keys() if key.startswith(f"{name}.")]:
        del store[key]


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(q: MultivariateNormal, p: Independent) -> torch.Tensor:
    r"""KL(N(μ, L Lᵀ) ‖ N(m, diag s²)) in closed form:
    ½ [Σ_i (L Lᵀ)_ii / s_i² + Σ_i ((μ_i − m_i)/s_i)² − d + 2 Σ log s_i − 2 Σ log L_ii]."""
    base = p.base_dist
    if not isinstance(base, Normal) or p.reinterpreted_batch_ndims != 1:
        # torch's registry convention for "no closed form": callers (kl_divergence's users,
        # Pyro's TraceMeanField_ELBO, the package's meanfield) then fall back to Monte Carlo
        raise NotImplementedError(
            f"no closed-form KL(MultivariateNormal ‖ Independent({type(base).__name__}, "
            f"{p.reinterpreted_batch_ndims})): only a diagonal Normal has one"
        )
    tril = q.scale_tril
    var_ratio = (tril.pow(2).sum(-1) / base.scale.pow(2)).sum(-1)
    mahalanobis = ((q.loc - base.loc) / base.scale).pow(2).sum(-1)
    log_det = 2 * (base.scale.log().sum(-1) - tril.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    return 0.5 * (var_ratio + mahalanobis - q.event_shape[0] + log_det)


class BernoulliPixels(dist.Independent):
    """Independent Bernoulli pixels on logits (``Bernoulli(logits).to_event(1)``) whose
    ``log_prob`` sums before negating: −Σ BCE-with-logits, the same value without a full-size
    negation (the evaluator's hot loop)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.log_density(*broadcast_all(self.base_dist.logits, value))

    @staticmethod
    def log_density(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """−Σ BCE-with-logits over the last dimension (``logits`` and ``value`` of one shape)."""
        return -F.binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class VAE(nn.Module):
    """Variational autoencoder: a N(0, I) prior, an MLP decoder and an amortized Gaussian guide.

    Generative model (``model``), for n in plate ``"data"``::

        z_n ~ N(0, I_d),   x_n | z_n ~ Bernoulli(sigmoid(f(z_n)))           likelihood="bernoulli"
                           x_n | z_n ~ N(f(z_n), σ² I_D)                     likelihood="gaussian"

    with σ fixed (``obs_scale=β``, the reconstruction/KL trade-off) or learned and shared over
    pixels (``obs_scale=None``). Guide (``guide``)::

        z_n | x_n ~ N(loc(x_n), diag scale(x_n)²)                            guide="diagonal"
        z_n | x_n ~ N(loc(x_n), L(x_n) L(x_n)ᵀ),  L lower-triangular        guide="full"

    For fixed networks the learned σ's optimum is σ*² = (1/D) E‖x − f(z)‖² (z ~ q(z|x)); the
    full-covariance guide's KL to the prior has a closed form (registered with
    :func:`torch.distributions.kl_divergence`, so the ``meanfield`` estimator uses it).

    Parameters are registered with Pyro's param store under ``name`` so the pair works with
    ``pyro.infer.SVI``; they are ordinary ``nn.Module`` parameters too, so any torch optimizer
    works.
    The module owns them: the store's entries always point at the tensors of the model that ran
    last under ``name`` (see :func:`register_module`).
    """

    conditional = False

    def __init__(
        self,
        input_dim: int,
        latent_dim: int = 8,
        hidden: Sequence[int] = (128,),
        scale_fn: str = "softplus",
        name: str = "vae",
        *,
        likelihood: str = "bernoulli",
        obs_scale: float | None = None,
        guide: str = "diagonal",
        activation: str = "softplus",
        encoder_input_dim: int | None = None,
        decoder_input_dim: int | None = None,
    ):
        super().__init__()
        if input_dim < 1:
            raise ConfigError(f"input_dim must be >= 1, got {input_dim}")
        if likelihood not in LIKELIHOODS:
            raise ConfigError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if guide not in GUIDES:
            raise ConfigError(f"guide must be one of {GUIDES}, got {guide!r}")
        if obs_scale is not None and not obs_scale > 0:
            raise ConfigError(f"obs_scale must be > 0 (or None to learn it), got {obs_scale}")
        activation_class(activation)
        self.config = ModelConfig(
            latent_dim=latent_dim,
            hidden=tuple(hidden),
            scale_fn=scale_fn,
            likelihood=likelihood,
            obs_scale=obs_scale,
            guide=guide,
            activation=activation,
        )
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.name = name
        self.likelihood = likelihood
        self.guide_family = guide
        encoder_class = FullCovarianceEncoder if guide == "full" else GaussianEncoder
        self.encoder = encoder_class(
            encoder_input_dim or input_dim, self.config.hidden, latent_dim, scale_fn, activation
        )
        self.decoder = Decoder(
            decoder_input_dim or latent_dim, self.config.hidden, input_dim, activation
        )
        self.obs_scale = (
            ObservationScale() if likelihood == "gaussian" and obs_scale is None else None
        )
        self.fixed_obs_scale = obs_scale

    def set_output_bias(self, mean_image: torch.Tensor) -> None:
        """Start the decoder at the data's pixel marginals: logit(mean) for Bernoulli pixels,
        the mean itself for Gaussian ones."""
        if self.likelihood == "bernoulli":
            mean_image = torch.logit(mean_image.clamp(LOGIT_EPS, 1 - LOGIT_EPS))
        self._decoder_net().set_output_bias(mean_image)

    def initialize_from_data(self, images: torch.Tensor) -> None:
        """Decoder bias from the mean image (:meth:`set_output_bias`) and, for a learned
        Gaussian σ, σ = the root-mean-square deviation of the pixels from that mean."""
        mean_image = images.mean(0)
        self.set_output_bias(mean_image)
        if self.obs_scale is not None:
            rms = (images - mean_image).pow(2).mean().sqrt().clamp_min(LOGIT_EPS)
            with torch.no_grad():
                self.obs_scale.log_scale.copy_(rms.log())

    def _decoder_net(self) -> Decoder:
        return self.decoder

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def check_images(self, x: torch.Tensor) -> None:
        """Raise :class:`~pyro_vae.util.errors.DataError` unless ``x`` is a non-empty floating-point
        ``[N, input_dim]`` batch (one image is ``x[None]``, not ``x``: a 1-D tensor would be
        read as ``input_dim`` datapoints). Called by ``model`` and ``guide``; the shape checks
        cost a few attribute reads, the finiteness check a pass over ``x`` and runs only
        under Pyro validation (on by default, off in the package's own training loop)."""
        if not isinstance(x, torch.Tensor):
            raise DataError(f"images must be a tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.input_dim:
            raise DataError(
                f"images must have shape [N, {self.input_dim}] (one image: x[None]), "
                f"got {list(x.shape)}"
            )
        if not x.is_floating_point():
            raise DataError(f"images must be floating point, got {x.dtype}")
        if x.shape[0] == 0:
            raise DataError("got an empty batch of images")
        if is_validation_enabled() and not torch.isfinite(x).all():
            raise DataError("images contain NaN or infinite values")

    def _plate_size_and_zero(
        self, x: torch.Tensor | None, num_data: int | None
    ) -> tuple[int, torch.Tensor]:
        """The data plate's size and a scalar zero on the data's device (the parameters' device
        when generating without data, ``num_data`` images, default 1)."""
        if x is not None:
            self.check_images(x)
            return x.shape[0], x.new_zeros(())
        return (1 if num_data is None else num_data), torch.zeros((), device=self._device())

    def _register_decoder(self) -> None:
        register_module(f"{self.name}.decoder", self.decoder)
        if self.obs_scale is not None:
            register_module(f"{self.name}.likelihood", self.obs_scale)

    def observation_dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) from the decoder's output (one event over the pixels)."""
        if self.likelihood == "bernoulli":
            return BernoulliPixels(dist.Bernoulli(logits=out), 1)
        scale = self.obs_scale() if self.obs_scale is not None else self.fixed_obs_scale
        return dist.Normal(out, scale * torch.ones_like(out)).to_event(1)

    def log_likelihood(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x | z) per datapoint from the decoder's output: the value and gradient of
        ``observation_dist(out).log_prob(x)``, for Bernoulli pixels without building the
        distribution (what the fused training loss, :mod:`pyro_vae.train.fused`, calls)."""
        if self.likelihood == "bernoulli":
            return BernoulliPixels.log_density(out, x)
        return self.observation_dist(out).log_prob(x)

    def latent_dist(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) from the encoder's output: ``scale`` is a vector (diagonal guide) or a
        lower-triangular matrix (full guide)."""
        if self.guide_family == "full":
            return dist.MultivariateNormal(loc, scale_tril=scale)
        return dist.Normal(loc, scale).to_event(1)

    def observation_mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """p(z) p(x|z). With ``x=None`` it samples ``num_data`` new images (default 1)."""
        self._register_decoder()
        n, zeros = self._plate_size_and_zero(x, num_data)
        with pyro.plate(DATA_PLATE, n):
            prior = dist.Normal(zeros, 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample(LATENT_SITE, prior)
            return pyro.sample(OBS_SITE, self.observation_dist(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z|x), a Gaussian from the encoder."""
        register_module(f"{self.name}.encoder", self.encoder)
        self.check_images(x)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample(LATENT_SITE, self.latent_dist(*self.encoder(x)))

    def _draw(self, mean: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.likelihood == "bernoulli":
            return torch.bernoulli(mean, generator=generator)
        scale = self.obs_scale() if self.obs_scale is not None else self.fixed_obs_scale
        noise = torch.randn(mean.shape, device=mean.device, generator=generator)
        return mean + scale * noise

    @torch.no_grad()
    def sample(
        self, num_samples: int, mean: bool = True, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """New images: z ~ N(0, I), then the decoder's mean (``mean=True``) or a draw of x."""
        z = torch.randn(num_samples, self.latent_dim, device=self._device(), generator=generator)
        means = self.observation_mean(self.decoder(z))
        return means if mean else self._draw(means, generator)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's mean and marginal standard deviations for each row of ``x``."""
        loc, scale = self.encoder(x)
        if self.guide_family == "full":
            scale = scale.pow(2).sum(-1).sqrt()
        return loc, scale

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_latent: bool = False) -> torch.Tensor:
        """Decoder mean at the guide's mean (or at a draw z ~ q(z|x) with ``sample_latent``)."""
        params = self.encoder(x)
        z = self.latent_dist(*params).sample() if sample_latent else params[0]
        return self.observation_mean(self.decoder(z))
