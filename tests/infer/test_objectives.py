"""ELBO estimators against closed forms of a linear-Gaussian model (float64).

Monte Carlo tolerances: a mean of R independent draws is compared within ``NUM_SE`` = 5
standard errors, the standard error estimated from the draws themselves (a false failure has
probability < 6e-7 per compared number; the suite compares a few hundred). Each draw is one call
of an estimator with P vectorized particles, i.e. already a mean of P particles. Exact
statements (equal values, zero variance) use a float64 rounding tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace

import numpy
import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from threads import one_thread
from torch import nn
from torch.distributions import MultivariateNormal, Normal

from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.traces import latent_sites
from pyro_vae.infer import (
    CLASSES,
    ESTIMATORS,
    DoublyReparameterizedELBO,
    ELBOEstimator,
    ImportanceWeightedELBO,
    LinearWarmup,
    MeanFieldELBO,
    StickingTheLandingELBO,
    TraceELBO,
    make_estimator,
)
from pyro_vae.infer.bounds import score_free_log_q
from pyro_vae.models.vae import VAE

#: the estimators that take one importance sample (every one but vimco, which needs two)
ONE_SAMPLE = tuple(name for name in ESTIMATORS if CLASSES[name].min_importance_samples == 1)

NUM_SE = 5.0
ROUNDING = 1e-9
MODEL_PARAMS = ("weight", "bias", "log_noise_scale")
GUIDE_PARAMS = ("loc_shift", "log_scale_factor")


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _pair(guide: str = "diagonal", exact: bool = False) -> LinearGaussian:
    """D = 3, d = 2; a shifted, over-dispersed guide unless ``exact``."""
    if exact:
        return LinearGaussian.random(3, 2, noise_scale=0.7, guide="full")
    return LinearGaussian.random(
        3, 2, noise_scale=0.7, guide=guide, loc_shift=torch.tensor([0.3, -0.2]), scale_factor=1.3
    )


def _data(lg: LinearGaussian, num_data: int = 3) -> torch.Tensor:
    return lg.sample(num_data, torch.Generator().manual_seed(1))


def _params(module: nn.Module, names=MODEL_PARAMS + GUIDE_PARAMS) -> list[torch.Tensor]:
    return [getattr(module, name) for name in names]


def _guide_moments(lg: LinearGaussian, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [N, d] and covariance [d, d] of q(z|x)."""
    q = lg.guide_distribution(x)
    if isinstance(q, MultivariateNormal):
        return q.loc, q.covariance_matrix[0]
    return q.base_dist.loc, torch.diag_embed(q.base_dist.scale.square())[0]


def expected_log_lik(lg: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """E_q[log N(x; W z + b, σ² I)] per datapoint, in closed form."""
    mean, cov = _guide_moments(lg, x)
    var = lg.noise_scale**2
    residual = x - mean @ lg.weight.T - lg.bias
    spread = torch.trace(lg.weight @ cov @ lg.weight.T)
    return -0.5 * lg.data_dim * torch.log(2 * math.pi * var) - (
        residual.square().sum(-1) + spread
    ) / (2 * var)


def rate(lg: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) ‖ N(0, I)) per datapoint, in closed form."""
    mean, cov = _guide_moments(lg, x)
    return 0.5 * (torch.trace(cov) + mean.square().sum(-1) - lg.latent_dim - torch.logdet(cov))


def beta_elbo(lg: LinearGaussian, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    return expected_log_lik(lg, x) - beta * rate(lg, x)


def iw_reference(
    lg: LinearGaussian, x: torch.Tensor, k: int, replicates: int, seed: int = 123
) -> tuple[float, float]:
    """Mean and SE of Σ_n log (1/K) Σ_k w_k, sampled with torch.distributions (no Pyro)."""
    generator = torch.Generator().manual_seed(seed)
    q = lg.guide_distribution(x)
    with torch.no_grad():
        if isinstance(q, MultivariateNormal):
            loc, tril = q.loc, q.scale_tril
        else:
            loc, tril = q.base_dist.loc, torch.diag_embed(q.base_dist.scale)
        eps = torch.randn(replicates, k, *loc.shape, generator=generator, dtype=loc.dtype)
        z = loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)
        log_q = MultivariateNormal(loc, scale_tril=tril).log_prob(z)
        log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_lik = Normal(z @ lg.weight.T + lg.bias, lg.noise_scale).log_prob(x).sum(-1)
        bound = torch.logsumexp(log_lik + log_prior - log_q, 1) - math.log(k)
        total = bound.sum(-1)
    return total.mean().item(), total.std().item() / math.sqrt(replicates)


def iw_quadrature(
    lg: LinearGaussian, x: torch.Tensor, k: int, beta: float, nodes: int
) -> torch.Tensor:
    """Σ_n E[log (1/K) Σ_k w_β,k] of a one-dimensional latent with the diagonal guide, by
    Gauss–Hermite quadrature over the K normals behind z_1..z_K (differentiable in ``lg``)."""
    q = lg.guide_distribution(x)
    loc, scale = q.base_dist.loc[:, 0], q.base_dist.scale[:, 0]

    def bound(eps: torch.Tensor) -> torch.Tensor:
        z = loc + scale * eps[:, :, None]
        mean = z[..., None] * lg.weight[:, 0] + lg.bias
        log_lik = Normal(mean, lg.noise_scale).log_prob(x).sum(-1)
        log_w = log_lik + beta * (Normal(0.0, 1.0).log_prob(z) - Normal(loc, scale).log_prob(z))
        return torch.logsumexp(log_w, 1) - math.log(k)

    return gauss_hermite(bound, k, nodes).sum()


def normalized_weight_moment(lg: LinearGaussian, x: torch.Tensor, n: float) -> torch.Tensor:
    """E_q[(w / p(x))^n] = ∫ p(z|x)^n q(z|x)^(1−n) dz per datapoint, in closed form (a Gaussian
    integral; finite when n Σ_p⁻¹ + (1 − n) Σ_q⁻¹ is positive definite)."""
    posterior, q = lg.posterior(x), lg.guide_distribution(x)
    a, b = posterior.loc[..., None], q.loc[..., None]
    a_inv = torch.linalg.inv(posterior.covariance_matrix)
    b_inv = torch.linalg.inv(q.covariance_matrix)
    precision = n * a_inv + (1 - n) * b_inv
    shift = n * a_inv @ a + (1 - n) * b_inv @ b
    constant = -n / 2 * (
        (a.mT @ a_inv @ a).squeeze((-1, -2))
        + torch.logdet(2 * math.pi * posterior.covariance_matrix)
    ) - (1 - n) / 2 * (
        (b.mT @ b_inv @ b).squeeze((-1, -2)) + torch.logdet(2 * math.pi * q.covariance_matrix)
    )
    covariance = torch.linalg.inv(precision)
    return torch.exp(
        constant
        + 0.5 * (shift.mT @ covariance @ shift).squeeze((-1, -2))
        + 0.5 * torch.logdet(2 * math.pi * covariance)
    )


def draws(fn: Callable[[], torch.Tensor], repeats: int) -> torch.Tensor:
    return torch.stack([fn().detach().flatten() for _ in range(repeats)])


def loss_draws(estimator: ELBOEstimator, module, x: torch.Tensor, repeats: int) -> torch.Tensor:
    with torch.no_grad():
        return draws(lambda: estimator.differentiable_loss(module.model, module.guide, x), repeats)


def grad_draws(
    estimator: ELBOEstimator, module, x: torch.Tensor, repeats: int, params: list[torch.Tensor]
) -> torch.Tensor:
    def one() -> torch.Tensor:
        loss = estimator.differentiable_loss(module.model, module.guide, x)
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    return draws(one, repeats)


def value_and_grad_draws(
    estimator: ELBOEstimator, module, x: torch.Tensor, repeats: int, params: list[torch.Tensor]
) -> torch.Tensor:
    """Rows [loss, ∂loss/∂params...] of ``repeats`` independent calls."""

    def one() -> torch.Tensor:
        loss = estimator.differentiable_loss(module.model, module.guide, x)
        grads = torch.autograd.grad(loss, params)
        return torch.cat([loss.detach().reshape(1), *(g.flatten() for g in grads)])

    return draws(one, repeats)


def exact_grad(value: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def assert_mean_matches(
    samples: torch.Tensor,
    expected: torch.Tensor | float,
    extra_se: torch.Tensor | float = 0.0,
    what: str = "",
) -> None:
    """Every column's mean within NUM_SE standard errors (plus a rounding floor) of expected;
    ``extra_se`` (per column or one number) is the reference's own error, added in quadrature."""
    expected = torch.as_tensor(expected, dtype=samples.dtype).flatten()
    mean = samples.mean(0)
    se = (samples.var(0) / samples.shape[0] + extra_se**2).sqrt()
    tolerance = NUM_SE * se + ROUNDING * (1 + expected.abs())
    bad = (mean - expected).abs() > tolerance
    assert not bad.any(), (
        f"{what}: mean {mean[bad].tolist()} vs expected "
        f"{expected.expand_as(mean)[bad].tolist()} (SE {se[bad].tolist()})"
    )


