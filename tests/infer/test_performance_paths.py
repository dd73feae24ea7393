"""The fast paths give the general paths' numbers.

Two shortcuts make the package's training step cheaper (``docs/performance.rst``):

* a single draw (P·K = 1) is traced without the particle plate, and each estimator computes
  only the log-densities it needs (``meanfield``: log p(x|z) and the KL);
* the package's own VAE with the ``trace`` or ``meanfield`` estimator and one draw is trained
  with a fused loss computed straight from its networks (:mod:`pyro_vae.train.fused`; its
  ``iwae`` with any number of draws: ``tests/infer/test_fused_iwae.py``).

Each test states an equivalence: the same random draws give bit-identical losses and
gradients with and without the particle plate and with and without the fused loss, Pyro's own
estimators' values to float rounding, and the param store stays what ``pyro.param`` calls would
have made it. Nothing is timed here; ``benchmarks/bench_step.py`` times.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pytest
import torch
from benchmark_loader import load_benchmark
from gradients import Calling, loss_and_grads
from linear_gaussian import LinearGaussian
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.params import param_with_module_name
from threads import one_thread
from torch import nn

from pyro_vae import VAE, TrainConfig, fit
from pyro_vae.core.drawing import draw_particles
from pyro_vae.core.particles import Particles
from pyro_vae.infer import (
    CLASSES,
    ESTIMATORS,
    ELBOEstimator,
    LinearWarmup,
    TraceELBO,
    make_estimator,
)
from pyro_vae.infer.pair_checks import check_estimable
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.vae import register_module
from pyro_vae.models.vae2 import VAE2
from pyro_vae.train.fused import FusedLoss, supports, training_loss

#: the estimators that take one importance sample (every one but vimco, which needs two)
ONE_SAMPLE = tuple(name for name in ESTIMATORS if CLASSES[name].min_importance_samples == 1)

D, LATENT, N = 12, 3, 7
STOCK = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _binary(n: int = N, d: int = D) -> torch.Tensor:
    return torch.bernoulli(torch.full((n, d), 0.4), generator=torch.Generator().manual_seed(2))


def _vae(**options) -> tuple[nn.Module, tuple]:
    return VAE(D, LATENT, (16, 8), **options), (_binary(),)


def _gaussian_x() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(2))


def _gaussian_vae() -> tuple[nn.Module, tuple]:
    return VAE(D, LATENT, (16,), likelihood="gaussian"), (_gaussian_x(),)


def _cvae() -> tuple[nn.Module, tuple]:
    return CVAE(D, 3, LATENT, (16,)), (_binary(), torch.arange(N) % 3)


def _vae2() -> tuple[nn.Module, tuple]:
    return VAE2(D, LATENT, (16,)), (_binary(),)


def _linear_gaussian() -> tuple[nn.Module, tuple]:
    lg = LinearGaussian.random(
        4,
        2,
        noise_scale=0.7,
        guide="diagonal",
        loc_shift=torch.tensor([0.3, -0.2]),
        scale_factor=1.3,
    )
    return lg, (lg.sample(N, torch.Generator().manual_seed(1)),)


PAIRS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "vae": _vae,
    "vae-full-guide": lambda: _vae(guide="full"),
    "vae-gaussian-learned-scale": _gaussian_vae,
    "cvae": _cvae,
    "vae2": _vae2,
    "linear-gaussian": _linear_gaussian,
}


# ----------------------------------------------------------------------------- single draw


def _plated_draw(
    estimator: ELBOEstimator, model: Callable, guide: Callable, args: tuple
) -> Particles:
    """The estimator's single draw inside a particle plate of size 1, as it draws P·K > 1
    (:func:`draw_particles` with ``plated=True``, the estimator's view and enumeration),
    checked as it checks its own draws."""
    view = estimator.draw_view() if estimator.draw_view is not None else None
    particles = draw_particles(
        model,
        guide,
        args,
        {},
        1,
        1,
        plated=True,
        view=view,
        enumerate_guide=estimator.parallel_enumeration,
        require_data_plate=False,
        outermost_plate=True,
    )
    check_estimable(particles, allow_discrete=estimator.scores_discrete, site_scales=True)
    return particles


@pytest.mark.parametrize("pair", sorted(PAIRS))
@pytest.mark.parametrize("name", ONE_SAMPLE)
def test_single_draw_without_the_particle_plate_is_bit_identical(pair, name):
    """A single draw runs without the particle plate: the same loss and gradients, bit for bit,
    as the same draw scored inside a plate of size 1."""
    module, args = PAIRS[pair]()
    beta = 0.7 if name in ("trace", "meanfield") else 1.0
    estimator = make_estimator(name, beta=beta, max_plate_nesting=1)
    fast = loss_and_grads(module, args, estimator, 3)
    assert not estimator.draw(module.model, module.guide, args, {}).plated
    params = [p for p in module.parameters() if p.requires_grad]
    pyro.set_rng_seed(3)
    with pyro.validation_enabled(False):
        loss = estimator.loss_of(_plated_draw(estimator, module.model, module.guide, args))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    plated = (
        loss.detach(),
        [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)],
    )
    assert torch.equal(fast[0], plated[0]), (fast[0], plated[0])
    for mine, theirs in zip(fast[1], plated[1]):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("pair", ["vae", "vae-full-guide", "cvae", "linear-gaussian"])
@pytest.mark.parametrize("name", sorted(STOCK))
def test_single_draw_equals_pyros_own_estimators(pair, name):
    module, args = PAIRS[pair]()
    ours = loss_and_grads(module, args, make_estimator(name, max_plate_nesting=1), 4)
    reference = STOCK[name](max_plate_nesting=1)
    theirs = loss_and_grads(module, args, reference, 4)
    torch.testing.assert_close(ours[0], theirs[0])
    for mine, want in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, want)


def test_float_loss_equals_the_differentiable_loss():
    module, args = _vae()
    for name in ONE_SAMPLE:
        estimator = make_estimator(name, max_plate_nesting=1)
        pyro.set_rng_seed(6)
        value = estimator.loss(module.model, module.guide, *args)
        pyro.set_rng_seed(6)
        tensor = estimator.differentiable_loss(module.model, module.guide, *args)
        assert value == pytest.approx(tensor.item(), rel=1e-6)


def test_meanfield_reads_neither_log_q_nor_the_log_prior():
    module, args = _vae()
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    particles = estimator.draw(module.model, module.guide, args, {})
    estimator.objective(particles, gradient=False)
    assert "log_lik" in vars(particles)
    assert "log_q" not in vars(particles) and "log_prior" not in vars(particles)


def _undeclared_batch_dim(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(2, x.shape[0]), 1.0))
        pyro.sample("x", dist.Normal(x.new_zeros(x.shape), 1.0).to_event(1), obs=x)


def _undeclared_guide(x: torch.Tensor) -> None:
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x.new_zeros(2, x.shape[0]), 1.0))


@pytest.mark.parametrize("plated", [False, True])
def test_a_batch_dimension_outside_the_plates_is_an_error_either_way(plated):
    estimator = make_estimator("trace", max_plate_nesting=1)
    x = torch.zeros(N, 2)
    with pytest.raises(ValueError), pyro.validation_enabled(False):
        if plated:
            estimator.loss_of(
                _plated_draw(estimator, _undeclared_batch_dim, _undeclared_guide, (x,))
            )
        else:
            estimator.differentiable_loss(_undeclared_batch_dim, _undeclared_guide, x)


# ----------------------------------------------------------------------------- registration


@pytest.fixture
def param_calls(monkeypatch) -> list[str]:
    """The names passed to ``pyro.param`` (which register_module calls through ``pyro``)."""
    calls: list[str] = []
    original = pyro.param

    def counting(name, *args, **kwargs):
        calls.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(pyro, "param", counting)
    return calls


def _store_holds(prefix: str, module: nn.Module) -> bool:
    store = pyro.get_param_store()
    return all(
        store.get_param(param_with_module_name(prefix, key)) is value
        for key, value in module.named_parameters()
    )


def test_registration_sends_every_param_on_every_call_and_keeps_the_tensors(param_calls):
    """register_module uses Pyro's public API only: one ``pyro.param`` per tensor on every call
    (no call skipped once the store holds them), and the store keeps the module's own tensors."""
    vae, (x,) = _vae()
    expected = sorted(
        [param_with_module_name("vae.encoder", key) for key, _ in vae.encoder.named_parameters()]
        + [param_with_module_name("vae.decoder", key) for key, _ in vae.decoder.named_parameters()]
    )
    assert len(expected) == len(list(vae.parameters()))
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    for _ in range(2):
        param_calls.clear()
        estimator.differentiable_loss(vae.model, vae.guide, x)
        assert sorted(param_calls) == expected
        assert _store_holds("vae.encoder", vae.encoder)
        assert _store_holds("vae.decoder", vae.decoder)


def test_handlers_still_see_every_param():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    decoder = {
        param_with_module_name("vae.decoder", key) for key, _ in vae.decoder.named_parameters()
    }
    encoder = {
        param_with_module_name("vae.encoder", key) for key, _ in vae.encoder.named_parameters()
    }
    with poutine.trace(param_only=True) as capture:
        estimator.differentiable_loss(vae.model, vae.guide, x)
    assert set(capture.trace.param_nodes) == decoder | encoder
    assert set(poutine.trace(vae.model).get_trace(x).param_nodes) == decoder


def test_a_block_hiding_some_params_lets_the_others_through():
    vae, _ = _vae()
    register_module("vae.decoder", vae.decoder)
    hidden = param_with_module_name("vae.decoder", "net.0.weight")
    with poutine.trace(param_only=True) as capture, poutine.block(hide=[hidden]):
        register_module("vae.decoder", vae.decoder)
    assert set(capture.trace.param_nodes) == {
        param_with_module_name("vae.decoder", key) for key, _ in vae.decoder.named_parameters()
    } - {hidden}


def test_svi_with_a_pyro_optimizer_trains_after_a_package_estimator():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    before = [p.detach().clone() for p in vae.parameters()]
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), estimator)
    for _ in range(3):
        svi.step(x)
    assert all(not torch.equal(old, new) for old, new in zip(before, vae.parameters()))


