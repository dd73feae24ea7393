"""Compiled SVI steps: the captured graph takes the eager step's draws, loss and update for every
estimator and for users' pairs (sequences with masks, keyword data, a global latent); compiled
runs resume exactly; what cannot be captured trains eagerly with one line.

Tolerances. The captured graph (``backend=None``) runs the eager step's own tensor operations in
the same order, so the loss is bit-identical; only Adam's bias corrections are rounded
differently (float32 tensors in the graph, Python doubles in ``torch.optim.Adam``), about one
float32 ulp of the update, so parameters agree to 1e-6 after a few steps at lr 1e-2. Inductor's
kernels (with its random numbers taken from torch's eager generator, ``fallback_random``) also
reassociate float32 sums: relative 1e-5 on the loss, 1e-5 on the parameters. After the first
step the losses see parameters that differ by that rounding: relative 1e-5.
"""

import copy
import shutil

import pyro
import pytest
import torch
from user_models import (
    FactorAnalysis,
    LinearSequenceModel,
    Regression,
    Sequences,
    fa_data,
    pad_collate,
    regression_data,
)

from pyro_vae import fit
from pyro_vae.infer import make_estimator
from pyro_vae.models.vae import VAE
from pyro_vae.train.compiled import CompiledStep
from pyro_vae.train.fused import training_loss
from pyro_vae.train.step import svi_step

LR = 1e-2
needs_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="inductor needs a C++ compiler on the CPU",
)


def _steps(
    module, estimator, args, kwargs, compiled: bool, steps: int = 3, backend=None, seed: int = 0
):
    module = copy.deepcopy(module)
    pyro.clear_param_store()
    loss_fn = training_loss(module, estimator)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    num = next(v for v in [*args, *kwargs.values()] if torch.is_tensor(v)).shape[0]

    def eager(a, k, n):
        return svi_step(lambda: loss_fn(*a, **k), n, optimizer)

    notes = []
    step = (
        CompiledStep(
            module,
            estimator,
            optimizer,
            loss_fn,
            eager,
            backend=backend,
            log=notes.append if backend else pytest.fail,
        )
        if compiled
        else None
    )
    losses = []
    torch.manual_seed(seed)
    with pyro.validation_enabled(False):
        for _ in range(steps):
            losses.append(step(args, kwargs, num) if compiled else eager(args, kwargs, num))
    if compiled and step.disabled is None:
        assert step.compiled_steps == steps and len(step.graphs) == 1 and not notes
    elif compiled:  # a compiler that fails (one on a loaded machine may) falls back, and says so
        assert_fallback_announced(step, notes, steps)
    return (
        torch.stack(losses),
        [p.detach().clone() for p in module.parameters()],
        [b.clone() for b in module.buffers()],
    )


def assert_fallback_announced(step, notes, steps):
    """A compiled step that fell back to eager steps said why in one line and still took every
    step."""
    assert step.compiled_steps + step.eager_steps == steps and step.eager_steps >= 1
    assert notes == [f"compiled steps off: {step.disabled}; training eagerly"], notes


def _assert_same_steps(module, estimator, args, kwargs=None, backend=None, rtol=0.0, atol=1e-6):
    kwargs = kwargs or {}
    eager_loss, eager_params, _ = _steps(module, estimator, args, kwargs, compiled=False)
    graph_loss, graph_params, _ = _steps(
        module, estimator, args, kwargs, compiled=True, backend=backend
    )
    if backend is None:  # the first step's draws and loss are the eager step's, bit for bit
        assert graph_loss[0].item() == eager_loss[0].item()
    # later losses see parameters that differ by the update's rounding
    torch.testing.assert_close(graph_loss, eager_loss, rtol=max(rtol, 1e-5), atol=1e-5)
    for got, want in zip(graph_params, eager_params):
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def _vae_batch():
    torch.manual_seed(0)
    return torch.bernoulli(torch.full((16, 12), 0.4))


@pytest.mark.parametrize(
    "name, particles, k",
    [("trace", 1, 1), ("meanfield", 2, 1), ("iwae", 1, 3), ("stl", 2, 1), ("dreg", 1, 3)],
)
def test_the_captured_step_equals_the_eager_step_for_every_estimator(name, particles, k):
    torch.manual_seed(1)
    module = VAE(12, latent_dim=3, hidden=(8,))
    _assert_same_steps(
        module, make_estimator(name, particles, k, max_plate_nesting=1), (_vae_batch(),)
    )


