"""Rate, distortion and ELBO surgery, checked against the closed forms of a linear-Gaussian
model. Monte Carlo tolerances are 4 standard errors, estimated from the samples (the
datapoints are independent)."""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from torch.distributions import Independent, Normal, kl_divergence
from torch.distributions.transforms import AffineTransform

from pyro_vae.app.cli import main
from pyro_vae.evaluate import format_rate_distortion, rate_distortion
from pyro_vae.evaluate.rate import CLOSED_FORM, MONTE_CARLO
from pyro_vae.util.errors import ConfigError

NUM_SE = 4.0


def _pair(**options) -> tuple[LinearGaussian, torch.Tensor]:
    """A diagonal guide, shifted and too wide, and 200 datapoints of the model."""
    options = {"guide": "diagonal", "loc_shift": 0.3, "scale_factor": 1.4, **options}
    lg = LinearGaussian.random(5, 3, **options)
    return lg, lg.sample(200, torch.Generator().manual_seed(1))


def _prior(lg: LinearGaussian) -> Independent:
    return Independent(Normal(torch.zeros(lg.latent_dim, dtype=torch.float64), 1.0), 1)


def _expected_log_lik(lg: LinearGaussian, x: torch.Tensor) -> torch.Tensor:
    """E_q log N(x; W z + b, σ² I) in closed form for the diagonal guide N(μ, diag s²)."""
    q = lg.guide_distribution(x).base_dist
    sigma2 = lg.noise_scale**2
    residual = (x - q.loc @ lg.weight.T - lg.bias).square().sum(-1)
    spread = (lg.weight.square() @ q.scale.square().T).sum(0)
    return -0.5 * lg.data_dim * torch.log(2 * math.pi * sigma2) - (residual + spread) / (2 * sigma2)


def _within_mc_error(difference: torch.Tensor) -> None:
    se = difference.std().item() / math.sqrt(difference.shape[0])
    assert abs(difference.mean().item()) < NUM_SE * se + 1e-12, (difference.mean(), se)


@torch.no_grad()
def test_closed_form_rate_and_distortion_against_the_exact_elbo():
    lg, x = _pair()
    result = rate_distortion(lg.model, lg.guide, x, num_particles=64, seed=0)
    exact_kl = kl_divergence(lg.guide_distribution(x), _prior(lg))
    assert result.methods == {"z": CLOSED_FORM}
    torch.testing.assert_close(result.rate, exact_kl, atol=1e-10, rtol=0)
    torch.testing.assert_close(result.kl_per_dim["z"].sum(), exact_kl.mean(), atol=1e-10, rtol=0)
    exact_elbo = _expected_log_lik(lg, x) - exact_kl
    torch.testing.assert_close(result.elbo, -(result.rate + result.distortion))
    _within_mc_error(result.elbo - exact_elbo)
    summary = result.summary()
    assert summary["sites"]["z"]["method"] == CLOSED_FORM
    assert "rate R" in format_rate_distortion(summary)


def _transformed_guide(lg: LinearGaussian):
    """The same guide written as an affine map of N(0, I): torch has no closed-form KL from
    it to the prior, so the rate is Monte Carlo."""

    def guide(x):
        q = lg.guide_distribution(x).base_dist
        standard = dist.Normal(torch.zeros_like(q.loc), 1.0).to_event(1)
        affine = AffineTransform(q.loc, q.scale, event_dim=1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(standard, [affine]))

    return guide


@torch.no_grad()
def test_the_monte_carlo_rate_agrees_with_the_closed_form_within_its_error():
    lg, x = _pair()
    closed = rate_distortion(lg.model, lg.guide, x, num_particles=16, seed=0)
    monte_carlo = rate_distortion(lg.model, _transformed_guide(lg), x, num_particles=16, seed=0)
    assert monte_carlo.methods == {"z": MONTE_CARLO} and "z" not in monte_carlo.kl_per_dim
    assert not torch.equal(monte_carlo.rate, closed.rate)
    _within_mc_error(monte_carlo.rate - closed.rate)
    exact = _expected_log_lik(lg, x)
    _within_mc_error(monte_carlo.distortion + exact)