def assert_same_mean(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    difference = a.mean(0) - b.mean(0)
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    bad = difference.abs() > NUM_SE * se + ROUNDING
    assert not bad.any(), f"{what}: differences {difference[bad].tolist()} (SE {se[bad].tolist()})"


def total_variance(samples: torch.Tensor) -> tuple[float, float]:
    """Trace of the covariance of the rows, and its standard error (distribution-free)."""
    squared = (
        (samples - samples.mean(0)).square().sum(1) * samples.shape[0] / (samples.shape[0] - 1)
    )
    return squared.mean().item(), squared.std().item() / math.sqrt(samples.shape[0])


class Hierarchical(nn.Module):
    """Two scalar latents per datapoint, with a guide whose second site depends on the first::

        model:  z1 ~ N(0, 1),  z2 | z1 ~ N(a z1, 1),  x | z2 ~ N(z2, σ²)
        guide:  z1 ~ N(m1 + r1 x, s1²),  z2 | z1 ~ N(c z1 + m2 + r2 x, s2²)

    Everything is Gaussian and linear, so the ELBO has a closed form in all the parameters, and
    the guide family contains the exact posterior (``exact=True``).
    """

    names = ("a", "log_sigma", "m1", "r1", "log_s1", "c", "m2", "r2", "log_s2")

    def __init__(self, exact: bool = False):
        super().__init__()
        a, var_x = 0.8, 0.36
        if exact:
            precision = 1 + a**2 / (1 + var_x)
            guide = (
                0.0,
                a / (1 + var_x) / precision,
                -0.5 * math.log(precision),
                a * var_x / (1 + var_x),
                0.0,
                1 / (1 + var_x),
                0.5 * math.log(var_x / (1 + var_x)),
            )
        else:
            guide = (0.2, 0.3, math.log(0.7), 0.4, -0.1, 0.5, math.log(0.9))
        for name, value in zip(self.names, (a, 0.5 * math.log(var_x), *guide)):
            setattr(self, name, nn.Parameter(torch.tensor(value, dtype=torch.float64)))

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(()), 1.0))
            z2 = pyro.sample("z2", dist.Normal(self.a * z1, 1.0))
            pyro.sample("x", dist.Normal(z2, self.log_sigma.exp()), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(self.m1 + self.r1 * x, self.log_s1.exp()))
            pyro.sample("z2", dist.Normal(self.c * z1 + self.m2 + self.r2 * x, self.log_s2.exp()))

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        log_2pi = math.log(2 * math.pi)
        v1, v2_cond = (2 * self.log_s1).exp(), (2 * self.log_s2).exp()
        var_x = (2 * self.log_sigma).exp()
        mu1 = self.m1 + self.r1 * x
        mu2 = self.c * mu1 + self.m2 + self.r2 * x
        v2 = self.c**2 * v1 + v2_cond
        log_z1 = -0.5 * log_2pi - 0.5 * (mu1**2 + v1)
        log_z2 = -0.5 * log_2pi - 0.5 * (
            (mu2 - self.a * mu1) ** 2 + (self.c - self.a) ** 2 * v1 + v2_cond
        )
        log_x = -0.5 * (log_2pi + var_x.log()) - ((x - mu2) ** 2 + v2) / (2 * var_x)
        entropy = 0.5 * (log_2pi + 1 + v1.log()) + 0.5 * (log_2pi + 1 + v2_cond.log())
        return log_z1 + log_z2 + log_x + entropy

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        return Normal(0.0, (self.a**2 + 1 + (2 * self.log_sigma).exp()).sqrt()).log_prob(x)