def test_the_captured_step_of_a_sequence_model_with_masks_equals_the_eager_step():
    batch = pad_collate([Sequences(8, seed=3)[i] for i in range(8)])
    _assert_same_steps(
        LinearSequenceModel(),
        make_estimator("iwae", importance_samples=2, max_plate_nesting=None),
        (),
        batch,
    )


def test_the_captured_step_of_keyword_data_and_a_full_covariance_guide_equals_eager():
    _assert_same_steps(
        Regression(), make_estimator("trace", max_plate_nesting=None), (), regression_data(32)
    )
    x = torch.as_tensor(fa_data(32))
    _assert_same_steps(FactorAnalysis(), make_estimator("meanfield", max_plate_nesting=None), (x,))


@needs_compiler
def test_the_inductor_compiled_step_equals_the_eager_step():
    import torch._inductor.config as inductor_config

    torch.manual_seed(1)
    module = VAE(12, latent_dim=3, hidden=(8,))
    with inductor_config.patch(fallback_random=True):  # torch's own patcher: undone as set
        _assert_same_steps(
            module,
            make_estimator("iwae", importance_samples=3, max_plate_nesting=1),
            (_vae_batch(),),
            backend="inductor",
            rtol=1e-5,
            atol=1e-5,
        )


@needs_compiler
def test_a_resumed_compiled_run_equals_an_uninterrupted_compiled_run(tmp_path):
    data = fa_data(64)
    common = dict(
        batch_size=32,
        lr=LR,
        seed=3,
        final_particles=0,
        progress=False,
        compile=True,
        elbo="iwae",
        importance_samples=2,
    )
    whole = fit(FactorAnalysis(), data, epochs=3, run_dir=tmp_path / "whole", **common)
    first = fit(FactorAnalysis(), data, epochs=1, run_dir=tmp_path / "part", **common)
    resumed = fit(
        FactorAnalysis(), data, epochs=3, run_dir=tmp_path / "part", resume=True, **common
    )
    runs = (whole.compiled, first.compiled, resumed.compiled)
    # a compiler that fails (one on a loaded machine may) trains eagerly instead; every step
    # is taken either way
    assert [c.compiled_steps + c.eager_steps for c in runs] == [6, 2, 4]
    assert all((c.disabled is None) == (c.eager_steps == 0) for c in runs)
    if all(c.disabled is None for c in runs):  # the same graphs: the same numbers, bit for bit
        assert resumed.history.train_loss == whole.history.train_loss
        tolerance = 0
    else:  # inductor's kernels against eager steps: float32 reassociation
        torch.testing.assert_close(
            resumed.history.train_loss, whole.history.train_loss, rtol=1e-5, atol=1e-5
        )
        tolerance = 1e-5
    for a, b in zip(resumed.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


class DataDependent(FactorAnalysis):
    """A pair whose control flow reads the data's values: it cannot be captured."""

    def model(self, x):
        if x.sum() > 0:
            super().model(x)
        else:
            super().model(-x)


def test_a_pair_with_data_dependent_control_flow_trains_eagerly_with_one_line(capsys):
    data = fa_data(32)
    common = dict(batch_size=32, epochs=2, lr=LR, seed=0, final_particles=0, progress=False)
    eager = fit(DataDependent(), data, **common)
    capsys.readouterr()
    fallback = fit(DataDependent(), data, compile=True, **common)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "pyro-vae: compiled steps off: the step could not be captured"
    ), err
    assert fallback.compiled.eager_steps == 2 and fallback.compiled.compiled_steps == 0
    assert fallback.history.train_loss == eager.history.train_loss


def test_new_signatures_past_the_cap_run_eagerly_with_one_line():
    torch.manual_seed(1)
    module = VAE(12, latent_dim=3, hidden=(8,))
    estimator = make_estimator("trace", max_plate_nesting=1)
    loss_fn = training_loss(module, estimator)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    notes = []
    step = CompiledStep(
        module,
        estimator,
        optimizer,
        loss_fn,
        lambda a, k, n: svi_step(lambda: loss_fn(*a, **k), n, optimizer),
        backend=None,
        max_graphs=1,
        log=notes.append,
    )
    x = _vae_batch()
    with pyro.validation_enabled(False):
        for batch in (x, x[:5], x, x[:7]):
            step((batch,), {}, batch.shape[0])
    assert (step.compiled_steps, step.eager_steps, len(step.graphs)) == (2, 2, 1)
    assert notes == [
        "compiled steps: more than 1 input signatures (batch shapes, β values); "
        "the others run eagerly"
    ]


