"""Evaluation from traces, checked against closed forms of a linear-Gaussian model.

Monte Carlo tolerances are 4 standard errors, estimated from the samples themselves (the
datapoints are independent, so the spread across datapoints gives the standard error of a mean).
"""

from __future__ import annotations

import json
import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer.importance import vectorized_importance_weights

from pyro_vae import evaluate as ev
from pyro_vae.evaluate import khat
from pyro_vae.runs import EvalConfig, evaluate_run
from pyro_vae.util.errors import ConfigError, DataError

NUM_SE = 4.0


def _seed(seed: int = 0) -> None:
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()


def _data(model: LinearGaussian, num_data: int, seed: int = 1) -> torch.Tensor:
    return model.sample(num_data, torch.Generator().manual_seed(seed))


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), values.std().item() / math.sqrt(values.shape[0])


def _exact_pair(dtype: torch.dtype = torch.float64) -> LinearGaussian:
    return LinearGaussian.random(6, 3, dtype=dtype)


def _wrong_pair() -> LinearGaussian:
    """An over-dispersed, shifted full-covariance guide: bounded weights, KL ≈ 0.35 nats."""
    return LinearGaussian.random(4, 2, noise_scale=1.0, loc_shift=0.2, scale_factor=1.2)


def _normal_target_pair(guide_scale: float, dim: int = 1):
    """Target N(0, I_dim), proposal N(0, s² I_dim), one latent per datapoint, no observations.

    The weights p/q ∝ exp(|z|² (1/s² − 1) / 2) with z ~ N(0, s² I) have a Pareto tail of shape
    k = 1 − s² for s < 1 (exactly Pareto for dim = 2), and are bounded (k ≤ 0) for s ≥ 1.
    """

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(dim), 1.0).to_event(1))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(dim), guide_scale).to_event(1))

    return model, guide


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_exact_posterior_weights_equal_log_marginal(dtype, atol):
    _seed()
    lg = _exact_pair(dtype)
    x = _data(lg, 20)
    exact = lg.log_marginal(x).detach().double()
    lw = ev.log_weights(lg.model, lg.guide, x, num_particles=64, particle_chunk=24)
    assert lw.shape == (64, 20) and not lw.requires_grad
    torch.testing.assert_close(lw.double(), exact.expand(64, 20), atol=atol, rtol=0)

    result = ev.evaluate(lg.model, lg.guide, x, num_particles=64)
    torch.testing.assert_close(result.log_px, exact, atol=atol, rtol=0)
    assert result.var_log_w.max().item() < atol**2
    assert result.gap.abs().max().item() < atol
    torch.testing.assert_close(result.ess, torch.ones(20, dtype=torch.float64), atol=atol, rtol=0)
    assert (result.khat == -math.inf).all()
    assert result.summary()["khat"]["fraction_good"] == 1.0


def test_matches_pyro_vectorized_importance_weights():
    lg = _wrong_pair()
    x = _data(lg, 1)
    _seed(3)
    ours = ev.log_weights(lg.model, lg.guide, x, num_particles=300, max_plate_nesting=1)
    _seed(3)
    theirs, _, _ = vectorized_importance_weights(
        lg.model, lg.guide, x, num_samples=300, max_plate_nesting=1
    )
    assert ours.shape == (300, 1) and theirs.shape == (300,)
    torch.testing.assert_close(ours[:, 0], theirs.detach(), atol=1e-12, rtol=0)