HIERARCHICAL_DATA = (0.5, -1.0, 2.0)


def gauss_hermite(
    fn: Callable[[torch.Tensor], torch.Tensor], dims: int, nodes: int
) -> torch.Tensor:
    """E[fn(ε)] for ε ~ N(0, I_dims) by the tensor-product Gauss–Hermite rule with ``nodes``
    nodes per dimension (exact for polynomials of degree < 2·nodes in each coordinate).
    ``fn`` maps the ``[G, dims]`` grid to ``[G, ...]``; differentiable in what ``fn`` closes
    over, so the gradient of the quadrature value is the quadrature of the gradient."""
    points, weights = numpy.polynomial.hermite_e.hermegauss(nodes)
    points = torch.tensor(points, dtype=torch.float64)
    weights = torch.tensor(weights, dtype=torch.float64) / math.sqrt(2 * math.pi)
    grid = torch.cartesian_prod(*[points] * dims).reshape(-1, dims)
    weight = torch.cartesian_prod(*[weights] * dims).reshape(-1, dims).prod(-1)
    values = fn(grid)
    return (weight.reshape(-1, *[1] * (values.dim() - 1)) * values).sum(0)


def quadrature_with_error(
    fn: Callable[[], torch.Tensor], nodes: tuple[int, int], params: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fn(n)`` (a scalar quadrature with n nodes per dimension) and its gradient, at the
    larger node count, and an error estimate: the absolute change from the smaller count
    (the rule converges quickly for these smooth integrands, so the change bounds the error
    of the coarser rule and, a fortiori, of the finer one)."""
    coarse, fine = (fn(n) for n in nodes)
    value = torch.cat([fine.detach().reshape(1), exact_grad(fine, params)])
    other = torch.cat([coarse.detach().reshape(1), exact_grad(coarse, params)])
    return value, (value - other).abs()


class Unguided(nn.Module):
    """A model latent that the guide does not sample (scalar, per datapoint)::

        model:  z ~ N(0, 1),  u | z ~ N(a + c z, s_u²),  x | z, u ~ N(z + u, σ²)
        guide:  z ~ N(m + r x, s²)                         (u is left to its prior)

    Each draw is (z, u) ~ q(z|x) p(u|z), so log w_β = log p(x|z, u) + β (log p(z) − log q(z|x))
    and the β-ELBO is E[log p(x|z, u)] − β KL(q(z|x) ‖ N(0, 1)), in closed form since
    z + u = (1 + c) z + a + s_u η is Gaussian.
    """

    names = ("a", "c", "log_su", "log_sigma", "m", "r", "log_s")

    def __init__(self):
        super().__init__()
        for name, value in zip(
            self.names, (0.4, 0.5, math.log(0.8), math.log(0.6), 0.1, 0.3, math.log(0.7))
        ):
            setattr(self, name, nn.Parameter(torch.tensor(value, dtype=torch.float64)))

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            u = pyro.sample("u", dist.Normal(self.a + self.c * z, self.log_su.exp()))
            pyro.sample("x", dist.Normal(z + u, self.log_sigma.exp()), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.m + self.r * x, self.log_s.exp()))

    def elbo(self, x: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        loc, var = self.m + self.r * x, (2 * self.log_s).exp()
        var_x = (2 * self.log_sigma).exp()
        residual = x - (1 + self.c) * loc - self.a
        spread = (1 + self.c) ** 2 * var + (2 * self.log_su).exp()
        log_lik = -0.5 * torch.log(2 * math.pi * var_x) - (residual**2 + spread) / (2 * var_x)
        kl = 0.5 * (loc**2 + var - 1 - var.log())
        return log_lik - beta * kl

    def iwae_bound(self, x: torch.Tensor, k: int, beta: float, nodes: int) -> torch.Tensor:
        """Σ_n E[log (1/K) Σ_k w_β,k] by Gauss–Hermite quadrature over the 2K normals
        behind (z_k, u_k)."""

        def bound(eps: torch.Tensor) -> torch.Tensor:
            loc, scale = self.m + self.r * x, self.log_s.exp()
            z = loc + scale * eps[:, :k, None]
            u = self.a + self.c * z + self.log_su.exp() * eps[:, k:, None]
            log_w = Normal(z + u, self.log_sigma.exp()).log_prob(x) + beta * (
                Normal(0.0, 1.0).log_prob(z) - Normal(loc, scale).log_prob(z)
            )
            return torch.logsumexp(log_w, 1) - math.log(k)

        return gauss_hermite(bound, 2 * k, nodes).sum()


UNGUIDED_DATA = (0.5, -1.0, 2.0)


def _estimator(name: str, k: int = 1, particles: int = 1, beta: float = 1.0) -> ELBOEstimator:
    return make_estimator(
        name, num_particles=particles, importance_samples=k, beta=beta, max_plate_nesting=1
    )


# ----------------------------------------------------------------------------- values


def test_exact_guide_makes_every_bound_log_marginal():
    lg = _pair(exact=True)
    x = _data(lg)
    log_px = lg.log_marginal(x).sum()
    # meanfield is left out: with the full-covariance guide its KL is closed form
    # (pyro_vae.models.vae registers KL(MultivariateNormal ‖ diagonal Normal)), so its
    # reconstruction term alone is Monte Carlo and the bound is exact only in expectation.
    for name in (name for name in ONE_SAMPLE if name != "meanfield"):
        k = 7 if name in ("iwae", "dreg") else 1
        estimator = _estimator(name, k=k, particles=5)
        loss = estimator.differentiable_loss(lg.model, lg.guide, x)
        assert abs(loss.item() + log_px.item()) < ROUNDING * abs(log_px.item()), name
        assert abs(estimator.loss(lg.model, lg.guide, x) - loss.item()) < 1e-12, name


def test_closed_form_elbo_agrees_with_the_gap_identity():
    lg = _pair(guide="full")
    x = _data(lg)
    torch.testing.assert_close(beta_elbo(lg, x), lg.log_marginal(x) - lg.kl_guide_to_posterior(x))


@pytest.mark.parametrize("name", ["trace", "meanfield", "stl", "iwae", "dreg"])
@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_single_sample_loss_mean_is_the_beta_elbo(name, beta):
    lg = _pair()
    x = _data(lg)
    losses = loss_draws(_estimator(name, particles=64, beta=beta), lg, x, repeats=40)
    assert_mean_matches(losses, -beta_elbo(lg, x, beta).sum().detach(), what=name)


@pytest.mark.parametrize("name", ["iwae", "dreg"])
def test_importance_weighted_loss_mean_is_the_iwae_bound(name):
    lg = _pair(guide="full")
    x = _data(lg)
    reference, reference_se = iw_reference(lg, x, k=4, replicates=200_000)
    losses = loss_draws(_estimator(name, k=4, particles=64), lg, x, repeats=40)
    assert_mean_matches(-losses, reference, extra_se=reference_se, what=name)


def test_iwae_bound_increases_with_k_toward_log_marginal():
    """The package's own ``iwae`` losses for K = 1, 4, 16, 64: L_1 is the closed-form ELBO,
    each L_K is below log p(x) and significantly above the previous one, and the gap at K = 64
    is the delta-method expansion in 1/K of E[−log (1/K) Σ_k W_k], W = w / p(x):

        log p(x) − L_K = σ²/(2K) + (3σ⁴/4 − μ₃/3)/K² + O(K⁻³),

    with σ² = Var_q W and μ₃ the third central moment, both in closed form. The tolerance is
    NUM_SE standard errors plus the size of the K⁻² term, a bound on the neglected remainder
    (the terms of this asymptotic series shrink by about a factor σ²/K each here)."""
    lg = _pair(guide="full")
    x = _data(lg)
    log_px = lg.log_marginal(x).sum().item()
    elbo = beta_elbo(lg, x).sum().item()
    bounds = {}
    for k in (1, 4, 16, 64):
        draws_k = -loss_draws(_estimator("iwae", k=k, particles=256), lg, x, repeats=40)
        bounds[k] = (draws_k.mean().item(), draws_k.std().item() / math.sqrt(draws_k.shape[0]))
    assert abs(bounds[1][0] - elbo) < NUM_SE * bounds[1][1], (bounds[1], elbo)
    ks = list(bounds)
    for low, high in zip(ks, ks[1:]):
        assert bounds[high][0] - bounds[low][0] > NUM_SE * math.hypot(
            bounds[low][1], bounds[high][1]
        ), bounds
    for bound, se in bounds.values():
        assert bound < log_px + NUM_SE * se, (bound, se, log_px)
    with torch.no_grad():
        second = normalized_weight_moment(lg, x, 2.0)
        third = normalized_weight_moment(lg, x, 3.0)
    variance, skew = second - 1, third - 3 * second + 2
    k = ks[-1]
    first_order = (variance / (2 * k)).sum().item()
    second_order = ((3 * variance**2 / 4 - skew / 3) / k**2).sum().item()
    gap, se = log_px - bounds[k][0], bounds[k][1]
    assert abs(gap - first_order - second_order) < NUM_SE * se + abs(second_order), (
        gap,
        se,
        first_order,
        second_order,
    )


def test_loss_of_trace_and_meanfield_equals_pyro_on_the_same_draws():
    vae = VAE(12, 2, (8,))
    x = torch.bernoulli(torch.full((5, 12), 0.4))
    params = list(vae.parameters())
    for ours, pyros in (("trace", Trace_ELBO), ("meanfield", TraceMeanField_ELBO)):
        for particles in (1, 3):
            pyro.set_rng_seed(1)
            loss = _estimator(ours, particles=particles).differentiable_loss(
                vae.model, vae.guide, x
            )
            grads = torch.autograd.grad(loss, params)
            pyro.set_rng_seed(1)
            reference = pyros(
                num_particles=particles, vectorize_particles=True, max_plate_nesting=1
            ).differentiable_loss(vae.model, vae.guide, x)
            expected = torch.autograd.grad(reference, params)
            torch.testing.assert_close(loss, reference)
            for grad, want in zip(grads, expected):
                torch.testing.assert_close(grad, want)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    "name, beta, guide",
    [
        ("trace", 1.0, "diagonal"),
        ("meanfield", 1.0, "diagonal"),
        ("stl", 1.0, "diagonal"),
        ("stl", 1.0, "full"),
        ("trace", 0.5, "full"),
        ("meanfield", 0.3, "diagonal"),
        ("stl", 0.5, "full"),
    ],
)
def test_mean_gradient_is_the_closed_form_elbo_gradient(name, beta, guide):
    lg = _pair(guide=guide)
    x = _data(lg)
    params = _params(lg)
    expected = exact_grad(-beta_elbo(lg, x, beta).sum(), params)
    grads = grad_draws(_estimator(name, particles=64, beta=beta), lg, x, 40, params)
    assert_mean_matches(grads, expected, what=f"{name}, beta={beta}, {guide}")


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_dreg_and_iwae_gradients_agree_in_expectation(beta):
    lg = _pair(guide="full")
    x = _data(lg)
    params = _params(lg)
    iwae = grad_draws(_estimator("iwae", k=4, particles=32, beta=beta), lg, x, 40, params)
    dreg = grad_draws(_estimator("dreg", k=4, particles=32, beta=beta), lg, x, 40, params)
    assert_same_mean(dreg, iwae, what=f"beta={beta}")


def test_k1_dreg_is_stl_and_k1_iwae_is_trace():
    lg = _pair(guide="full")
    x = _data(lg)
    params = _params(lg)
    for one, same in (("dreg", "stl"), ("iwae", "trace")):
        pyro.set_rng_seed(3)
        a = grad_draws(_estimator(one, particles=4), lg, x, 1, params)
        pyro.set_rng_seed(3)
        b = grad_draws(_estimator(same, particles=4), lg, x, 1, params)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_single_site_shortcut_equals_the_replayed_guide():
    """stl and dreg read log q_φ(sg z) of a guide with one latent site from its traced site;
    the guide replayed on the detached draws (what a guide of several sites takes) gives the
    same value and the same gradient, the score."""
    lg = _pair(guide="full")
    x = _data(lg)
    params = _params(lg, GUIDE_PARAMS)
    for name, k in (("stl", 1), ("dreg", 3)):
        pyro.set_rng_seed(5)
        particles = _estimator(name, k=k, particles=2).draw(lg.model, lg.guide, (x,), {})
        read = score_free_log_q(particles)
        replayed = particles.site_total(latent_sites(particles.replay()))
        torch.testing.assert_close(read, replayed, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            exact_grad(read.sum(), params),
            exact_grad(replayed.sum(), params),
            rtol=1e-10,
            atol=1e-12,
        )


class TwoRunDReG(DoublyReparameterizedELBO):
    """DReG without the gate that rescales the path gradients of its one run: the model runs
    a second time on the detached draws (the surrogate of any pair)."""

    draw_view = None


@pytest.mark.parametrize("beta", [1.0, 0.4, 0.0])
def test_dreg_single_pass_equals_the_second_run_on_detached_draws(beta):
    """DReG's one run of the model, its path gradients rescaled on the way back, gives the
    loss and gradients of the two-run surrogate on the same random numbers: for a one-site
    guide (read directly), for a guide whose second site depends on the first (replayed: a
    rescaled gradient must reach z1 through z2 once, not twice), and for P > 1. The model
    runs once per call instead of twice."""
    lg, hierarchical = _pair(guide="full"), Hierarchical()
    cases = [
        (lg, _data(lg), _params(lg)),
        (
            hierarchical,
            torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64),
            list(hierarchical.parameters()),
        ),
    ]
    for pair, x, params in cases:
        calls = []
        model = pair.model

        def counted(*args, calls=calls, model=model, **kwargs):
            calls.append(1)
            return model(*args, **kwargs)

        counted_pair = SimpleNamespace(model=counted, guide=pair.guide)
        runs = {}
        for single, cls in ((True, DoublyReparameterizedELBO), (False, TwoRunDReG)):
            estimator = cls(num_particles=2, importance_samples=4, beta=beta, max_plate_nesting=1)
            estimator.differentiable_loss(counted, pair.guide, x)  # plate nesting learnt
            calls.clear()
            pyro.set_rng_seed(11)
            runs[single] = value_and_grad_draws(estimator, counted_pair, x, 1, params)
            runs[single, "model runs"] = len(calls)
        torch.testing.assert_close(runs[True], runs[False], rtol=1e-10, atol=1e-12)
        assert (runs[True, "model runs"], runs[False, "model runs"]) == (1, 2)


def test_stl_guide_gradient_has_zero_variance_at_the_exact_posterior():
    lg = _pair(exact=True)
    x = _data(lg)
    params = _params(lg, GUIDE_PARAMS)
    stl = grad_draws(_estimator("stl"), lg, x, 20, params)
    trace = grad_draws(_estimator("trace"), lg, x, 400, params)
    assert stl.abs().max().item() < ROUNDING
    # trace's is not: every element's variance (the mean of its squared deviations) exceeds
    # zero by more than NUM_SE standard errors of that mean, estimated from the same draws.
    squared = (trace - trace.mean(0)).square() * trace.shape[0] / (trace.shape[0] - 1)
    variance, variance_se = squared.mean(0), squared.std(0) / math.sqrt(trace.shape[0])
    assert (variance > NUM_SE * variance_se).all(), (variance / variance_se).tolist()


def test_dreg_guide_gradient_variance_is_below_iwae_at_k50():
    lg = _pair(guide="full")
    x = _data(lg)
    params = _params(lg, GUIDE_PARAMS)
    iwae = total_variance(grad_draws(_estimator("iwae", k=50), lg, x, 200, params))
    dreg = total_variance(grad_draws(_estimator("dreg", k=50), lg, x, 200, params))
    assert dreg[0] + NUM_SE * dreg[1] < iwae[0] - NUM_SE * iwae[1], (dreg, iwae)


def test_importance_weighted_value_and_gradient_at_beta_half_match_quadrature():
    """K = 3 draws inside the log at β = 0.5, one latent dimension: the K-sample β-bound and its
    gradient by Gauss–Hermite quadrature over the three normals (24 nodes each; the change
    from 20 nodes is the quadrature's error estimate). Checks the (1 − β) w̃ + β w̃² weights of
    DReG's path term, and that β weights the rate inside each log-weight."""
    lg = LinearGaussian.random(
        3, 1, noise_scale=0.7, guide="diagonal", loc_shift=torch.tensor([0.3]), scale_factor=1.3
    )
    x = _data(lg)
    params = _params(lg)
    k, beta = 3, 0.5
    exact, error = quadrature_with_error(
        lambda nodes: iw_quadrature(lg, x, k, beta, nodes), (20, 24), params
    )
    for name in ("iwae", "dreg"):
        samples = value_and_grad_draws(
            _estimator(name, k=k, particles=32, beta=beta), lg, x, 40, params
        )
        assert_mean_matches(samples, -exact, extra_se=error, what=name)


# ----------------------------------------------------------------------------- hierarchical guide


def test_hierarchical_closed_form():
    x = torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64)
    exact = Hierarchical(exact=True)
    torch.testing.assert_close(exact.elbo(x), exact.log_marginal(x))
    assert (Hierarchical().elbo(x) < exact.log_marginal(x)).all()


def test_stl_is_unbiased_for_a_hierarchical_guide():
    pair = Hierarchical()
    x = torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64)
    params = list(pair.parameters())
    expected = exact_grad(-pair.elbo(x).sum(), params)
    grads = grad_draws(_estimator("stl", particles=64), pair, x, 40, params)
    assert_mean_matches(grads, expected, what="stl, hierarchical guide")


