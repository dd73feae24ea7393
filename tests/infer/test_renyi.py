"""``renyi`` (the variational Rényi bound of K draws) and ``ciwae`` (λ ELBO + (1 − λ) IWAE of the
same draws) against torch-only references on the linear-Gaussian model (float64), their options
refused in one line, and a factor-analysis fit that reaches maximum likelihood.

Same-draw checks recompute the bound with torch.distributions from the draws' standard normals
(no Pyro) and compare value and gradient to float64 rounding. Expectations are compared within
``NUM_SE`` = 5 standard errors estimated from the draws themselves.
"""

from __future__ import annotations

import json
import math

import pyro
import pytest
import torch
from gradients import draws_and_eps, value_and_grad
from linear_gaussian import LinearGaussian
from threads import one_thread
from torch.distributions import Normal
from user_models import FactorAnalysis, fa_data

from pyro_vae import TrainConfig, fit
from pyro_vae.app.cli import main
from pyro_vae.infer import (
    CombinedImportanceWeightedELBO,
    VariationalRenyiBound,
    estimator_options,
    make_estimator,
)
from pyro_vae.infer.bounds import log_weights
from pyro_vae.infer.renyi import renyi_bound
from pyro_vae.models.vae import VAE
from pyro_vae.util.errors import CheckpointError, ConfigError

NUM_SE = 5.0
ROUNDING = 1e-10
ALPHAS = (-math.inf, -1.0, 0.0, 0.5, 1.0, 2.0)
#: full-batch training of the factor-analysis pair, K = 4 draws inside the log
FA_FIT = dict(epochs=400, batch_size=400, lr=0.05, particles=4, importance_samples=4)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _pair(latent_dim: int = 2) -> LinearGaussian:
    """D = 3; a shifted, over-dispersed diagonal guide."""
    shift = torch.tensor([0.3, -0.2][:latent_dim])
    return LinearGaussian.random(
        3, latent_dim, noise_scale=0.7, guide="diagonal", loc_shift=shift, scale_factor=1.3
    )


def _data(lg: LinearGaussian) -> torch.Tensor:
    return lg.sample(3, torch.Generator().manual_seed(1))


def _estimator(name: str, k: int, particles: int = 1, beta: float = 1.0, **options):
    return make_estimator(name, particles, k, beta, max_plate_nesting=1, options=options or None)


def _torch_log_weights(lg, x, eps, beta, stop_score=False, stop_draw=False):
    """log w_β of the draws z = loc + scale · eps, ``[..., N]``, with torch.distributions;
    ``stop_score`` holds q's parameters fixed in log q (its path through z stays),
    ``stop_draw`` detaches z (and log q altogether)."""
    q = lg.guide_distribution(x)
    loc, scale = q.base_dist.loc, q.base_dist.scale
    z = loc + scale * eps
    if stop_draw:
        z = z.detach()
    if stop_score or stop_draw:
        loc, scale = loc.detach(), scale.detach()
    log_q = Normal(loc, scale).log_prob(z).sum(-1)
    if stop_draw:
        log_q = log_q.detach()
    log_prior = Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = Normal(z @ lg.weight.T + lg.bias, lg.noise_scale).log_prob(x).sum(-1)
    return log_lik + beta * (log_prior - log_q)


def _vr(log_w: torch.Tensor, alpha: float) -> torch.Tensor:
    """The textbook formula over dim 1 (no stabilization beyond logsumexp)."""
    if alpha == -math.inf:
        return log_w.max(1).values
    if alpha == 1:
        return log_w.mean(1)
    k = log_w.shape[1]
    return (torch.logsumexp((1 - alpha) * log_w, 1) - math.log(k)) / (1 - alpha)


def _assert_means_match(samples: torch.Tensor, expected: torch.Tensor, extra_se=0.0, what=""):
    mean = samples.mean(0)
    se = (samples.var(0) / samples.shape[0] + torch.as_tensor(extra_se) ** 2).sqrt()
    bad = (mean - expected).abs() > NUM_SE * se + 1e-9 * (1 + expected.abs())
    assert not bad.any(), (what, mean[bad].tolist(), expected[bad].tolist(), se[bad].tolist())


# ----------------------------------------------------------------------------- same draws