def test_iwae_bound_increases_with_k_and_converges_to_exact():
    # One run of K = 2048 particles; E[log p_k] for smaller k is estimated without extra draws by
    # averaging log p_k over the 2048 / k disjoint blocks of k particles.
    _seed()
    lg = _wrong_pair()
    num_data, total = 200, 2048
    x = _data(lg, num_data)
    exact = lg.log_marginal(x).detach()
    lw = ev.evaluate(lg.model, lg.guide, x, num_particles=total, khat=False).log_weights
    bias = {}
    for k in (1, 4, 16, 64, 256, 1024, 2048):
        blocks = lw.reshape(total // k, k, num_data).transpose(0, 1).reshape(k, -1)
        log_px = ev.weight_statistics(blocks, khat=False).log_px
        bias[k] = log_px.reshape(total // k, num_data).mean(0) - exact
        mean, se = _mean_and_se(bias[k])
        assert mean < NUM_SE * se, f"log p_k exceeds log p(x) on average at k={k}"
    sizes = sorted(bias)
    for small, large in zip(sizes, sizes[1:]):
        mean, se = _mean_and_se(bias[large] - bias[small])
        assert mean > NUM_SE * se, f"log p_k does not increase from k={small} to k={large}"
    # Delta method: E[log p_K] − log p ≈ −Var(w / p) / (2K), with Var(w / p) estimated from the
    # weights and the exact p; what is left must be Monte Carlo error.
    rel_var = (torch.logsumexp(2 * (lw - exact), 0) - math.log(total)).exp() - 1
    mean, se = _mean_and_se(bias[total] + rel_var / (2 * total))
    assert abs(mean) < NUM_SE * se
    assert abs(bias[total].mean().item()) < abs(bias[1].mean().item()) / 50

    # The same ordering holds between independent evaluate() calls (a worse guide: KL ≈ 1.5).
    worse = LinearGaussian.random(4, 2, noise_scale=1.0, loc_shift=0.4, scale_factor=1.5)
    small, large = (
        ev.evaluate(worse.model, worse.guide, x, num_particles=k, khat=False).log_px
        for k in (1, 32)
    )
    mean, se = _mean_and_se(large - small)
    assert mean > NUM_SE * se


def test_gap_matches_analytic_kl():
    _seed()
    lg = _wrong_pair()
    num_data, k = 200, 2048
    x = _data(lg, num_data)
    exact = lg.log_marginal(x).detach()
    kl = lg.kl_guide_to_posterior(x).detach()
    assert kl.min().item() > 0.1
    result = ev.evaluate(lg.model, lg.guide, x, num_particles=k, khat=False)
    # Every check below is on per-datapoint values that are independent across datapoints, so
    # the spread across the 200 datapoints gives the standard error of their mean.
    # ELBO side: E_q[log w] = log p(x) − KL(q ‖ p(z|x)) exactly, so log p(x) − ELBO − KL has
    # mean zero.
    mean, se = _mean_and_se(exact - result.elbo - kl)
    assert abs(mean) < NUM_SE * se
    # The reported gap log p̂_K − ELBO: by the delta method E[log p̂_K] = log p(x) − V/(2K) +
    # O(K⁻²) with V = Var_q(w / p(x)), so E[gap] = KL − V/(2K) + O(K⁻²). V is estimated per
    # datapoint from the same weights (V = E[(w/p)²] − 1, as E[w/p] = 1); with the weights bounded
    # here the O(K⁻²) rest is of order V²/K² ≈ 1e-7 nats, far below the standard error.
    rel_var = (torch.logsumexp(2 * (result.log_weights - exact), 0) - math.log(k)).exp() - 1
    mean, se = _mean_and_se(result.gap + rel_var / (2 * k) - kl)
    assert abs(mean) < NUM_SE * se
    # Without the correction the gap sits below the KL on average, never above it.
    mean, se = _mean_and_se(result.gap - kl)
    assert mean < NUM_SE * se


@pytest.mark.parametrize("guide_scale", [0.6, 0.8])
def test_khat_matches_known_tail_shape(guide_scale):
    # Target N(0, I₂), proposal N(0, s² I₂): log w = |z|² (1/s² − 1)/2 + const and |z|²/s² ~ χ²₂,
    # an exponential with mean 2, so w is exactly Pareto with shape k = 1 − s² above any
    # threshold. (In one dimension the tail is Pareto only up to a (log w)^(−1/2) factor, which
    # biases every finite-K fit low: about −0.06 at K = 1000 for s = 0.6.) The one remaining
    # known bias is ArviZ's weakly informative prior, which shrinks the fit of the M largest
    # weights towards 0.5: k̂ = (M k + 10 · 0.5) / (M + 10), M = ceil(min(K/5, 3√K))
    # (arviz.stats.stats._gpdfit and psislw). Each datapoint is an independent replicate, so the
    # tolerance is NUM_SE standard errors of the mean k-hat across them.
    num_particles = 1000
    model, guide = _normal_target_pair(guide_scale, dim=2)
    result = ev.evaluate(
        model, guide, torch.zeros(400, 1), num_particles=num_particles, keep_log_weights=False
    )
    tail = math.ceil(min(num_particles / 5, 3 * math.sqrt(num_particles)))
    expected = (tail * (1 - guide_scale**2) + 10 * 0.5) / (tail + 10)
    mean, se = _mean_and_se(result.khat)
    assert abs(mean - expected) < NUM_SE * se


def test_khat_of_bounded_and_constant_weights_is_good():
    _seed()
    model, guide = _normal_target_pair(1.3)
    wide = ev.evaluate(model, guide, torch.zeros(50, 1), num_particles=500)
    assert (wide.khat < ev.KHAT_GOOD).all()
    model, guide = _normal_target_pair(1.0)
    same = ev.evaluate(model, guide, torch.zeros(5, 1), num_particles=500)
    assert (same.khat == -math.inf).all()
    assert {ev.khat_reading(k) for k in same.khat.tolist()} == {"good"}
    assert [ev.khat_reading(k) for k in (0.3, 0.6, 0.9, math.nan)] == ["good", "ok", "bad", "bad"]


def test_streamed_statistics_equal_those_of_the_concatenated_weights():
    _seed()
    lg = _wrong_pair()
    x = _data(lg, 30)
    streamed = ev.evaluate(lg.model, lg.guide, x, num_particles=500, particle_chunk=37)
    direct = ev.weight_statistics(streamed.log_weights)
    for name in (*ev.METRICS, "khat"):
        torch.testing.assert_close(
            getattr(streamed, name), getattr(direct, name), atol=1e-10, rtol=1e-10
        )


def test_chunk_size_does_not_change_results_beyond_mc_error():
    lg = _exact_pair()
    x = _data(lg, 10)
    exact = [
        ev.evaluate(lg.model, lg.guide, x, num_particles=50, particle_chunk=chunk).log_px
        for chunk in (1, 7, None)
    ]
    torch.testing.assert_close(exact[0], exact[2], atol=1e-10, rtol=0)
    torch.testing.assert_close(exact[1], exact[2], atol=1e-10, rtol=0)

    _seed()
    lg = _wrong_pair()
    x = _data(lg, 200)
    a = ev.evaluate(lg.model, lg.guide, x, num_particles=200, particle_chunk=13, khat=False)
    b = ev.evaluate(lg.model, lg.guide, x, num_particles=200, khat=False)
    for name in ("log_px", "elbo"):
        mean, se = _mean_and_se(getattr(a, name) - getattr(b, name))
        assert abs(mean) < NUM_SE * se


def test_same_seed_same_settings_reproduce_exactly():
    lg = _wrong_pair()
    x = _data(lg, 20)
    results = []
    for _ in range(2):
        _seed(5)
        results.append(
            ev.evaluate_dataset(
                lg.model, lg.guide, x, num_particles=100, batch_size=6, particle_chunk=30
            )
        )
    for name in (*ev.METRICS, "khat"):
        assert torch.equal(getattr(results[0], name), getattr(results[1], name))


def test_batches_agree_with_single_datapoints():
    lg = _exact_pair()
    x = _data(lg, 12)
    single = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=40, batch_size=1)
    batch = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=40, batch_size=12)
    torch.testing.assert_close(single.log_px, batch.log_px, atol=1e-10, rtol=0)
    torch.testing.assert_close(single.log_px, lg.log_marginal(x).detach(), atol=1e-10, rtol=0)

    _seed()
    lg = _wrong_pair()
    x = _data(lg, 100)
    single = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=100, batch_size=1, khat=False)
    batch = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=100, batch_size=32, khat=False)
    assert single.num_datapoints == batch.num_datapoints == 100
    for name in ("log_px", "elbo"):
        mean, se = _mean_and_se(getattr(single, name) - getattr(batch, name))
        assert abs(mean) < NUM_SE * se


