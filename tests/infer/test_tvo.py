"""``tvo`` (the thermodynamic variational objective) on the linear-Gaussian model (float64):
value and gradient against the formula written with torch alone on the same draws; its
expectation against the thermodynamic Riemann sum in closed form (the geometric path between two
Gaussians is Gaussian); the exact posterior as guide gives log p(x) on every draw; its options
refused in one line; a factor-analysis fit that reaches maximum likelihood; Pyro's SVI and the
command line take it.

Expectations are compared within ``NUM_SE`` = 5 standard errors estimated from the draws.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from gradients import draws_and_eps, value_and_grad
from linear_gaussian import LinearGaussian
from threads import one_thread
from torch.distributions import Normal
from user_models import FactorAnalysis, fa_data

from pyro_vae import fit
from pyro_vae.app.cli import main
from pyro_vae.infer import ThermodynamicVariationalObjective, make_estimator
from pyro_vae.infer.tvo import integration_points
from pyro_vae.models.vae import VAE
from pyro_vae.util.errors import ConfigError

NUM_SE = 5.0
ROUNDING = 1e-10


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _pair(**guide) -> LinearGaussian:
    """D = 3, d = 2; by default a shifted, over-dispersed diagonal guide."""
    guide = guide or dict(guide="diagonal", loc_shift=torch.tensor([0.3, -0.2]), scale_factor=1.3)
    return LinearGaussian.random(3, 2, noise_scale=0.7, **guide)


def _data(lg: LinearGaussian) -> torch.Tensor:
    return lg.sample(3, torch.Generator().manual_seed(1))


def _tvo(k: int, particles: int = 1, beta: float = 1.0, **options):
    return make_estimator("tvo", particles, k, beta, max_plate_nesting=1, options=options or None)


def _torch_log_weights(lg, x, eps, beta):
    """log w_β of the draws z = loc + scale · eps (``[P, K, N, d]`` -> ``[P, K, N]``)."""
    q = lg.guide_distribution(x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    z = loc + scale * eps
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = Normal(z @ lg.weight.T + lg.bias, lg.noise_scale).log_prob(x).sum(-1)
    return log_lik + beta * (log_prior - log_q)


def _riemann_sum(log_w: torch.Tensor, points) -> torch.Tensor:
    """Σ_j (λ_{j+1} − λ_j) Σ_k w_k^λj log w_k / Σ_k w_k^λj, written out interval by interval."""
    total = 0
    for start, end in zip(points[:-1], points[1:]):
        normalized = torch.exp(start * log_w - torch.logsumexp(start * log_w, 1, keepdim=True))
        total = total + (end - start) * (normalized * log_w).sum(1)
    return total


def _expected_log_normal(mean, precision, at_mean, at_cov):
    """E log N(z; mean, precision⁻¹) for z ~ N(at_mean, at_cov), batched over datapoints."""
    diff = (at_mean - mean).unsqueeze(-1)
    trace = (precision @ at_cov).diagonal(dim1=-2, dim2=-1).sum(-1)
    quad = (diff.mT @ precision @ diff).reshape(diff.shape[:-2])
    d = mean.shape[-1]
    return -0.5 * (d * math.log(2 * math.pi) - torch.logdet(precision) + trace + quad)


def _exact_tvo(lg, x, points) -> torch.Tensor:
    """The left Riemann sum of E_{π_λ}[log w] per datapoint in closed form: π_λ ∝ q^(1−λ)
    p(z|x)^λ is the Gaussian of precision (1−λ) Λ_q + λ Λ_post, and log w = log p(x) +
    log p(z|x) − log q(z|x) is quadratic in z."""
    with torch.no_grad():
        posterior, q = lg.posterior(x), lg.guide_distribution(x)
        q_loc, q_precision = q.base_dist.loc, torch.diag_embed(q.base_dist.scale**-2)
        p_loc, p_precision = posterior.loc, posterior.precision_matrix
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        for start, end in zip(points[:-1], points[1:]):
            cov = torch.linalg.inv((1 - start) * q_precision + start * p_precision)
            mixed = (1 - start) * q_precision @ q_loc.unsqueeze(-1)
            mean = (cov @ (mixed + start * p_precision @ p_loc.unsqueeze(-1))).squeeze(-1)
            expected = (
                lg.log_marginal(x)
                + _expected_log_normal(p_loc, p_precision, mean, cov)
                - _expected_log_normal(q_loc, q_precision, mean, cov)
            )
            total = total + (end - start) * expected
        return total


# ----------------------------------------------------------------------------- same draws


@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("partitions, first_point", [(1, 0.1), (2, 0.5), (5, 0.1), (20, 0.01)])
def test_value_and_gradient_equal_the_formula_on_the_same_draws(partitions, first_point, beta):
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    estimator = _tvo(4, particles=3, beta=beta, partitions=partitions, first_point=first_point)
    pyro.set_rng_seed(8)
    particles, eps = draws_and_eps(estimator, lg, x)
    ours = value_and_grad(estimator.loss_of(particles), params)
    log_w = _torch_log_weights(lg, x, eps, beta)
    bound = _riemann_sum(log_w, estimator.points)
    reference = value_and_grad(-bound.sum(-1).mean(0), params)
    torch.testing.assert_close(ours, reference, rtol=ROUNDING, atol=ROUNDING)
    # the λ_0 = 0 term is the mean log-weight, and every later one at least that (the weights
    # w^λ favour the larger log-weights), so on every set of draws the estimate is at least
    # the ELBO's estimate from the same draws, with equality for one partition
    elbo = log_w.mean(1)
    if partitions == 1:
        torch.testing.assert_close(bound, elbo, rtol=ROUNDING, atol=ROUNDING)
    assert (bound >= elbo - ROUNDING).all()


def test_the_exact_posterior_as_guide_gives_log_px_on_every_draw():
    lg = _pair(guide="full")  # q(z|x) = p(z|x): every log-weight is log p(x)
    x = _data(lg)
    estimator = _tvo(6, particles=2, partitions=5)
    pyro.set_rng_seed(3)
    particles = estimator.draw(lg.model, lg.guide, (x,), {})
    with torch.no_grad():
        per_datapoint = estimator.objective(particles, False).per_datapoint
    expected = lg.log_marginal(x).detach().expand_as(per_datapoint)
    torch.testing.assert_close(per_datapoint, expected, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- expectations


def test_finer_partitions_are_tighter_lower_bounds_in_closed_form():
    lg = _pair()
    x = _data(lg)
    log_px = lg.log_marginal(x).detach()
    values = [_exact_tvo(lg, x, integration_points(s, 0.05)) for s in (1, 2, 5, 20, 100)]
    elbo = log_px - lg.kl_guide_to_posterior(x).detach()
    torch.testing.assert_close(values[0], elbo, rtol=1e-10, atol=1e-10)  # one partition: ELBO
    for coarser, finer in zip(values, values[1:]):  # the integrand rises with λ
        assert (finer > coarser).all()
    assert (values[-1] < log_px).all() and (log_px - values[-1]).max() < 0.05


def test_many_draws_estimate_the_closed_form_riemann_sum():
    """Self-normalized importance sampling is consistent: at K = 5000 the estimate's mean over
    20 particles matches the closed form within NUM_SE standard errors (its O(1/K) bias is far
    smaller than those errors here)."""
    lg = _pair()
    x = _data(lg)
    estimator = _tvo(5000, particles=20, partitions=5, first_point=0.1)
    pyro.set_rng_seed(0)
    particles, _ = draws_and_eps(estimator, lg, x)
    with torch.no_grad():
        totals = estimator.objective(particles, False).per_datapoint.sum(-1)  # [P]
    exact = _exact_tvo(lg, x, estimator.points).sum()
    se = totals.std() / math.sqrt(totals.shape[0])
    assert abs(totals.mean() - exact) < NUM_SE * se, (totals.mean(), exact, se)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options, message",
    [
        ({"partitions": 0}, r"tvo's partitions must be a whole number >= 1, got 0"),
        ({"partitions": 2.5}, r"tvo's partitions must be a whole number >= 1, got 2.5"),
        ({"first_point": 1.0}, r"tvo's first_point must be a number in \(0, 1\), got 1.0"),
        ({"first_point": "x"}, r"tvo's first_point must be a number in \(0, 1\), got 'x'"),
        ({"points": [0, 1]}, r"tvo has no option 'points': its options are partitions, first_p"),
    ],
)
def test_bad_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message):
        make_estimator("tvo", 1, 4, options=options)


def test_the_points_are_log_uniform_from_the_first_point_to_one():
    assert integration_points(1, 0.3) == (0.0, 1.0)
    points = integration_points(4, 0.001)
    assert points[0] == 0.0 and points[-1] == 1.0
    assert points[1:] == pytest.approx((0.001, 0.01, 0.1, 1.0))
    estimator = make_estimator("tvo", 1, 3, options={"partitions": 3, "first_point": 0.2})
    assert isinstance(estimator, ThermodynamicVariationalObjective)
    assert (estimator.partitions, estimator.first_point) == (3, 0.2)


# ----------------------------------------------------------------------------- training


def test_pyros_svi_trains_a_vae_with_it():
    torch.manual_seed(0)
    vae = VAE(12, 2, (8,))
    x = torch.bernoulli(
        torch.linspace(0.05, 0.95, 12).expand(32, 12), generator=torch.Generator().manual_seed(2)
    )
    svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), _tvo(3, 2))
    losses = torch.tensor([svi.step(x) for _ in range(40)])
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean() - 5, losses


def test_factor_analysis_trained_with_it_reaches_the_maximum_likelihood_fit():
    """The guide family holds the exact posterior, where the bound equals log p(x): the trained
    pair's exact log-likelihood comes within 0.01 nats per datapoint of scikit-learn's."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    x = fa_data()
    reference = SkFA(n_components=2, tol=1e-5, max_iter=20000).fit(x).score(x)
    model = FactorAnalysis()
    fit(
        model,
        x,
        elbo="tvo",
        elbo_options={"partitions": 3},
        final_particles=0,
        progress=False,
        epochs=400,
        batch_size=400,
        lr=0.05,
        particles=4,
        importance_samples=4,
    )
    exact = model.exact_log_likelihood(torch.as_tensor(x)).mean().item()
    assert reference - 0.01 <= exact <= reference + 1e-3, (exact, reference)


def test_the_command_line_trains_with_it_and_refuses_bad_options(tmp_path, capsys):
    small = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--quiet", "--elbo", "tvo"]
    out = tmp_path / "run"
    options = '{"partitions": 3, "first_point": 0.05}'
    run = ["train", *small, "--importance-samples", "3", "--elbo-options", options]
    assert main([*run, "--out", str(out)]) == 0
    assert '"elbo": "tvo"' in (out / "config.json").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["train", *small, "--elbo-options", '{"partitions": 0}', "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tvo's partitions must be a whole number >= 1, got 0" in err[0]
    assert not bad.exists()