def test_hierarchical_exact_posterior_gives_zero_variance_only_with_the_replayed_guide():
    """At q = p(z|x) the path derivative of log p(x, z) − log q(z) vanishes, so STL and DReG
    guide gradients are exactly zero. Detaching each guide site's distribution parameters
    instead (log q with its parameters detached) also cuts the path of z1 through q(z2 | z1):
    still unbiased for STL, but no longer zero-variance."""
    pair = Hierarchical(exact=True)
    x = torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64)
    params = [getattr(pair, name) for name in Hierarchical.names[2:]]
    for estimator in (_estimator("stl", particles=4), _estimator("dreg", k=5)):
        assert grad_draws(estimator, pair, x, 10, params).abs().max().item() < ROUNDING

    def detached_sites() -> torch.Tensor:
        drawn = draw_particles(pair.model, pair.guide, (x,), {}, 4, 1)
        log_q = drawn.site_total(drawn.guide_latents, detach=True)
        loss = -(drawn.log_lik + drawn.log_prior - log_q).sum(1).mean(0)
        return exact_grad(loss, params)

    assert draws(detached_sites, 10).var(0).max().item() > 1e-3


def test_detaching_site_parameters_would_bias_dreg_for_a_hierarchical_guide():
    """DReG's w̃² correlates with the conditional score of q(z2 | z1) that detaching each site's
    parameters leaves in the path term, so that shortcut is biased here; the replayed guide
    is not (``test_hierarchical_values_and_dreg_gradient``)."""
    pair = Hierarchical()
    x = torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64)
    params = [getattr(pair, name) for name in Hierarchical.names[2:]]
    k, particles = 4, 64

    def detached_sites() -> torch.Tensor:
        drawn = draw_particles(pair.model, pair.guide, (x,), {}, k * particles, 1)
        log_q = drawn.site_total(drawn.guide_latents, detach=True)
        log_weights = (drawn.log_lik + drawn.log_prior - log_q).reshape(particles, k, -1)
        squared = torch.softmax(log_weights.detach(), 1).square()
        return exact_grad(-(squared * log_weights).sum((1, 2)).mean(), params)

    naive = draws(detached_sites, 100)
    iwae = grad_draws(_estimator("iwae", k=k, particles=particles), pair, x, 100, params)
    difference = naive.mean(0) - iwae.mean(0)
    se = (naive.var(0) / 100 + iwae.var(0) / 100).sqrt()
    assert (difference.abs() > NUM_SE * se).any(), (difference / se).tolist()