def _independence_case(pair: str):
    """A model/guide pair, data, and the same data with datapoint 1 replaced."""
    if pair == "linear_gaussian":
        lg = _wrong_pair()
        x = _data(lg, 10)
        changed = x.clone()
        changed[1] = _data(lg, 1, seed=2)[0]
        return lg.model, lg.guide, x, changed
    from pyro_vae import VAE

    torch.manual_seed(0)
    vae = VAE(16, latent_dim=3, hidden=(8,))
    x = (torch.rand(10, 16, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    changed = x.clone()
    changed[1] = 1 - changed[1]
    return vae.model, vae.guide, x, changed


@pytest.mark.parametrize("pair", ["linear_gaussian", "vae"])
def test_changing_one_datapoint_leaves_the_others_bit_identical(pair):
    # Each datapoint's weights use only its own sites: with the same seed, replacing x[1] changes
    # nothing else, bit for bit, in one call on the global stream and batch by batch with
    # batch_seed (datapoint 1 shares its batch with 0, 2 and 3).
    model, guide, x, changed = _independence_case(pair)
    others = [n for n in range(x.shape[0]) if n != 1]
    runs = {}
    for name, data in (("x", x), ("changed", changed)):
        _seed(3)
        runs[name, "call"] = ev.evaluate(model, guide, data, num_particles=60, particle_chunk=25)
        runs[name, "batches"] = ev.evaluate_dataset(
            model,
            guide,
            data,
            num_particles=60,
            batch_size=4,
            particle_chunk=25,
            keep_log_weights=True,
            batch_seed=11,
        )
    for how in ("call", "batches"):
        a, b = runs["x", how], runs["changed", how]
        assert torch.equal(a.log_weights[:, others], b.log_weights[:, others])
        for name in (*ev.METRICS, "khat"):
            assert torch.equal(getattr(a, name)[others], getattr(b, name)[others]), (how, name)
        assert not torch.equal(a.log_weights[:, 1], b.log_weights[:, 1])


def test_a_datapoint_alone_reproduces_its_batch_of_one():
    # The documented seed handling: with batch_seed, batch i is drawn after
    # torch.manual_seed(derive_seed(batch_seed, EVAL_BATCH_STREAM, i)); with batch_size=1 that
    # is evaluating each datapoint alone on its own seed, bit for bit.
    from pyro_vae.util.distributed import EVAL_BATCH_STREAM, derive_seed

    lg = _wrong_pair()
    x = _data(lg, 5)
    batched = ev.evaluate_dataset(
        lg.model,
        lg.guide,
        x,
        num_particles=50,
        batch_size=1,
        particle_chunk=20,
        keep_log_weights=True,
        batch_seed=4,
    )
    for n in range(x.shape[0]):
        torch.manual_seed(derive_seed(4, EVAL_BATCH_STREAM, n))
        alone = ev.evaluate(lg.model, lg.guide, x[n : n + 1], num_particles=50, particle_chunk=20)
        assert torch.equal(alone.log_weights[:, 0], batched.log_weights[:, n])
        for name in (*ev.METRICS, "khat"):
            assert torch.equal(getattr(alone, name)[0], getattr(batched, name)[n]), (n, name)


def test_validation_checks_the_data_once_without_changing_the_draws():
    # With Pyro's validation on, a one-particle call on a copy of the random state checks the
    # data; the particle chunks run unvalidated, so the numbers are those of a run without
    # validation, bit for bit, and the caller's validation setting is left as it was.
    from pyro.infer.util import is_validation_enabled

    model, guide, x, _ = _independence_case("vae")
    results = {}
    for validate in (True, False):
        with pyro.validation_enabled(validate):
            _seed(5)
            results[validate] = ev.evaluate_dataset(
                model,
                guide,
                x,
                num_particles=60,
                batch_size=4,
                particle_chunk=25,
                keep_log_weights=True,
            )
            assert is_validation_enabled() == validate
    assert torch.equal(results[True].log_weights, results[False].log_weights)
    for name in (*ev.METRICS, "khat"):
        assert torch.equal(getattr(results[True], name), getattr(results[False], name)), name

    not_binary = x.clone()
    not_binary[6, 3] = 0.5  # in the second batch
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="support"):
        ev.evaluate_dataset(
            model, guide, not_binary, num_particles=60, batch_size=4, particle_chunk=25
        )


def test_dataset_of_several_tensors_is_sliced_together():
    lg = _exact_pair()
    x = _data(lg, 9)
    offsets = torch.arange(9.0, dtype=x.dtype)

    def model(x, offset):
        return lg.model(x - offset[:, None])

    def guide(x, offset):
        return lg.guide(x - offset[:, None])

    result = ev.evaluate_dataset(
        model, guide, (x + offsets[:, None], offsets), num_particles=4, batch_size=4
    )
    torch.testing.assert_close(result.log_px, lg.log_marginal(x).detach(), atol=1e-10, rtol=0)
    with pytest.raises(DataError, match="different lengths"):
        ev.evaluate_dataset(model, guide, (x, offsets[:5]), num_particles=4)


def test_an_observed_site_outside_the_data_plate_makes_the_data_set_one_datapoint():
    def model(x):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        pyro.sample("total", dist.Normal(z, 1.0), obs=x.sum())

    def guide(x):
        pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))

    # no plate holds every observed site: evaluate scores the data set as one datapoint, and
    # so does the batched evaluator when the data fit one batch (the same numbers from the
    # same seed); over several batches it refuses, and so does a named plate
    torch.manual_seed(0)
    whole = ev.evaluate(model, guide, torch.zeros(3), num_particles=4)
    assert whole.whole_data_set and whole.log_px.shape == (1,)
    torch.manual_seed(0)
    batched = ev.evaluate_dataset(model, guide, torch.zeros(3), num_particles=4)
    assert batched.whole_data_set
    torch.testing.assert_close(batched.log_px, whole.log_px)
    with pytest.raises(ConfigError, match="could not find a data plate"):
        ev.evaluate_dataset(model, guide, torch.zeros(3), num_particles=4, batch_size=2)
    loader = torch.utils.data.DataLoader(torch.zeros(3), batch_size=2)  # its own batches
    with pytest.raises(
        ConfigError, match="the data set is one datapoint: evaluate it in one batch"
    ):
        ev.evaluate_dataset(model, guide, loader, num_particles=4)
    with pytest.raises(ConfigError, match=r"sample sites \['total'\] are outside the data plate"):
        ev.evaluate(model, guide, torch.zeros(3), num_particles=4, data_plate="data")