@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("alpha", ALPHAS)
def test_renyi_value_and_gradient_equal_the_formula_on_the_same_draws(alpha, beta):
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    estimator = _estimator("renyi", 4, particles=3, beta=beta, alpha=alpha)
    pyro.set_rng_seed(5)
    particles, eps = draws_and_eps(estimator, lg, x)
    ours = value_and_grad(estimator.loss_of(particles), params)
    reference = -_vr(_torch_log_weights(lg, x, eps, beta), alpha).sum(-1).mean(0)
    torch.testing.assert_close(
        ours, value_and_grad(reference, params), rtol=ROUNDING, atol=ROUNDING
    )


@pytest.mark.parametrize("beta", [1.0, 0.4])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, -1.0])
def test_renyi_doubly_reparameterized_gradient_equals_its_formula_on_the_same_draws(alpha, beta):
    """The surrogate VR_α(lw(sg z)) + Σ_k sg(c_k) [lw^stl_k(z) − lw^stl_k(sg z)],
    c_k = (1 − β(1 − α)) w̃_k + β(1 − α) w̃_k², w̃ ∝ w^(1−α), written with torch alone."""
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    estimator = _estimator("renyi", 4, particles=3, beta=beta, alpha=alpha, gradient="dreg")
    pyro.set_rng_seed(6)
    particles, eps = draws_and_eps(estimator, lg, x)
    ours = value_and_grad(estimator.loss_of(particles), params)
    path = _torch_log_weights(lg, x, eps, beta, stop_score=True)
    fixed = _torch_log_weights(lg, x, eps, beta, stop_draw=True)
    power = 1 - alpha
    normalized = torch.softmax(power * fixed.detach(), 1)
    coefficient = (1 - beta * power) * normalized + beta * power * normalized.square()
    surrogate = _vr(fixed, alpha) + (coefficient * (path - fixed)).sum(1)
    reference = value_and_grad(-surrogate.sum(-1).mean(0), params)
    torch.testing.assert_close(ours, reference, rtol=ROUNDING, atol=ROUNDING)


def test_renyi_doubly_reparameterized_at_alpha_zero_is_dreg_on_the_same_draws():
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    renyi = _estimator("renyi", 4, particles=3, beta=0.4, alpha=0.0, gradient="dreg")
    pyro.set_rng_seed(9)
    particles = renyi.draw(lg.model, lg.guide, (x,), {})
    ours = value_and_grad(renyi.loss_of(particles), params)
    dreg = value_and_grad(_estimator("dreg", 4, 3, beta=0.4).loss_of(particles), params)
    torch.testing.assert_close(ours, dreg, rtol=ROUNDING, atol=ROUNDING)


def test_renyi_on_the_same_draws_orders_by_alpha_and_equals_iwae_at_zero():
    """The power mean of order 1 − α falls as α rises: max ≥ α = −1 ≥ IWAE ≥ α = ½ ≥ mean
    log-weight ≥ α = 2 for every particle and datapoint; α = 0 is iwae's value exactly."""
    lg = _pair()
    x = _data(lg)
    k = 5
    pyro.set_rng_seed(7)
    with torch.no_grad():
        particles = _estimator("renyi", k, particles=4).draw(lg.model, lg.guide, (x,), {})
        values = [
            _estimator("renyi", k, particles=4, alpha=a).objective(particles, False).per_datapoint
            for a in ALPHAS
        ]
        iwae = _estimator("iwae", k, particles=4).objective(particles, False).per_datapoint
        mean = log_weights(particles, 1.0, k).mean(1)
    assert torch.equal(values[ALPHAS.index(0.0)], iwae)
    torch.testing.assert_close(values[ALPHAS.index(1.0)], mean, rtol=0, atol=0)
    for high, low in zip(values, values[1:]):
        assert (high >= low - 1e-12).all() and (high > low).any()