def test_two_models_with_one_name_never_share_parameters(param_calls):
    (first, (x,)), (second, _) = _vae(), _vae()
    estimator = make_estimator("meanfield", max_plate_nesting=1)
    for module in (first, second, first, second):
        estimator.differentiable_loss(module.model, module.guide, x)
        assert _store_holds("vae.decoder", module.decoder)
        assert _store_holds("vae.encoder", module.encoder)
    optimizer = torch.optim.Adam(first.parameters(), lr=1e-2)
    untouched = [p.detach().clone() for p in second.parameters()]
    estimator.differentiable_loss(first.model, first.guide, x).backward()
    optimizer.step()
    assert all(torch.equal(old, new) for old, new in zip(untouched, second.parameters()))


def test_a_cleared_store_or_a_replaced_parameter_is_registered_again():
    vae, (x,) = _vae()
    estimator = make_estimator("trace", max_plate_nesting=1)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    pyro.clear_param_store()
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert _store_holds("vae.decoder", vae.decoder)
    layer = vae.decoder.net[0]
    layer.weight = nn.Parameter(layer.weight.detach() + 1.0)
    estimator.differentiable_loss(vae.model, vae.guide, x)
    assert _store_holds("vae.decoder", vae.decoder)
    name = param_with_module_name("vae.decoder", "net.0.weight")
    assert pyro.get_param_store().get_param(name) is layer.weight