def test_an_optimizer_other_than_adam_is_refused_in_one_line():
    module = VAE(12, latent_dim=3, hidden=(8,))
    notes = []
    step = CompiledStep(
        module,
        make_estimator("trace", max_plate_nesting=1),
        torch.optim.SGD(module.parameters(), lr=LR),
        lambda x: x,
        lambda a, k, n: torch.zeros(()),
        log=notes.append,
    )
    assert step.disabled and notes == [
        "compiled steps off: the optimizer is SGD, and only "
        "Adam's update is compiled; training eagerly"
    ]


@needs_compiler
def test_the_command_line_reports_the_compiled_steps(tmp_path, capsys):
    from pyro_vae.app.cli import main

    argv = [
        "train",
        "--epochs",
        "2",
        "--batch-size",
        "512",
        "--latent-dim",
        "2",
        "--hidden",
        "8",
        "--device",
        "cpu",
        "--quiet",
        "--compile",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    fallback = [line for line in captured.err.splitlines() if "compiled steps off" in line]
    if fallback:  # a compiler that fails (one on a loaded machine may): one line says so
        assert len(fallback) == 1 and "training eagerly" in fallback[0], captured.err
        assert "compiled steps:" not in captured.out
    else:  # 1497 training digits in batches of 512: two full batches and one of 473
        assert "compiled steps: 2 graph(s) compiled in" in captured.out
        assert "6 compiled and 0 eager" in captured.out


@pytest.mark.parametrize("name, k", [("iwae", 2), ("dreg", 2), ("stl", 1), ("meanfield", 1)])
def test_the_captured_step_of_a_guide_with_an_enumerated_site_equals_the_eager_step(name, k):
    from mixtures import LearnedFactorAnalysers, points

    _assert_same_steps(
        LearnedFactorAnalysers(exact=False),
        make_estimator(name, 1, k, max_plate_nesting=1),
        (points(8),),
    )


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_the_captured_step_of_a_replayed_batchnorm_guide_equals_the_eager_step(name):
    """stl and dreg replay this guide, whose BatchNorm runs in train mode: the graph moves the
    running statistics as the eager step does, once per step."""
    from batchnorm_pair import BatchNormTwoSiteGuide, D

    torch.manual_seed(0)
    module, x = (
        BatchNormTwoSiteGuide(),
        torch.randn(12, D, generator=torch.Generator().manual_seed(3)),
    )
    _assert_same_steps(module, make_estimator(name, 1, 1, max_plate_nesting=1), (x,))
    statistics = [
        _steps(
            module, make_estimator(name, 1, 1, max_plate_nesting=1), (x,), {}, compiled=compiled
        )[2]
        for compiled in (False, True)
    ]
    assert statistics[0][-1].item() == statistics[1][-1].item() == 3  # num_batches_tracked
    for eager, graph in zip(*statistics):
        torch.testing.assert_close(graph, eager, rtol=0, atol=1e-6)


def test_a_plain_tensor_attribute_trains_eagerly_with_a_line_that_names_register_buffer():
    from mixtures import LearnedFactorAnalysers, points

    module, lines = LearnedFactorAnalysers(exact=False, buffers=False), []
    estimator = make_estimator("iwae", 1, 2, max_plate_nesting=1)
    loss_fn = training_loss(module, estimator)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)

    def eager(a, k, n):
        return svi_step(lambda: loss_fn(*a, **k), n, optimizer)

    step = CompiledStep(module, estimator, optimizer, loss_fn, eager, log=lines.append)
    with pyro.validation_enabled(False):
        loss = step((points(8),), {}, 8)
    assert torch.isfinite(loss) and step.eager_steps == 1 and len(lines) == 1
    assert "neither a parameter, a buffer nor an argument" in lines[0]
    assert "register_buffer" in lines[0] and "\n" not in lines[0]