def test_renyi_tends_to_the_mean_log_weight_as_alpha_tends_to_one_in_float32():
    """L_α − L_1 ≈ (1 − α) Var_k(log w) / 2 as α → 1; in float32 the value keeps its precision
    (the plain formula, dividing a difference of logs near log K by 1 − α, loses 0.1 nats at
    1 − α = 1e-6 on weights like these)."""
    generator = torch.Generator().manual_seed(3)
    log_w = (-100 + 20 * torch.randn(2, 5, 3, generator=generator, dtype=torch.float64)) / 10
    mean = log_w.mean(1)
    half_variance = log_w.var(1, unbiased=False) / 2
    for gap in (1e-2, 1e-4, 1e-6):
        exact = _vr(log_w, 1 - gap)
        assert ((exact - mean) / gap - half_variance).abs().max() < 10 * gap + 1e-3, gap
        single = renyi_bound(log_w.float(), 1 - gap).double()
        assert (single - exact).abs().max() < 1e-4, (gap, (single - exact).abs().max())


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_ciwae_is_the_mix_of_the_elbo_and_iwae_on_the_same_draws(weight):
    """Value and gradient λ (1/K) Σ log w_k + (1 − λ) log (1/K) Σ w_k, by torch alone; and the
    value λ × renyi(α = 1) + (1 − λ) × iwae on the package's own draws."""
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    estimator = _estimator("ciwae", 4, particles=3, beta=0.7, elbo_weight=weight)
    pyro.set_rng_seed(8)
    particles, eps = draws_and_eps(estimator, lg, x)
    ours = value_and_grad(estimator.loss_of(particles), params)
    log_w = _torch_log_weights(lg, x, eps, 0.7)
    mix = weight * _vr(log_w, 1.0) + (1 - weight) * _vr(log_w, 0.0)
    reference = value_and_grad(-mix.sum(-1).mean(0), params)
    torch.testing.assert_close(ours, reference, rtol=ROUNDING, atol=ROUNDING)
    with torch.no_grad():
        parts = [
            _estimator(*spec, particles=3, beta=0.7, **options).objective(particles, False)
            for spec, options in ((("renyi", 4), {"alpha": 1.0}), (("iwae", 4), {}))
        ]
        combined = estimator.objective(particles, False).per_datapoint
    expected = weight * parts[0].per_datapoint + (1 - weight) * parts[1].per_datapoint
    torch.testing.assert_close(combined, expected, rtol=ROUNDING, atol=ROUNDING)


# ----------------------------------------------------------------------------- expectations