# ----------------------------------------------------------------------------- fused loss
#
# The fused loss draws ε with Normal.rsample's own call and evaluates the traced estimator's
# floating-point operations in the same order; the ones it leaves out (same-shape expand views,
# the prior's x − 0, x / 1 and − log 1) are exact in value and gradient. So the comparisons
# below are bit for bit (torch.equal), not to a tolerance.

FUSED = ("trace", "meanfield")
LIKELIHOODS = {
    "bernoulli": {},
    "gaussian-learned-scale": {"likelihood": "gaussian"},
    "gaussian-fixed-scale": {"likelihood": "gaussian", "obs_scale": 0.3},
    "bernoulli-exp-scale": {"scale_fn": "exp", "activation": "tanh"},
}


def _fused_pair(options: dict) -> tuple[VAE, torch.Tensor]:
    vae, (x,) = _vae(**options)
    return vae, (_gaussian_x() if vae.likelihood == "gaussian" else x)


def _traced_and_fused(vae: VAE, x: torch.Tensor, estimator: ELBOEstimator, seed: int):
    fused = FusedLoss(vae, estimator)
    results = []
    for loss_fn in (fused.traced, fused):
        results.append(loss_and_grads(vae, (x,), Calling(loss_fn), seed) + (torch.get_rng_state(),))
    return results


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
@pytest.mark.parametrize("beta", [1.0, 0.3, 0.0])
@pytest.mark.parametrize("name", FUSED)
def test_fused_loss_equals_the_traced_estimator_bit_for_bit(name, beta, likelihood):
    vae, x = _fused_pair(LIKELIHOODS[likelihood])
    estimator = make_estimator(name, beta=beta, max_plate_nesting=1)
    assert supports(vae, estimator)
    (traced, traced_grads, traced_rng), (fused, fused_grads, fused_rng) = _traced_and_fused(
        vae, x, estimator, seed=5
    )
    assert torch.equal(traced, fused), (traced, fused)
    for want, got in zip(traced_grads, fused_grads):
        assert torch.equal(want, got)
    assert any(g.abs().sum() > 0 for g in fused_grads)
    assert torch.equal(traced_rng, fused_rng)  # the same random numbers were consumed