def test_hierarchical_values_and_dreg_gradient():
    pair = Hierarchical()
    x = torch.tensor(HIERARCHICAL_DATA, dtype=torch.float64)
    params = list(pair.parameters())
    exact = -pair.elbo(x).sum().detach()
    for name in ("trace", "meanfield", "stl"):
        assert_mean_matches(
            loss_draws(_estimator(name, particles=64), pair, x, 40), exact, what=name
        )
    iwae = grad_draws(_estimator("iwae", k=4, particles=32), pair, x, 40, params)
    dreg = grad_draws(_estimator("dreg", k=4, particles=32), pair, x, 40, params)
    assert_same_mean(dreg, iwae, what="hierarchical")


# ----------------------------------------------------------------------------- unguided latents
# Pyro's check_model_guide_match warns "Found vars in model but not guide" under validation
# (the suite turns warnings into errors); these pairs leave u out of the guide on purpose.


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_unguided_latent_single_draw_matches_the_closed_form(beta):
    """Every estimator at K = 1 (iwae and dreg too): mean loss and gradient equal the closed-form
    β-ELBO of a pair whose guide leaves u to its prior. Any log p(u) left in the weight (a
    −(1 − β) log p(u) at β ≠ 1, or a fresh u in DReG's second model run) shifts the mean."""
    pair = Unguided()
    x = torch.tensor(UNGUIDED_DATA, dtype=torch.float64)
    params = list(pair.parameters())
    value = -pair.elbo(x, beta).sum()
    expected = torch.cat([value.detach().reshape(1), exact_grad(value, params)])
    with pyro.validation_enabled(False):
        for name in ONE_SAMPLE:
            samples = value_and_grad_draws(
                _estimator(name, particles=64, beta=beta), pair, x, 40, params
            )
            assert_mean_matches(samples, expected, what=f"{name}, beta={beta}")


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_unguided_latent_importance_weighted_matches_quadrature(beta):
    """K = 2: value and gradient of iwae and dreg against the K-sample β-bound by Gauss–Hermite
    quadrature over the four normals behind (z_1, z_2, u_1, u_2) (16 nodes each; the change
    from 12 nodes is the quadrature's error estimate)."""
    pair = Unguided()
    x = torch.tensor(UNGUIDED_DATA, dtype=torch.float64)
    params = list(pair.parameters())
    exact, error = quadrature_with_error(
        lambda nodes: pair.iwae_bound(x, 2, beta, nodes), (12, 16), params
    )
    with pyro.validation_enabled(False):
        for name in ("iwae", "dreg"):
            samples = value_and_grad_draws(
                _estimator(name, k=2, particles=32, beta=beta), pair, x, 40, params
            )
            assert_mean_matches(samples, -exact, extra_se=error, what=f"{name}, beta={beta}")