def test_model_without_plate_is_a_config_error():
    def model(x):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))

    with pytest.raises(ConfigError, match="could not find a data plate"):
        ev.log_weights(model, guide, torch.zeros(()), num_particles=4)


def test_non_finite_inputs_are_refused_before_tracing():
    lg = _exact_pair()
    x = _data(lg, 8)
    x[5, 0] = math.nan
    with pytest.raises(DataError, match="argument 0 .* NaN or infinite"):
        ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=30, batch_size=4)
    with pytest.raises(DataError, match="NaN or infinite"):
        ev.evaluate(lg.model, lg.guide, x, num_particles=30)


@pytest.mark.parametrize(
    "sizes, named",
    [
        ({"num_particles": 10.5}, "num_particles must be an integer >= 1, got 10.5"),
        ({"num_particles": 0}, "num_particles must be an integer >= 1, got 0"),
        ({"num_particles": True}, "num_particles must be an integer >= 1, got True"),
        ({"num_particles": 4, "batch_size": 2.5}, "batch_size must be an integer >= 1, got 2.5"),
        ({"num_particles": 4, "particle_chunk": 0}, "particle_chunk must be an integer >= 1 or"),
    ],
)
def test_sizes_that_are_not_counts_are_refused_before_the_pair_runs(sizes, named):
    lg, calls = _exact_pair(), []

    def guide(x):
        calls.append(x.shape)
        return lg.guide(x)

    with pytest.raises(ConfigError, match=f"^{re.escape(named)}"):
        ev.evaluate_dataset(lg.model, guide, _data(lg, 8), **sizes)
    assert calls == []


