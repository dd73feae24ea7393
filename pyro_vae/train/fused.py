r"""The training loss of the package's own VAE, fused: no traces, the same numbers.

For the built-in :class:`~pyro_vae.models.vae.VAE` with a diagonal Gaussian guide and a single draw
(P = K = 1) of the ``trace`` or ``meanfield`` estimator, or any P and K of ``iwae``,
:class:`FusedLoss` computes the estimator's differentiable loss straight from the encoder and
decoder::

    loc, scale = encoder(x),   z = loc + ε · scale,   ε ~ N(0, I)
    trace:      −Σ_n [log p(x_n | z_n) + β (log N(z_n; 0, I) − log N(z_n; loc_n, scale_n²))]
    meanfield:  −Σ_n [log p(x_n | z_n) − β KL(N(loc_n, scale_n²) ‖ N(0, I))]
    iwae:       −(1/P) Σ_p Σ_n log (1/K) Σ_k w_pkn,
                log w = log p(x_n | z_pkn) + β (log N(z_pkn; 0, I) − log N(z_pkn; loc_n, scale_n²))

(``iwae`` with M = P·K > 1 draws ε of shape ``[M, N, L]`` and reads loc and scale expanded to
it, as the particle plate expands the guide's distribution; at M = 1 it is ``trace``.)

It draws ε with the same random-number call as ``Normal.rsample`` and evaluates the same
floating-point operations in the same order as the traced estimator
(:mod:`pyro_vae.infer`) does through ``torch.distributions``, so losses and gradients are
equal bit for bit (``tests/infer/test_performance_paths.py``). What it leaves out is exact
bookkeeping only: the effect-handler messages and traces, the distribution objects and their
same-shape ``expand`` views, and the prior's divisions by 1 and subtractions of 0.

The traced estimator stays the general path. :func:`training_loss` gives the fused loss only for
an exact ``VAE`` (not a subclass, whose model or guide may differ) and an exact
:class:`~pyro_vae.infer.TraceELBO` or :class:`~pyro_vae.infer.MeanFieldELBO` with one
draw or an exact :class:`~pyro_vae.infer.ImportanceWeightedELBO` (:func:`supports`), and each
call still goes the traced way when Pyro validation is on or
an effect handler is active (both would see or change sites the fused loss does not have).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import am_i_wrapped

from pyro_vae.infer import (
    ELBOEstimator,
    ImportanceWeightedELBO,
    MeanFieldELBO,
    TraceELBO,
    beta_log_weight,
    importance_weighted_bound,
)
from pyro_vae.models.vae import VAE

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
FUSED_ESTIMATORS = (TraceELBO, MeanFieldELBO)


def _normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """log N(value; loc, scale²) per coordinate, as ``torch.distributions.Normal.log_prob``."""
    var = scale**2
    return -((value - loc) ** 2) / (2 * var) - scale.log() - LOG_SQRT_2PI


def _standard_normal_log_prob(value: torch.Tensor) -> torch.Tensor:
    """log N(value; 0, 1) per coordinate: :func:`_normal_log_prob` at loc 0 and scale 1, whose
    subtraction of 0, division by 2·1 and subtraction of log 1 are exact."""
    return -(value**2) / 2 - LOG_SQRT_2PI


def _kl_to_standard_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """KL(N(loc, scale²) ‖ N(0, 1)) per coordinate, as torch's Normal–Normal KL with the
    prior's exact divisions by 1 and subtraction of 0 left out."""
    var_ratio = scale.pow(2)
    return 0.5 * (var_ratio + loc.pow(2) - 1 - var_ratio.log())


def supports(module: Any, estimator: ELBOEstimator) -> bool:
    """Whether :class:`FusedLoss` computes ``estimator``'s loss for ``module``'s pair: an exact
    ``VAE`` with a diagonal guide and its own ``model``/``guide``, an exact ``trace`` or
    ``meanfield`` estimator (not a subclass, whose loss may differ) with one draw, or an exact
    ``iwae`` estimator with any number of draws."""
    one_draw = estimator.num_particles == 1 and estimator.importance_samples == 1
    return (
        type(module) is VAE
        and module.guide_family == "diagonal"
        and "model" not in vars(module)
        and "guide" not in vars(module)
        and (
            (type(estimator) in FUSED_ESTIMATORS and one_draw)
            or type(estimator) is ImportanceWeightedELBO
        )
    )