def test_unguided_latent_values_are_equal_across_estimators_draw_for_draw():
    """DReG's second model run reuses the unguided draws: its value is iwae's, and stl's is
    trace's, on the same random numbers; ``loss`` equals ``differentiable_loss``."""
    pair = Unguided()
    x = torch.tensor(UNGUIDED_DATA, dtype=torch.float64)
    with pyro.validation_enabled(False):
        for k, pairs in ((3, (("dreg", "iwae"),)), (1, (("stl", "trace"), ("dreg", "trace")))):
            for one, other in pairs:
                values = []
                for name in (one, other):
                    pyro.set_rng_seed(11)
                    values.append(
                        _estimator(name, k=k, particles=4)
                        .differentiable_loss(pair.model, pair.guide, x)
                        .item()
                    )
                pyro.set_rng_seed(11)
                values.append(_estimator(one, k=k, particles=4).loss(pair.model, pair.guide, x))
                assert values == pytest.approx([values[0]] * 3, rel=ROUNDING), (one, other)


def test_unguided_latent_that_is_not_reparameterizable_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            u = pyro.sample("u", dist.Bernoulli(0.5 * x.new_ones(())))
            pyro.sample("x", dist.Normal(z + u, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))

    with (
        pytest.raises(
            ValueError,
            match="model site 'u' \\(Bernoulli\\) is not sampled by the "
            "guide and not reparameterizable",
        ),
        pyro.validation_enabled(False),
    ):
        _estimator("trace").loss(model, guide, torch.zeros(3))


def test_guide_latent_missing_from_the_model_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("v", dist.Normal(x.new_zeros(()), 1.0))

    with (
        pytest.raises(
            ValueError,
            match=r"guide sample sites \['v'\] are not latent sample "
            "sites of the model",
        ),
        pyro.validation_enabled(False),
    ):
        _estimator("iwae", k=2).loss(model, guide, torch.zeros(3))


# ----------------------------------------------------------------------------- scale factors


def _scaled(fn: Callable, scale: float) -> Callable:
    return pyro.poutine.scale(fn, scale=scale)


