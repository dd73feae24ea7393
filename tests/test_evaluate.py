"""Evaluation from traces, checked against closed forms of a linear-Gaussian model.

Monte Carlo tolerances are 4 standard errors, estimated from the samples themselves (the
datapoints are independent, so the spread across datapoints gives the standard error of a mean).
"""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import vectorized_importance_weights

from pyro_vae import evaluate as ev
from pyro_vae.errors import ConfigError, DataError

from linear_gaussian import LinearGaussian

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


def _normal_target_pair(guide_scale: float):
    """Target N(0, 1), proposal N(0, s²), one scalar latent per datapoint and no observations.

    The weights p/q ∝ exp(z² (1/s² − 1) / 2) with z ~ N(0, s²) have a Pareto tail of shape
    k = 1 − s² for s < 1, and are bounded (k ≤ 0) for s ≥ 1.
    """
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), guide_scale))

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
    assert result.var_log_w.max().item() < atol ** 2
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
    theirs, _, _ = vectorized_importance_weights(lg.model, lg.guide, x, num_samples=300,
                                                 max_plate_nesting=1)
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
    small, large = (ev.evaluate(worse.model, worse.guide, x, num_particles=k, khat=False).log_px
                    for k in (1, 32))
    mean, se = _mean_and_se(large - small)
    assert mean > NUM_SE * se


def test_gap_matches_analytic_kl():
    _seed()
    lg = _wrong_pair()
    x = _data(lg, 200)
    exact = lg.log_marginal(x).detach()
    kl = lg.kl_guide_to_posterior(x).detach()
    assert kl.min().item() > 0.1
    result = ev.evaluate(lg.model, lg.guide, x, num_particles=2048, khat=False)
    # ELBO side: E_q[log w] = log p(x) − KL(q ‖ p(z|x)) exactly.
    mean, se = _mean_and_se(exact - result.elbo - kl)
    assert abs(mean) < NUM_SE * se
    # The reported gap log p_K − ELBO is ≤ KL in expectation and within MC error of it here.
    mean, se = _mean_and_se(result.gap - kl)
    assert mean < NUM_SE * se
    assert abs(mean) < NUM_SE * se + 0.01 * kl.mean().item()


@pytest.mark.parametrize("guide_scale", [0.6, 0.8])
def test_khat_matches_known_tail_shape(guide_scale):
    # At K = 1000 the estimator is biased low by up to ≈ 0.06 for these scales (measured over 200
    # replicates: mean k-hat 0.58 for k = 0.64, 0.36 for k = 0.36), hence the 0.08 allowance.
    _seed()
    model, guide = _normal_target_pair(guide_scale)
    result = ev.evaluate(model, guide, torch.zeros(100, 1), num_particles=1000)
    mean, se = _mean_and_se(result.khat)
    assert abs(mean - (1 - guide_scale ** 2)) < 0.08 + NUM_SE * se


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
        torch.testing.assert_close(getattr(streamed, name), getattr(direct, name),
                                   atol=1e-10, rtol=1e-10)


def test_chunk_size_does_not_change_results_beyond_mc_error():
    lg = _exact_pair()
    x = _data(lg, 10)
    exact = [ev.evaluate(lg.model, lg.guide, x, num_particles=50, particle_chunk=chunk).log_px
             for chunk in (1, 7, None)]
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
        results.append(ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=100,
                                           batch_size=6, particle_chunk=30))
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
    single = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=100, batch_size=1,
                                 khat=False)
    batch = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=100, batch_size=32,
                                khat=False)
    assert single.num_datapoints == batch.num_datapoints == 100
    for name in ("log_px", "elbo"):
        mean, se = _mean_and_se(getattr(single, name) - getattr(batch, name))
        assert abs(mean) < NUM_SE * se


def test_dataset_of_several_tensors_is_sliced_together():
    lg = _exact_pair()
    x = _data(lg, 9)
    offsets = torch.arange(9.0, dtype=x.dtype)

    def model(x, offset):
        return lg.model(x - offset[:, None])

    def guide(x, offset):
        return lg.guide(x - offset[:, None])

    result = ev.evaluate_dataset(model, guide, (x + offsets[:, None], offsets), num_particles=4,
                                 batch_size=4)
    torch.testing.assert_close(result.log_px, lg.log_marginal(x).detach(), atol=1e-10, rtol=0)
    with pytest.raises(ConfigError, match="different lengths"):
        ev.evaluate_dataset(model, guide, (x, offsets[:5]), num_particles=4)


def test_site_outside_the_data_plate_is_a_config_error():
    def model(x):
        scale = pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, scale), obs=x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))

    with pytest.raises(ConfigError, match="data plate"):
        ev.evaluate(model, guide, torch.zeros(3), num_particles=4)
    with pytest.raises(ConfigError, match="outside the data plate"):
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
    loaded = ev._arviz().from_netcdf(str(path))
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
        "eval-test.json", "eval-test.nc", "gap-test.png", "khat-test.png"]
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


def test_eval_config_rejects_bad_options():
    with pytest.raises(ConfigError, match="split"):
        ev.EvalConfig(split="valid")
    with pytest.raises(ConfigError, match="particles"):
        ev.EvalConfig(particles=0)
    with pytest.raises(ConfigError, match="limit"):
        ev.EvalConfig(limit=0)


def test_evaluate_run_writes_files_into_the_run_folder(tmp_path):
    from pyro_vae.config import ModelConfig, TrainConfig
    from pyro_vae.train import train

    run_dir = tmp_path / "run"
    config = TrainConfig(epochs=1, batch_size=512, device="cpu",
                         model=ModelConfig(latent_dim=2, hidden=(8,)))
    train(config, run_dir, progress=False)
    rng_state = torch.get_rng_state()
    result = ev.evaluate_run(run_dir, particles=25, limit=12, batch_size=5, particle_chunk=10,
                             device="cpu")
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert result.num_datapoints == 12 and result.num_particles == 25
    assert result.log_weights is not None and (result.gap >= 0).all()
    for name in ("eval-test.json", "eval-test.nc", "gap-test.png", "khat-test.png"):
        assert (run_dir / name).is_file()
    saved = json.loads((run_dir / "eval-test.json").read_text())
    assert saved["config"]["particles"] == 25 and saved["config"]["limit"] == 12
    assert saved["summary"]["log_px"]["mean"] == pytest.approx(result.log_px.mean().item())

    again = ev.evaluate_run(run_dir, particles=25, limit=12, batch_size=5, particle_chunk=10,
                            device="cpu", out=tmp_path / "elsewhere", keep_log_weights=False)
    assert torch.equal(again.log_px, result.log_px) and again.log_weights is None
    assert (tmp_path / "elsewhere" / "eval-test.nc").is_file()