def test_non_finite_log_weights_raise_with_the_datapoint_index():
    def model(x, scale):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z, scale), obs=x)

    def guide(x, scale):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0))

    x = torch.randn(8)
    scale = torch.ones(8)
    scale[5] = 0.0  # a degenerate likelihood for datapoint 5 only
    with pyro.validation_enabled(False):
        with pytest.raises(ev.EvaluationError, match=r"1 datapoint\(s\).*\[5\]"):
            ev.evaluate_dataset(model, guide, (x, scale), num_particles=30, batch_size=4)
    lw = torch.zeros(30, 3)
    lw[2, 1] = math.inf
    with pytest.raises(ev.EvaluationError, match=r"\[1\]"):
        ev.weight_statistics(lw)


def test_khat_needs_enough_particles():
    lg = _wrong_pair()
    x = _data(lg, 3)
    assert ev.evaluate(lg.model, lg.guide, x, num_particles=10).khat is None
    assert ev.evaluate(lg.model, lg.guide, x, num_particles=30, khat=False).khat is None
    with pytest.raises(ConfigError, match="k-hat needs at least"):
        ev.evaluate(lg.model, lg.guide, x, num_particles=10, khat=True)
    with pytest.raises(ConfigError, match="particle_chunk"):
        ev.evaluate(lg.model, lg.guide, x, num_particles=10, particle_chunk=0)