def test_a_common_scale_factor_multiplies_every_estimator():
    """poutine.scale(s) on the whole model and guide: s × the loss and gradients of the unscaled
    pair on the same random numbers (float64 rounding tolerance)."""
    lg = _pair(guide="full")
    x = _data(lg)
    params = _params(lg)
    scale = 2.5
    for name in ONE_SAMPLE:
        k = 3 if name in ("iwae", "dreg") else 1
        rows = []
        scaled = SimpleNamespace(model=_scaled(lg.model, scale), guide=_scaled(lg.guide, scale))
        for pair in (lg, scaled):
            pyro.set_rng_seed(4)
            rows.append(
                value_and_grad_draws(_estimator(name, k=k, particles=3), pair, x, 1, params)
            )
        torch.testing.assert_close(rows[1], scale * rows[0], rtol=ROUNDING, atol=ROUNDING)


class Subsampled(Hierarchical):
    """``Hierarchical`` with the data plate subsampled (B of N datapoints, scale N/B), drawn by
    the guide and replayed by the model."""

    batch = 2

    def model(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], subsample_size=self.batch) as index:
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(()), 1.0))
            z2 = pyro.sample("z2", dist.Normal(self.a * z1, 1.0))
            pyro.sample("x", dist.Normal(z2, self.log_sigma.exp()), obs=x[index])

    def guide(self, x: torch.Tensor) -> None:
        with pyro.plate("data", x.shape[0], subsample_size=self.batch) as index:
            z1 = pyro.sample("z1", dist.Normal(self.m1 + self.r1 * x[index], self.log_s1.exp()))
            pyro.sample(
                "z2", dist.Normal(self.c * z1 + self.m2 + self.r2 * x[index], self.log_s2.exp())
            )


def test_a_subsampled_data_plate_is_scaled_and_replayed_on_the_same_subsample():
    """trace and meanfield equal Pyro's Trace_ELBO and TraceMeanField_ELBO (which scale each
    site by N/B) on the same random numbers; stl's value is trace's and dreg's is iwae's, so
    their second guide and model runs used the same subsample."""
    pair = Subsampled()
    x = torch.tensor(HIERARCHICAL_DATA + (0.3, -0.4), dtype=torch.float64)
    params = list(pair.parameters())
    for ours, pyros in (("trace", Trace_ELBO), ("meanfield", TraceMeanField_ELBO)):
        pyro.set_rng_seed(2)
        mine = value_and_grad_draws(_estimator(ours, particles=3), pair, x, 1, params)
        pyro.set_rng_seed(2)
        reference = pyros(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
        theirs = value_and_grad_draws(reference, pair, x, 1, params)
        torch.testing.assert_close(mine, theirs, rtol=ROUNDING, atol=ROUNDING)
    for one, other, k in (("stl", "trace", 1), ("dreg", "iwae", 3)):
        values = []
        for name in (one, other):
            pyro.set_rng_seed(2)
            values.append(
                _estimator(name, k=k, particles=3)
                .differentiable_loss(pair.model, pair.guide, x)
                .item()
            )
        assert values[0] == pytest.approx(values[1], rel=ROUNDING), (one, other)


@pytest.mark.parametrize(
    "where, message",
    [
        ("model", "guide site 'z' has scale 1 but model site 'z' has scale 0.5"),
        ("latent", "model site 'x' has scale 1 but model site 'z' has scale 0.5"),
        ("tensor", "model site 'z' has a scale tensor of shape \\[3\\]"),
    ],
)
def test_unequal_scale_factors_weight_each_site_at_one_draw_and_are_refused_inside_a_sum(
    where, message
):
    """With one draw inside the log every estimator weights each site's term by its own scale
    factor, as Pyro's Trace_ELBO does (the same loss on the same draws); the importance-weighted
    bounds with K > 1 refuse, naming the site, since a per-site weight has no meaning inside
    the log of a sum."""
    lg = _pair()
    x = _data(lg)
    model, guide = lg.model, lg.guide
    if where == "model":
        model = _scaled(lg.model, 0.5)
    elif where == "tensor":
        model, guide = (
            _scaled(fn, torch.full((3,), 2.0, dtype=torch.float64)) for fn in (lg.model, lg.guide)
        )
    else:

        def model(x):
            with pyro.plate("data", x.shape[0]):
                with pyro.poutine.scale(scale=0.5):
                    z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([2]).to_event(1))
                pyro.sample("x", dist.Normal(z @ lg.weight.T + lg.bias, 1.0).to_event(1), obs=x)

    pyro.set_rng_seed(5)
    reference = pyro.infer.Trace_ELBO(max_plate_nesting=1).loss(model, guide, x)
    for name in ("trace", "iwae", "stl", "dreg"):
        pyro.set_rng_seed(5)
        assert _estimator(name).loss(model, guide, x) == pytest.approx(reference, rel=1e-9)
    for name in ("iwae", "dreg", "vimco"):
        with pytest.raises(ValueError, match=message):
            _estimator(name, k=3).loss(model, guide, x)


# ----------------------------------------------------------------------------- knobs, β, warm-up


def test_beta_zero_trace_is_the_expected_log_likelihood():
    lg = _pair()
    x = _data(lg)
    estimator = _estimator("trace", particles=64, beta=0.0)
    losses = loss_draws(estimator, lg, x, 40)
    assert_mean_matches(losses, -expected_log_lik(lg, x).sum().detach(), what="beta=0")
    estimator.beta = 1.0
    assert_mean_matches(loss_draws(estimator, lg, x, 40), -beta_elbo(lg, x).sum().detach())


def test_linear_warmup():
    schedule = LinearWarmup(10, start=0.1, end=0.5)
    assert [schedule(step) for step in (0, 5, 10, 11, 1000)] == pytest.approx(
        [0.1, 0.3, 0.5, 0.5, 0.5]
    )
    assert LinearWarmup(4)(2) == 0.5
    for constant in (LinearWarmup(None, end=0.3), LinearWarmup(0, end=0.3)):
        assert constant(0) == constant(99) == 0.3
    estimator = _estimator("meanfield")
    estimator.beta = LinearWarmup(4)(1)
    assert estimator.beta == 0.25
    with pytest.raises(ValueError, match="steps"):
        LinearWarmup(-1)
    with pytest.raises(ValueError, match="start"):
        LinearWarmup(3, start=-0.1)
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedule(-1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(name="trace", importance_samples=5),
            "trace averages particles outside the log.*use iwae.*num_particles=5",
        ),
        (
            dict(name="meanfield", importance_samples=5),
            "meanfield averages particles outside the "
            "log.*use iwae for importance samples "
            "inside it",
        ),
        (dict(name="stl", importance_samples=2), "use dreg"),
        (dict(name="iwae", num_particles=0), "num_particles must be an integer >= 1"),
        (dict(name="dreg", importance_samples=0), "importance_samples must be an integer >= 1"),
        (dict(name="iwae", beta=-1.0), "beta must be a finite number >= 0"),
        (dict(name="trace", beta=math.nan), "beta must be a finite number >= 0"),
        (dict(name="elbo"), "unknown estimator 'elbo': choose one of trace, meanfield, iwae"),
    ],
)
def test_bad_combinations_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_estimator(**kwargs)