@pytest.mark.parametrize("name", FUSED)
def test_fused_and_traced_steps_follow_one_warmup_trajectory(name):
    """Ten Adam steps with a KL warm-up (β from 0.1 to 0.8) land on the same parameters."""
    schedule = LinearWarmup(steps=8, start=0.1, end=0.8)
    x = _binary()
    finals = []
    for fused in (False, True):
        torch.manual_seed(1)
        vae = VAE(D, LATENT, (16,))
        estimator = make_estimator(name, beta=schedule.end, max_plate_nesting=1)
        loss_fn = training_loss(vae, estimator, fused)
        assert isinstance(loss_fn, FusedLoss) == fused
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
        pyro.set_rng_seed(8)
        losses = []
        with pyro.validation_enabled(False):
            for step in range(10):
                estimator.beta = schedule(step)
                optimizer.zero_grad()
                loss = loss_fn(x)
                (loss / N).backward()
                optimizer.step()
                losses.append(loss.item())
        finals.append((losses, [p.detach().clone() for p in vae.parameters()]))
    (traced_losses, traced_params), (fused_losses, fused_params) = finals
    assert traced_losses == fused_losses
    assert all(torch.equal(a, b) for a, b in zip(traced_params, fused_params))


@pytest.mark.parametrize(
    "estimator",
    [
        {"elbo": "meanfield", "beta": 0.5, "warmup": 15},
        {"elbo": "trace", "beta": 2.0, "warmup": 15, "warmup_start": 0.5},
    ],
)
def test_training_history_is_the_same_with_the_fused_path_on_and_off(estimator, monkeypatch):
    calls = []
    original = ELBOEstimator.differentiable_loss

    def counting(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ELBOEstimator, "differentiable_loss", counting)
    config = TrainConfig(
        epochs=2, batch_size=128, eval_particles=2, final_particles=3, device="cpu", **estimator
    )
    runs = {}
    for fused in (True, False):
        calls.clear()
        runs[fused] = fit(config=config, progress=False, fused=fused)
        runs[fused, "traced steps"] = len(calls)
    assert runs[True, "traced steps"] == 0 < runs[False, "traced steps"]
    on, off = runs[True], runs[False]
    assert on.history.train_loss == off.history.train_loss
    assert on.history.test_elbo == off.history.test_elbo
    assert on.history.extra == off.history.extra
    for key, value in off.model.state_dict().items():
        assert torch.equal(value, on.model.state_dict()[key]), key