def test_inference_data_round_trips_through_netcdf(tmp_path):
    _seed()
    lg = _wrong_pair()
    x = _data(lg, 7)
    result = ev.evaluate(lg.model, lg.guide, x, num_particles=40)
    path = tmp_path / "eval.nc"
    result.to_inference_data().to_netcdf(str(path))
    loaded = khat.arviz_module().from_netcdf(str(path))
    group = loaded[ev.INFERENCE_DATA_GROUP]
    assert group["log_weight"].dims == ("particle", "datapoint")
    assert group["log_weight"].shape == (40, 7)
    torch.testing.assert_close(torch.as_tensor(group["log_weight"].values), result.log_weights)
    for name in (*ev.METRICS, "khat"):
        assert group[name].dims == ("datapoint",)
        torch.testing.assert_close(torch.as_tensor(group[name].values), getattr(result, name))
    assert group.attrs["num_particles"] == 40

    lean = ev.evaluate(lg.model, lg.guide, x, num_particles=40, keep_log_weights=False)
    assert "log_weight" not in lean.to_inference_data()[ev.INFERENCE_DATA_GROUP]


def test_save_evaluation_writes_json_netcdf_and_plots(tmp_path):
    lg = _exact_pair()
    x = _data(lg, 6)
    result = ev.evaluate(lg.model, lg.guide, x, num_particles=30)
    paths = ev.save_evaluation(result, tmp_path, "test", {"note": "exact"})
    assert set(paths) == {"json", "netcdf", "gap", "khat"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval-test.json",
        "eval-test.nc",
        "gap-test.png",
        "khat-test.png",
    ]
    saved = json.loads(paths["json"].read_text())
    assert saved["note"] == "exact"
    assert saved["summary"]["num_particles"] == 30
    assert saved["datapoints"]["khat"] == [None] * 6
    assert saved["datapoints"]["log_px"] == pytest.approx(lg.log_marginal(x).tolist(), abs=1e-9)
    for name in ("gap", "khat"):
        assert paths[name].read_bytes().startswith(b"\x89PNG")
    table = ev.format_table(result.summary())
    assert "30 particles" in table and f"{result.log_px.mean().item():.4f}" in table
    assert "median -inf" in table and "good 100.0%" in table
    joint = ev.format_table(result.summary(), observed="x, y").splitlines()
    assert joint[2].startswith("log p_K(x, y) ")
    # the value columns stay aligned under their headers with the longer label
    assert len({line.index("nats") for line in joint if line.endswith("nats")}) == 1