def test_names_classes_and_settable_beta():
    classes = (
        TraceELBO,
        MeanFieldELBO,
        ImportanceWeightedELBO,
        StickingTheLandingELBO,
        DoublyReparameterizedELBO,
    )
    for name, cls in zip(ONE_SAMPLE, classes):
        estimator = make_estimator(name, num_particles=2, beta=0.5)
        assert type(estimator) is cls and isinstance(estimator, pyro.infer.ELBO)
        assert (estimator.num_particles, estimator.importance_samples, estimator.beta) == (
            2,
            1,
            0.5,
        )
    estimator = make_estimator("dreg", importance_samples=8)
    estimator.beta = 0
    assert estimator.beta == 0.0 and isinstance(estimator.beta, float)
    with pytest.raises(ValueError, match="beta"):
        estimator.beta = -0.5


def test_non_reparameterized_guide_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.5))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(0.3))

    # a discrete site: trace and vimco sample it with a score-function term, the others refuse
    for name in ("meanfield", "iwae", "stl", "dreg"):
        with pytest.raises(ValueError, match="not reparameterizable"):
            _estimator(name).loss(model, guide, torch.zeros(3))

    def poisson_guide(x):  # no finite support: nothing can score it
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Poisson(torch.ones(x.shape[0])))

    with pytest.raises(ValueError, match="not reparameterizable"):
        _estimator("trace").loss(model, poisson_guide, torch.zeros(3))


# ----------------------------------------------------------------------------- SVI and nn.Module


def _binary_data(num_data: int = 32, dim: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    probs = torch.linspace(0.05, 0.95, dim).expand(num_data, dim)
    return torch.bernoulli(probs, generator=generator)


@pytest.mark.parametrize("name", ONE_SAMPLE)
def test_svi_lowers_the_loss(name):
    vae = VAE(12, 2, (8,))
    x = _binary_data()
    k = 3 if name in ("iwae", "dreg") else 1
    estimator = make_estimator(name, num_particles=2, importance_samples=k)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), estimator)
    losses = [svi.step(x) for _ in range(40)]
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) < sum(losses[:5]) - 5 * 5, losses


@pytest.mark.parametrize("name", ONE_SAMPLE)
def test_estimator_as_an_nn_module_loss(name):
    vae = VAE(12, 2, (8,))
    x = _binary_data(8)
    k = 3 if name in ("iwae", "dreg") else 1
    loss_fn = make_estimator(name, num_particles=2, importance_samples=k)(vae.model, vae.guide)
    assert isinstance(loss_fn, nn.Module)
    loss = loss_fn(x)
    loss.backward()
    grads = [p.grad for p in vae.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(
        g.abs().sum() > 0 for g in (vae.encoder.head.weight.grad, vae.decoder.net[-1].weight.grad)
    )


# ----------------------------------------------------------------------------- benchmark smoke test


def test_compare_estimators_benchmark_smoke(bench, tmp_path):
    out = tmp_path / "out"
    assert (
        bench.main(
            [
                "--estimators",
                "stl",
                "dreg",
                "--seeds",
                "0",
                "--time-budget",
                "0.3",
                "--importance-samples",
                "3",
                "--warmup",
                "5",
                "--eval-particles",
                "20",
                "--curve-particles",
                "5",
                "--snr-draws",
                "3",
                "--snr-ks",
                "1",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    names = {
        "table.md",
        "runs.csv",
        "summary.csv",
        "results.json",
        "log_px_vs_epoch.png",
        "snr_vs_k.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    table = (out / "table.md").read_text()
    assert "| stl |" in table and "| dreg (K=3) |" in table


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--time-budget", "0", "argument --time-budget: expected a finite number > 0, got 0"),
        ("--time-budget", "nan", "argument --time-budget: expected a finite number > 0, got nan"),
        ("--warmup", "-1", "argument --warmup: expected a whole number >= 0, got -1"),
        ("--warmup", "2.5", "argument --warmup: expected a whole number, got '2.5'"),
        ("--beta", "-0.5", "argument --beta: expected a finite number >= 0, got -0.5"),
        ("--beta", "inf", "argument --beta: expected a finite number >= 0, got inf"),
        ("--lr", "0", "argument --lr: expected a finite number > 0, got 0"),
        ("--snr-draws", "1", "argument --snr-draws: expected a whole number >= 2, got 1"),
        ("--seeds", "-1", "argument --seeds: seed must be a whole number in 0..4294967295"),
        ("--epochs", "0", "argument --epochs: expected a whole number >= 1, got 0"),
    ],
)
def test_compare_estimators_bad_options_give_one_line_and_exit_2(
    bench, tmp_path, capsys, option, value, message
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bench.main([option, value, "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_compare_estimators_bad_data_dir_is_one_line_before_any_output(bench, tmp_path, capsys):
    out = tmp_path / "out"
    assert bench.main(["--data-dir", str(tmp_path / "missing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compare_estimators.py: error: data_dir " in err, err
    assert not out.exists()


def test_compare_estimators_curves_are_matched_by_epoch(bench):
    """Two seeds that stopped at different epochs (a time budget): the statistics use the
    epochs both evaluated, each seed's value at that epoch."""
    per_seed = [
        [(0, -30.0), (10, -25.0), (20, -24.0), (25, -23.5)],
        [(0, -31.0), (10, -26.0), (20, -23.0), (23, -22.0)],
    ]
    epochs, mean, std = bench.curve_statistics(per_seed)
    assert epochs == [0, 10, 20]
    torch.testing.assert_close(mean, torch.tensor([-30.5, -25.5, -23.5], dtype=torch.float64))
    torch.testing.assert_close(std, torch.full((3,), math.sqrt(0.5), dtype=torch.float64))
    epochs, mean, std = bench.curve_statistics(per_seed[:1])
    assert epochs == [0, 10, 20, 25] and mean.tolist() == [-30.0, -25.0, -24.0, -23.5]
    assert std.isnan().all()