class FusedLoss:
    """``estimator.differentiable_loss(module.model, module.guide, x)`` for the pairs of
    :func:`supports`, computed without Pyro (see the module docstring); called with anything
    else, under validation or under an effect handler, it runs the traced estimator.
    ``estimator.beta`` is read at every call, so a warm-up schedule applies."""

    def __init__(self, module: VAE, estimator: ELBOEstimator):
        if not supports(module, estimator):
            raise ValueError(
                f"no fused loss for {type(module).__name__} with {estimator!r}: "
                "use estimator.differentiable_loss"
            )
        self.module = module
        self.estimator = estimator
        self.meanfield = type(estimator) is MeanFieldELBO

    def traced(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.estimator.differentiable_loss(
            self.module.model, self.module.guide, *args, **kwargs
        )

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if (
            len(args) != 1
            or kwargs
            or is_validation_enabled()
            or am_i_wrapped()
            or not supports(self.module, self.estimator)
        ):
            return self.traced(*args, **kwargs)
        (x,) = args
        loc, scale = self.module.encoder(x)
        draws = self.estimator.num_particles * self.estimator.importance_samples
        if draws == 1:  # iwae's one draw is trace's (no particle plate in the traced path)
            eps = torch.empty(loc.shape, dtype=loc.dtype, device=loc.device).normal_()
            return -self.bound(x, loc, scale, eps).sum(-1)
        shape = (draws, *loc.shape)  # the particle plate's expansion of the guide
        loc, scale = loc.expand(shape), scale.expand(shape)
        eps = torch.empty(shape, dtype=loc.dtype, device=loc.device).normal_()
        return -self.importance_weighted(x, loc, scale, eps)

    def importance_weighted(
        self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """The ``iwae`` bound summed over the datapoints and averaged over the P particles, for
        ``loc``, ``scale`` and ``eps`` of shape ``[P·K, N, L]``, in the traced estimator's
        order: the log-weights ``[P·K, N]`` as ``[P, K, N]``, the log-mean-exp over K."""
        module, beta = self.module, self.estimator.beta
        z = loc + eps * scale
        out = module.decoder(z)
        log_lik = module.log_likelihood(out, x.expand_as(out))
        log_prior = _standard_normal_log_prob(z).sum(-1)
        log_q = _normal_log_prob(z, loc, scale).sum(-1)
        log_w = beta_log_weight(log_lik, log_prior, log_q, beta)
        log_w = log_w.reshape(-1, self.estimator.importance_samples, log_w.shape[-1])
        return importance_weighted_bound(log_w, dim=1).sum(-1).mean(0)

    def bound(
        self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """The estimator's bound per datapoint, ``[N]``, at z = loc + eps · scale for the
        guide's ``loc`` and ``scale`` of ``x`` and standard normal noise ``eps``."""
        module, beta = self.module, self.estimator.beta
        z = loc + eps * scale
        log_lik = module.log_likelihood(module.decoder(z), x)
        if self.meanfield:
            rate = _kl_to_standard_normal(loc, scale).sum(-1)
            return log_lik - (rate if beta == 1 else beta * rate)
        log_prior = _standard_normal_log_prob(z).sum(-1)
        log_q = _normal_log_prob(z, loc, scale).sum(-1)
        return beta_log_weight(log_lik, log_prior, log_q, beta)


def training_loss(
    module: Any, estimator: ELBOEstimator, fused: bool = True
) -> Callable[..., torch.Tensor]:
    """The loss function of a training step, ``loss(*args)`` =
    ``estimator.differentiable_loss(module.model, module.guide, *args)``: a :class:`FusedLoss`
    when ``fused`` and :func:`supports` allow it, else the traced estimator itself."""
    if fused and supports(module, estimator):
        return FusedLoss(module, estimator)
    return lambda *args, **kwargs: estimator.differentiable_loss(
        module.model, module.guide, *args, **kwargs
    )