def test_eval_config_rejects_bad_options():
    with pytest.raises(ConfigError, match="split"):
        EvalConfig(split="valid")
    with pytest.raises(ConfigError, match="particles"):
        EvalConfig(particles=0)
    with pytest.raises(ConfigError, match="limit"):
        EvalConfig(limit=0)


def test_evaluate_run_writes_files_into_the_run_folder(tmp_path):
    from pyro_vae import ModelConfig, TrainConfig, fit

    run_dir = tmp_path / "run"
    config = TrainConfig(
        epochs=1, batch_size=512, device="cpu", model=ModelConfig(latent_dim=2, hidden=(8,))
    )
    fit(config=config, run_dir=run_dir, progress=False)
    rng_state = torch.get_rng_state()
    result = evaluate_run(
        run_dir, particles=25, limit=12, batch_size=5, particle_chunk=10, device="cpu"
    )
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert result.num_datapoints == 12 and result.num_particles == 25
    assert result.log_weights is not None and (result.gap >= 0).all()
    for name in ("eval-test.json", "eval-test.nc", "gap-test.png", "khat-test.png"):
        assert (run_dir / name).is_file()
    saved = json.loads((run_dir / "eval-test.json").read_text())
    assert saved["config"]["particles"] == 25 and saved["config"]["limit"] == 12
    assert saved["summary"]["log_px"]["mean"] == pytest.approx(result.log_px.mean().item())

    again = evaluate_run(
        run_dir,
        particles=25,
        limit=12,
        batch_size=5,
        particle_chunk=10,
        device="cpu",
        out=tmp_path / "elsewhere",
        keep_log_weights=False,
    )
    assert torch.equal(again.log_px, result.log_px) and again.log_weights is None
    assert (tmp_path / "elsewhere" / "eval-test.nc").is_file()


def test_particles_whose_log_weights_cannot_fit_are_refused_before_drawing():
    """The arrays that grow with K (a chunk's log-weights, k-hat's tail, the kept
    log-weights) are sized first: no particle is drawn and no list of chunks built."""
    from pyro_vae.util.memory import MemoryLimitError, limit

    _seed()
    lg = _exact_pair()
    x = _data(lg, 10)
    with pytest.raises(MemoryLimitError, match=r"num_particles=1000000000000000000 in chunks"):
        ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=10**18, batch_size=5)
    with pytest.raises(MemoryLimitError, match=r"evaluating num_particles=1000000000000 "):
        ev.evaluate(lg.model, lg.guide, x, num_particles=10**12)  # keeps [K, N] log-weights
    with limit("1M"):
        with pytest.raises(MemoryLimitError, match="more than the memory limit of 1.0 MiB"):
            ev.evaluate(lg.model, lg.guide, x, num_particles=20_000, particle_chunk=100)
        kept = ev.evaluate(lg.model, lg.guide, x, num_particles=200, particle_chunk=100)
        assert kept.log_weights.shape == (200, 10)