@torch.no_grad()
def test_surgery_splits_the_rate_and_the_mutual_information_is_at_most_log_n():
    lg, x = _pair()
    result = rate_distortion(
        lg.model, lg.guide, x, num_particles=8, surgery_points=150, surgery_samples=4, seed=0
    )
    surgery = result.surgery
    assert surgery.num_points == 150 and surgery.mutual_info.shape == (150,)
    assert surgery.mutual_info.mean() <= math.log(150)
    # I_q + KL(q(z) ‖ p(z)) is the Monte Carlo rate of the codes: the closed-form rate within
    # its error
    _within_mc_error(surgery.mutual_info + surgery.marginal_kl - result.rate[:150])
    assert surgery.mutual_info.mean() > 0 and surgery.marginal_kl.mean() > 0
    summary = result.summary()["surgery"]
    assert summary["log_num_points"] == pytest.approx(math.log(150))
    assert 0 <= summary["prior_holes"]["share"] <= 1


@torch.no_grad()
def test_a_guide_that_tells_every_point_apart_saturates_at_log_n():
    """Codes of 20 points from a posterior 100 times narrower than their spacing: each code is
    scored by its own encoding alone, so I_q = log N, and never above it."""
    lg = LinearGaussian.random(5, 3, noise_scale=0.01, guide="diagonal")
    x = lg.sample(20, torch.Generator().manual_seed(1))
    surgery = rate_distortion(lg.model, lg.guide, x, num_particles=1, surgery_points=20).surgery
    assert (surgery.mutual_info <= math.log(20)).all()
    assert surgery.mutual_info.mean() == pytest.approx(math.log(20), abs=1e-3)


def _guide_ignoring_x(lg: LinearGaussian):
    def guide(x):
        loc = x.new_tensor([0.5, -0.2, 0.1]).expand(x.shape[0], 3)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.7).to_event(1))

    return guide


@torch.no_grad()
def test_a_guide_that_ignores_x_carries_no_information():
    lg, x = _pair()
    result = rate_distortion(
        lg.model, _guide_ignoring_x(lg), x[:50], num_particles=4, surgery_points=50, seed=0
    )
    surgery = result.surgery
    assert surgery.mutual_info.abs().max() < 1e-10
    # all of the rate is the marginal KL, and the activity of every unit is 0
    _within_mc_error(surgery.marginal_kl - result.rate)
    assert result.active_units("z") == 0


@torch.no_grad()
def test_a_latent_dimension_the_decoder_ignores_is_inactive():
    """W's last column zero: the exact posterior leaves that dimension at the prior, so its
    KL and its activity Var_x E_q[z_d] are 0, and the other two are active."""
    lg = LinearGaussian.random(5, 3, guide="diagonal")
    with torch.no_grad():
        lg.weight[:, 2] = 0
    x = lg.sample(100, torch.Generator().manual_seed(1))
    result = rate_distortion(lg.model, lg.guide, x, num_particles=2, seed=0)
    activity = result.activity["z"]
    assert activity[2] < 1e-20 and (activity[:2] > 0.01).all()
    assert result.active_units("z") == 2
    assert result.kl_per_dim["z"][2].abs() < 1e-12 and (result.kl_per_dim["z"][:2] > 0.1).all()
    assert result.summary()["sites"]["z"]["active_units"] == 2


@torch.no_grad()
def test_a_seed_gives_the_same_numbers_and_leaves_the_caller_stream():
    lg, x = _pair()
    before = torch.get_rng_state()
    first = rate_distortion(lg.model, lg.guide, x, num_particles=3, surgery_points=30, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    again = rate_distortion(lg.model, lg.guide, x, num_particles=3, surgery_points=30, seed=5)
    assert torch.equal(first.distortion, again.distortion)
    assert torch.equal(first.surgery.mutual_info, again.surgery.mutual_info)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"num_particles": 0}, "num_particles must be >= 1, got 0"),
        ({"surgery_points": 1}, "surgery_points must be >= 2"),
        ({"hole_percentile": 100}, "hole_percentile must be between 0 and 100"),
        ({"prior_draws": -1}, "prior_draws must be >= 0"),
    ],
)
def test_bad_options_are_refused_by_name(option, message):
    lg, x = _pair()
    with pytest.raises(ConfigError, match=message):
        rate_distortion(lg.model, lg.guide, x, **option)


def test_surgery_refuses_global_latents():
    def model(x):
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)

    def guide(x):
        pyro.sample("shift", dist.Normal(0.1, 0.5))

    x = torch.randn(10)
    result = rate_distortion(model, guide, x, num_particles=20)
    assert result.global_sites == ("shift",) and result.global_rate > 0
    with pytest.raises(ConfigError, match="ELBO surgery needs local latents only"):
        rate_distortion(model, guide, x, num_particles=2, surgery_points=5)