def test_a_run_resumed_with_the_other_path_reaches_the_uninterrupted_result(tmp_path):
    config = TrainConfig(
        epochs=3,
        batch_size=128,
        eval_particles=2,
        final_particles=0,
        device="cpu",
        elbo="trace",
        beta=0.5,
        warmup=10,
    )
    full = fit(config=config, run_dir=tmp_path / "full", progress=False, fused=True)
    fit(config=config.replace(epochs=2), run_dir=tmp_path / "part", progress=False, fused=False)
    resumed = fit(config=config, run_dir=tmp_path / "part", resume=True, progress=False, fused=True)
    assert resumed.history.train_loss == full.history.train_loss
    assert resumed.history.test_elbo == full.history.test_elbo
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


class _OwnModelVAE(VAE):
    def model(self, x=None, num_data=None):
        return super().model(x, num_data)


@pytest.mark.parametrize(
    "case",
    [
        "cvae",
        "vae2",
        "vae-full-guide",
        "subclass",
        "instance-override",
        "stl",
        "dreg",
        "two-particles",
        "estimator-subclass",
    ],
)
def test_the_traced_path_is_kept_wherever_the_fused_loss_does_not_apply(case):
    estimator = make_estimator("trace", max_plate_nesting=1)
    module = PAIRS.get(case, _vae)()[0]
    if case == "subclass":
        module = _OwnModelVAE(D, LATENT, (16,))
    elif case == "instance-override":
        module.model = module.model
    elif case == "two-particles":
        estimator = make_estimator("meanfield", num_particles=2, max_plate_nesting=1)
    elif case == "estimator-subclass":  # its loss may differ: e.g. one that records calls
        estimator = type("RecordingELBO", (TraceELBO,), {})(max_plate_nesting=1)
    elif case not in PAIRS:  # an estimator the fused loss does not compute
        estimator = make_estimator(case, max_plate_nesting=1)
    assert not supports(module, estimator)
    assert not isinstance(training_loss(module, estimator), FusedLoss)
    with pytest.raises(ValueError, match="no fused loss"):
        FusedLoss(module, estimator)


def test_the_fused_loss_goes_the_traced_way_under_handlers_and_validation():
    vae, x = _fused_pair({})
    loss_fn = FusedLoss(vae, make_estimator("meanfield", max_plate_nesting=1))
    with poutine.trace(param_only=True) as capture, pyro.validation_enabled(False):
        loss_fn(x)
    assert len(capture.trace.param_nodes) == len(list(vae.parameters()))  # the model and guide ran
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="support"):
        loss_fn(x * 0.5)  # not binary: Bernoulli's support check, which the traced path runs
    with pyro.validation_enabled(False):
        assert torch.isfinite(loss_fn(x * 0.5))


# ----------------------------------------------------------------------------- benchmark smoke