def _torch_reference(lg, x, k, alpha, replicates=100_000, seed=123):
    """Mean and SE of Σ_n VR_α of K draws from q, sampled by torch alone."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn(replicates, k, *x.shape[:1], lg.latent_dim, generator=generator)
    with torch.no_grad():
        total = _vr(_torch_log_weights(lg, x, eps.double(), 1.0), alpha).sum(-1)
    return total.mean(), total.std() / math.sqrt(replicates)


@pytest.mark.parametrize("alpha", [0.5, 2.0, -math.inf])
def test_renyi_loss_mean_is_the_expected_bound(alpha):
    lg = _pair()
    x = _data(lg)
    reference, reference_se = _torch_reference(lg, x, 3, alpha)
    estimator = _estimator("renyi", 3, particles=64, alpha="-inf" if alpha < 0 else alpha)
    with torch.no_grad():
        losses = torch.stack(
            [estimator.differentiable_loss(lg.model, lg.guide, x) for _ in range(40)]
        )
    _assert_means_match(-losses[:, None], reference.reshape(1), reference_se, f"alpha={alpha}")


def test_renyi_at_alpha_one_is_the_elbo_in_expectation_and_between_elbo_and_log_px():
    """α = 1: the closed-form ELBO log p(x) − KL(q ‖ p(z|x)); α = ½ lies significantly above it
    and below log p(x)."""
    lg = _pair()
    x = _data(lg)
    elbo = (lg.log_marginal(x) - lg.kl_guide_to_posterior(x)).sum().detach()
    log_px = lg.log_marginal(x).sum().detach()
    means = {}
    for alpha in (1.0, 0.5):
        estimator = _estimator("renyi", 4, particles=64, alpha=alpha)
        with torch.no_grad():
            bounds = -torch.stack(
                [estimator.differentiable_loss(lg.model, lg.guide, x) for _ in range(40)]
            )
        means[alpha] = (bounds.mean(), bounds.std() / math.sqrt(40))
    assert abs(means[1.0][0] - elbo) < NUM_SE * means[1.0][1], (means[1.0], elbo)
    assert means[0.5][0] - NUM_SE * means[0.5][1] > elbo
    assert means[0.5][0] + NUM_SE * means[0.5][1] < log_px


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_renyi_doubly_reparameterized_gradient_is_unbiased(beta):
    """gradient='dreg' and the reparameterization gradient of the same bound agree in
    expectation (40 calls of 64 particles each)."""
    lg = _pair()
    x = _data(lg)
    params = list(lg.parameters())
    means = []
    for gradient in ("reparameterized", "dreg"):
        estimator = _estimator("renyi", 3, particles=64, beta=beta, alpha=0.5, gradient=gradient)
        rows = torch.stack(
            [
                value_and_grad(estimator.differentiable_loss(lg.model, lg.guide, x), params)
                for _ in range(40)
            ]
        )
        means.append(rows)
    difference = means[0].mean(0) - means[1].mean(0)
    se = (means[0].var(0) / 40 + means[1].var(0) / 40).sqrt()
    assert (difference.abs() <= NUM_SE * se + 1e-9).all(), (difference, se)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("renyi", {"alpa": 0.5}, "renyi has no option 'alpa': its options are alpha, gradient"),
        ("renyi", {"beta": 0.5}, "renyi has no option 'beta'.*beta: an argument of its own"),
        ("renyi", {"alpha": "half"}, "renyi's alpha must be a real number or '-inf', got 'half'"),
        ("renyi", {"alpha": math.nan}, "renyi's alpha must be a real number"),
        ("renyi", {"alpha": math.inf}, "renyi's alpha must be a real number"),
        ("renyi", {"alpha": True}, "renyi's alpha must be a real number"),
        ("renyi", {"gradient": "score"}, "renyi's gradient must be one of reparameterized, dreg"),
        ("renyi", {"alpha": "-inf", "gradient": "dreg"}, "gradient='dreg' needs a finite alpha"),
        ("ciwae", {"elbo_weight": 1.5}, "ciwae's elbo_weight must be a number in \\[0, 1\\]"),
        ("ciwae", {"lam": 0.5}, "ciwae has no option 'lam': its options are elbo_weight"),
        ("iwae", {"alpha": 0.5}, "iwae has no option 'alpha': it takes no options"),
    ],
)
def test_bad_options_are_refused_in_one_line(name, options, message):
    with pytest.raises(ConfigError, match=message) as refusal:
        make_estimator(name, importance_samples=2, options=options)
    assert "\n" not in str(refusal.value)
    # a run's options are JSON's numbers: the config refuses a non-finite one before the class
    value = options.get("alpha")
    if isinstance(value, float) and not math.isfinite(value):
        message = r"the option 'alpha' of elbo_options=.* must be finite"
    with pytest.raises(ConfigError, match=message):
        TrainConfig(elbo=name, importance_samples=2, elbo_options=options)


def test_options_reach_the_classes_and_the_defaults_hold():
    assert estimator_options(VariationalRenyiBound) == ("alpha", "gradient")
    assert estimator_options(CombinedImportanceWeightedELBO) == ("elbo_weight",)
    renyi = make_estimator("renyi", importance_samples=3, options={"alpha": "-inf"})
    assert (renyi.alpha, renyi.gradient, make_estimator("renyi").alpha) == (
        -math.inf,
        "reparameterized",
        0.5,
    )
    assert make_estimator("ciwae", options={"elbo_weight": 0}).elbo_weight == 0.0
    assert make_estimator("ciwae").elbo_weight == 0.5


def test_the_dreg_gradient_refuses_enumerated_guide_sites_the_other_sums_them():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", pyro.distributions.Bernoulli(0.5 * x.new_ones(())))
            pyro.sample("x", pyro.distributions.Normal(2 * c - 1, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "c",
                pyro.distributions.Bernoulli(0.3 * x.new_ones(())),
                infer={"enumerate": "parallel"},
            )

    x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    exact = torch.logsumexp(
        torch.stack([Normal(-1.0, 1.0).log_prob(x), Normal(1.0, 1.0).log_prob(x)]), 0
    ) - math.log(2)
    for name, options in (("renyi", {"alpha": 0.5}), ("ciwae", {})):
        loss = _estimator(name, 2, **options).loss(model, guide, x)
        assert loss == pytest.approx(-exact.sum().item(), rel=1e-12), name
    with pytest.raises(ConfigError, match="gradient='dreg' cannot sum out"):
        _estimator("renyi", 2, gradient="dreg").differentiable_loss(model, guide, x)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    "name, options",
    [("renyi", {"alpha": 0.5, "gradient": "dreg"}), ("ciwae", {"elbo_weight": 0.5})],
)
def test_pyros_svi_trains_a_vae_with_them(name, options):
    torch.manual_seed(0)
    vae = VAE(12, 2, (8,))
    x = torch.bernoulli(
        torch.linspace(0.05, 0.95, 12).expand(32, 12), generator=torch.Generator().manual_seed(2)
    )
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 0.05}), _estimator(name, 3, 2, **options)
    )
    losses = torch.tensor([svi.step(x) for _ in range(40)])
    assert torch.isfinite(losses).all() and losses[-5:].mean() < losses[:5].mean() - 5, losses


@pytest.mark.parametrize(
    "name, options",
    [("renyi", {"alpha": 0.5, "gradient": "dreg"}), ("ciwae", {"elbo_weight": 0.5})],
)
def test_factor_analysis_trained_with_them_reaches_the_maximum_likelihood_fit(name, options):
    """The guide family holds the exact posterior, so each bound (≤ log p(x), equal to it at the
    posterior) is maximized at the maximum-likelihood fit: the trained pair's exact
    log-likelihood comes within 0.01 nats per datapoint of scikit-learn's (EM to convergence)."""
    from sklearn.decomposition import FactorAnalysis as SkFA

    x = fa_data()
    reference = SkFA(n_components=2, tol=1e-5, max_iter=20000).fit(x).score(x)
    model = FactorAnalysis()
    fit(model, x, elbo=name, elbo_options=options, final_particles=0, progress=False, **FA_FIT)
    exact = model.exact_log_likelihood(torch.as_tensor(x)).mean().item()
    assert reference - 0.01 <= exact <= reference + 1e-3, (exact, reference)