def test_the_evaluate_command_writes_the_diagnostics(run_dir, capsys):
    argv = ["evaluate", str(run_dir), "--particles", "4", "--limit", "30", "--quiet"]
    assert main(argv) == 0
    plain = json.loads((run_dir / "eval-test.json").read_text())
    assert "rate_distortion" not in plain and not (run_dir / "holes-test.png").exists()
    capsys.readouterr()
    extra = ["--rate-distortion", "--rd-particles", "3", "--surgery-points", "20"]
    assert main([*argv, *extra, "--prior-draws", "200"]) == 0
    out = capsys.readouterr().out
    assert "rate-distortion: 30 datapoints, 3 particles" in out and "holes-test.png" in out
    report = json.loads((run_dir / "eval-test.json").read_text())
    assert report["summary"].keys() == plain["summary"].keys()
    rd = report["rate_distortion"]
    assert len(rd["datapoints"]["rate"]) == 30
    summary = rd["summary"]
    assert summary["sites"]["z"]["method"] == CLOSED_FORM
    assert summary["surgery"]["num_points"] == 20
    assert summary["surgery"]["prior_holes"]["prior_draws"] == 200
    assert summary["rate"]["mean"] + summary["distortion"]["mean"] == pytest.approx(
        -summary["elbo"]["mean"]
    )
    from pyro_vae.evaluate.khat import arviz_module

    evaluation = arviz_module().from_netcdf(str(run_dir / "eval-test.nc")).evaluation
    assert evaluation["rate"].values.tolist() == pytest.approx(rd["datapoints"]["rate"])
    # evaluated again without the flag: no diagnostics, and the holes go with them
    assert main(argv) == 0
    assert "rate_distortion" not in json.loads((run_dir / "eval-test.json").read_text())
    assert not (run_dir / "holes-test.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--surgery-points", "10"], "--surgery-points need(s) --rate-distortion"),
        (["--rate-distortion", "--ais"], "--rate-distortion applies to importance sampling"),
        (["--rate-distortion", "--surgery-points", "1"], "expected 0 (none) or a number >= 2"),
        (["--rate-distortion", "--hole-percentile", "100"], "between 0 and 100"),
    ],
)
def test_bad_rate_distortion_flags_are_one_line_and_write_nothing(run_dir, capsys, extra, message):
    before = sorted(path.name for path in run_dir.iterdir())
    assert _exit_code(["evaluate", str(run_dir), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(path.name for path in run_dir.iterdir()) == before


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's refusals
        return exc.code


def test_the_time_estimate_counts_every_particle_chunk_of_every_batch(monkeypatch):
    """Under a time bound the pass is refused from its first chunks' time: 3 batches × 4
    chunks at 1 s each (a fake clock) is 12 s."""
    import itertools

    from pyro_vae.util import budget

    lg, x = _pair()
    ticks = itertools.count()
    monkeypatch.setattr(budget, "clock", lambda: float(next(ticks)))  # 1 s per chunk
    options = dict(num_particles=40, particle_chunk=10, batch_size=len(x) // 3 + 1)
    expected = r"the rate and distortion of 40 particles would take about 12 s \(12 pieces"
    with budget.time_limit(11), pytest.raises(budget.TimeLimitError, match=expected):
        rate_distortion(lg.model, lg.guide, x, **options)
    with budget.time_limit(12):
        assert rate_distortion(lg.model, lg.guide, x, **options).rate.shape == (len(x),)


class _SoftmaxOverRows(torch.nn.Module):
    """Word probabilities by ``softmax(dim=1)``: the feature axis of an ``[N, D]`` decoder
    output, the datapoint axis of a ``[K, N, D]`` one, so a particle plate changes its numbers."""

    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = torch.nn.Linear(6, 6), torch.nn.Linear(3, 6)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(1))
            probs = torch.softmax(self.decoder(z), dim=1)
            pyro.sample("x", dist.Multinomial(probs=probs, validate_args=False), obs=x)

    def guide(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 0.1).to_event(1))


def test_networks_that_see_the_particle_dimension_are_drawn_one_particle_at_a_time():
    pair = _SoftmaxOverRows()
    x = torch.randint(0, 5, (8, 6), generator=torch.Generator().manual_seed(3)).float()
    with pyro.validation_enabled(False):
        result = rate_distortion(pair.model, pair.guide, x, num_particles=4, seed=0)
        # a vectorized draw would score each particle with another softmax: not the pair's
        assert result.vectorized is False
        with pytest.raises(ConfigError, match="see the particle dimension"):
            rate_distortion(pair.model, pair.guide, x, num_particles=4, surgery_points=4)