def test_step_benchmark_times_all_four_paths_after_checking_them(tmp_path, monkeypatch, capsys):
    """A tiny run of benchmarks/bench_step.py: its fused-vs-traced check passes (bit for bit) and
    the JSON holds every implementation and ratio, and each row by the peers' names. Nothing
    about the timings is asserted."""
    import json

    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_step", monkeypatch)
    out = tmp_path / "step.json"
    assert (
        bench.main(
            [
                "--threads",
                "1",
                "--rounds",
                "1",
                "--block-seconds",
                "0.001",
                "--warmup-steps",
                "1",
                "--batch-sizes",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert {t["implementation"] for t in report["timings"]} == set(bench.IMPLEMENTATIONS)
    for row, peers in zip(report["summary"], report["rows"], strict=True):
        assert {
            "fused_over_torch_cpu",
            "traced_over_torch_cpu",
            "pyro_over_torch_cpu",
            "fused_over_torch_paired_cpu",
            "fused_over_traced",
        } <= set(row)
        cpu = {
            t["implementation"]: t["cpu_rounds_ms"]
            for t in report["timings"]
            if (t["elbo"], t["batch_size"]) == (row["elbo"], row["batch_size"])
        }
        assert row["fused_over_torch_paired_cpu"] == pytest.approx(
            cpu["fused"][0] / cpu["torch"][0]
        )  # one round: the ratio of its two blocks
        assert row["fused_over_torch_paired_cpu"] > 0
        assert (peers["net"], peers["batch"], peers["elbo"]) == ("64-128-8", 4, row["elbo"])
        assert peers["ms"] == {
            "hand": row["torch_ms"],
            "stock_pyro": row["pyro_ms"],
            "eager": row["fused_ms"],
            "eager_traced": row["traced_ms"],
        }
    printed = capsys.readouterr()
    assert "fused == traced (bit for bit)" in printed.err
    assert "package, fused path ms" in printed.out and "CPU time: medians" in printed.out


def test_step_benchmark_torch_profiler_finds_the_networks_matrix_products(monkeypatch, capsys):
    """--profiler torch: every profiled step runs the encoder's and decoder's linear layers, so
    the operator table must list their matrix products with a positive self time."""
    load_benchmark("harness", monkeypatch)
    bench = load_benchmark("bench_step", monkeypatch)
    config = bench.parse_args(
        [
            "--profile",
            "--profiler",
            "torch",
            "--profile-impl",
            "fused",
            "--elbos",
            "trace",
            "--batch-sizes",
            "4",
            "--threads",
            "1",
            "--warmup-steps",
            "1",
            "--profile-steps",
            "3",
        ]
    )
    report = bench.run_profile(config, torch.device("cpu"))
    operators = report["64-128-8/trace/4"]["operators_self_us_per_step"]
    products = {"aten::mm", "aten::addmm"} & set(operators)
    assert products and all(operators[name] > 0 for name in products)
    assert report["64-128-8/trace/4"]["total_self_us_per_step"] > 0


def test_dreg_benchmark_checks_the_single_run_against_two_runs(tmp_path, monkeypatch, capsys):
    """A tiny run of benchmarks/bench_dreg.py on the two-layer model (the rescaled gradient
    must reach z1 through z2 once): the single run's loss and gradients agree with the two
    runs' before anything is timed, and the JSON holds each step's time and the ratios.
    Nothing about the timings is asserted."""
    import json
    import sys

    monkeypatch.setattr(sys, "path", list(sys.path))
    load_benchmark("mnist_table", monkeypatch)
    bench = load_benchmark("bench_dreg", monkeypatch)
    out = tmp_path / "dreg.json"
    assert (
        bench.main(
            [
                "--layers",
                "2",
                "--k",
                "3",
                "--batch-size",
                "4",
                "--rounds",
                "1",
                "--steps",
                "1",
                "--warmup",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["gradient_check_relative"] < 1e-5
    assert set(report["cpu_seconds_per_step"]) == set(bench.IMPLEMENTATIONS)
    assert report["dreg_over_iwae"] > 0 and report["two_runs_over_single"] > 0
    dreg = report["ratios"]["dreg"]["cpu"]
    assert dreg["median"] == report["dreg_over_iwae"]
    assert dreg["min"] <= dreg["median"] <= dreg["max"]
    assert "dreg / iwae = " in capsys.readouterr().out