# ----------------------------------------------------------------------------- run folders


def test_elbo_options_are_saved_with_the_run_and_a_resume_may_not_change_them(tmp_path, capsys):
    options = {"alpha": 0.25, "gradient": "dreg"}
    config = TrainConfig(
        dataset=None,
        model=None,
        binarize="none",
        elbo="renyi",
        elbo_options=options,
        importance_samples=3,
        epochs=1,
        batch_size=20,
        final_particles=0,
    )
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    run = tmp_path / "run"
    x = fa_data(40)
    fit(FactorAnalysis(), x, config=config, run_dir=run, progress=False)
    saved = json.loads((run / "config.json").read_text())
    assert (saved["elbo"], saved["elbo_options"]) == ("renyi", options)
    files = _snapshot(run)
    changed = config.replace(epochs=2, elbo_options={"alpha": 0.5, "gradient": "dreg"})
    with pytest.raises(CheckpointError, match="differs from the one given"):
        fit(FactorAnalysis(), x, config=changed, run_dir=run, resume=True, progress=False)
    argv = ["train", "--resume", str(run), "--epochs", "2", "--elbo-options", '{"alpha": 0.5}']
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--elbo-options cannot change on --resume" in err, err
    assert _snapshot(run) == files
    resumed = config.replace(epochs=2)
    fit(FactorAnalysis(), x, config=resumed, run_dir=run, resume=True, progress=False)
    assert json.loads((run / "history.json").read_text())["epoch"] == [1, 2]


def _snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    "options, message",
    [
        ('{"alpha": "x"}', "renyi's alpha must be a real number or '-inf', got 'x'"),
        (
            '{"alpha": 0.5, "power": 2}',
            "renyi has no option 'power': its options are alpha, gradient",
        ),
        ("[0.5]", "argument --elbo-options: expected a JSON object"),
        ('{"alpha": 0.5', "argument --elbo-options: expected a JSON object"),
        ('{"alpha": -Infinity}', '-Infinity is not JSON: write a string such as "-inf"'),
        ('{"alpha": NaN}', "NaN is not JSON"),
    ],
)
def test_the_command_line_refuses_bad_elbo_options_in_one_line(tmp_path, capsys, options, message):
    out = tmp_path / "run"
    argv = [
        "train",
        "--elbo",
        "renyi",
        "--elbo-options",
        options,
        "--epochs",
        "1",
        "--out",
        str(out),
    ]
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and message in err, err
    assert not out.exists()
