"""Cost of one SVI step: hand-written torch vs the package's fused and traced paths vs stock Pyro.

Four implementations of the same gradient step on the same network, batch and Adam are timed in
one process, interleaved so that they share the machine's noise:

``torch``
    A hand-written loop on the model's own encoder/decoder modules: ``z = loc + scale * eps``,
    Bernoulli log-likelihood by ``binary_cross_entropy_with_logits``, closed-form KL (``meanfield``)
    or the single-sample Monte Carlo KL ``log q(z|x) - log p(z)`` (``trace``), loss averaged over
    the batch, Adam. This is the floor: no traces, no distribution objects.
``fused``
    The step of :func:`pyro_vae.fit` for the package's own VAE: the loss of
    :func:`pyro_vae.train.fused.training_loss` (a :class:`~pyro_vae.train.fused.FusedLoss`,
    computed from the networks without Pyro's effect handlers) divided by the batch size, Adam,
    validation off.
``traced``
    The general path, which every other model/guide pair and estimator takes (and
    ``train(..., fused=False)``): ``make_estimator(name).differentiable_loss(model, guide, x)`` / B,
    Adam, Pyro validation off. The estimator class behind ``make_estimator`` is recorded.
``pyro``
    What a Pyro user writes: ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step(batch)``
    (or ``TraceMeanField_ELBO()``) with Pyro's default validation on.
``compiled`` (with ``--compile``)
    The fused loss with the encoder, decoder and arithmetic under ``torch.compile`` (the noise
    drawn outside it by the same call), an option this benchmark measures and the package does
    not take: compiling takes tens of seconds per batch shape, and the compiled kernels round
    differently (the check reports by how much). The first call's seconds, compilation
    included, are recorded.
``baseline`` (with ``--baseline DIR``)
    The traced package step of another copy of the package, e.g. an earlier commit's
    (``git archive COMMIT pyro_vae | tar -x -C /tmp/before``, then ``--baseline
    /tmp/before/pyro_vae``), imported under another name in the same process: its ``VAE`` with
    the same weights and its ``infer.make_estimator`` (``objectives.make_estimator``
    in a copy from before ``pyro_vae/infer/``). Before/after comparisons then share
    the process and the interleaved rounds.

``--adam fused`` (the default, what :func:`pyro_vae.train.make_optimizer` builds) or ``plain``
picks the ``torch.optim.Adam`` of the first two and the baseline; stock Pyro keeps
``pyro.optim.Adam``.

Before timing, the hand-written loss and gradients are checked against the traced path's on the
same random draw (to float rounding: the closed forms differ from the distributions'
arithmetic), and the fused path's against the traced path's (bit for bit), so the comparison is
between equal computations. Each (ELBO, batch size, implementation) is warmed up, calibrated to
blocks of about ``--block-seconds``, then timed in ``--rounds`` rounds whose order rotates; the
median seconds per step over the rounds is reported, for the wall clock and for the process's
CPU time (the steadier one on a shared machine with ``--threads 1``).

``--breakdown`` instead times nested pieces of the forward and backward pass (the networks
alone, the hand-written loss, the model and guide without and with tracing, the fused and traced
losses) with ``timeit``-style blocks, so the difference between the loops can be split up.

``--profile`` instead runs one step (``--profile-impl``, default the traced path) under
:mod:`cProfile` and prints the functions with the largest cumulative time, plus the share of a few
landmarks (trace construction, log-prob computation, param-store registration, distribution
construction, validation, backward, optimizer). cProfile inflates Python-heavy code relative to
torch kernels, so read the shares as an upper bound on Python overhead.

    python benchmarks/bench_svi.py --threads 1                      # digits, B = 20 and 128
    python benchmarks/bench_svi.py --dataset mnist --data-dir DIR --threads 1 --out bench.json
    python benchmarks/bench_svi.py --dataset mnist --data-dir DIR --device cuda --out gpu.json
    python benchmarks/bench_svi.py --baseline /tmp/before/pyro_vae      # before/after, one process
    python benchmarks/bench_svi.py --profile --elbos trace --batch-sizes 128 --threads 1
    python benchmarks/bench_svi.py --breakdown --elbos meanfield --batch-sizes 20 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from pyro_vae import VAE, ModelConfig, PyroVAEError, make_estimator
from pyro_vae.core.traces import trace_pair
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.images import Dataset, load_dataset
from pyro_vae.models.config import DEVICES
from pyro_vae.train import make_optimizer, svi_step
from pyro_vae.train.fused import FusedLoss, training_loss

IMPLEMENTATIONS = ("torch", "fused", "traced", "pyro")
LABELS = {
    "torch": "hand-written torch",
    "fused": "package, fused path",
    "traced": "package, Pyro-traced path",
    "pyro": "stock Pyro SVI",
    "compiled": "fused path, torch.compile",
    "baseline": "baseline package step",
}
ADAMS = ("fused", "plain")
BASELINE_MODULE = "pyro_vae_baseline"
STOCK_ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
ELBOS = tuple(STOCK_ELBOS)  # the estimators with a stock Pyro and a hand-written twin
NETWORKS = {
    "digits": ModelConfig(latent_dim=8, hidden=(128,)),
    "mnist": ModelConfig(latent_dim=20, hidden=(400,)),
}
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-5
MS_PER_S = 1e3
EXIT_USER_ERROR = 2
NOISY_SPREAD = 2.0  # slowest round / median round above which a timing is flagged as noisy

# Profile landmarks: (label, filename suffix, function name). Cumulative times overlap.
LANDMARKS = (
    ("SVI.step", "pyro/infer/svi.py", "step"),
    ("ELBO differentiable_loss", "pyro/infer/trace_elbo.py", "differentiable_loss"),
    ("ELBO loss_and_grads", "pyro/infer/trace_elbo.py", "loss_and_grads"),
    ("package fused loss", "pyro_vae/train/fused.py", "__call__"),
    ("package estimator differentiable_loss", "pyro_vae/infer/elbo.py", "differentiable_loss"),
    (
        "  vectorized_log_probs (particle plate)",
        "pyro_vae/core/log_probs.py",
        "vectorized_log_probs",
    ),
    ("  get_importance_trace", "pyro/infer/enum.py", "get_importance_trace"),
    (
        "    run guide, replay model under poutine.trace",
        "pyro/poutine/trace_messenger.py",
        "get_trace",
    ),
    ("    Trace.compute_log_prob", "pyro/poutine/trace_struct.py", "compute_log_prob"),
    ("    Trace.compute_score_parts", "pyro/poutine/trace_struct.py", "compute_score_parts"),
    ("    pyro.sample", "pyro/primitives.py", "sample"),
    ("    plate messenger", "pyro/poutine/plate_messenger.py", "_process_message"),
    ("    register_module (pyro.param per weight)", "pyro_vae/models/vae.py", "register_module"),
    ("      pyro.param", "pyro/primitives.py", "param"),
    ("    encoder / decoder forward", "pyro_vae/models/nets.py", "forward"),
    ("    distribution __init__ (torch)", "torch/distributions/distribution.py", "__init__"),
    ("    kl_divergence", "torch/distributions/kl.py", "kl_divergence"),
    ("    validation: check_model_guide_match", "pyro/util.py", "check_model_guide_match"),
    ("    validation: check_site_shape", "pyro/util.py", "check_site_shape"),
    (
        "    validation: Distribution._validate_sample",
        "torch/distributions/distribution.py",
        "_validate_sample",
    ),
    ("  pyro.optim per-parameter optimizers", "pyro/optim/optim.py", "__call__"),
    ("  Tensor.backward", "torch/_tensor.py", "backward"),
    ("  Adam.step", "torch/optim/adam.py", "step"),
    ("  Optimizer.zero_grad", "torch/optim/optimizer.py", "zero_grad"),
)


@dataclass(frozen=True)
class BenchConfig:
    """What one benchmark run measures and how.

    ``network`` defaults to the dataset's (``NETWORKS``); ``threads`` to torch's default.
    ``block_seconds`` is the target length of one timed block of consecutive steps.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    batch_sizes: tuple[int, ...] = (20, 128)
    elbos: tuple[str, ...] = ELBOS
    network: ModelConfig | None = None
    device: str = "auto"
    threads: int | None = None
    lr: float = 1e-3
    seed: int = 0
    warmup_steps: int = 20
    calibration_steps: int = 10
    rounds: int = 21
    block_seconds: float = 0.05
    min_block_steps: int = 5
    check: bool = True
    adam: str = "fused"
    compile: bool = False
    baseline: str | None = None
    profile: bool = False
    breakdown: bool = False
    profile_impl: str = "traced"
    profile_steps: int = 300
    profile_top: int = 25
    profile_sort: str = "cumulative"
    profiler: str = "cprofile"
    out: str | None = None

    def resolved_network(self) -> ModelConfig:
        return self.network if self.network is not None else NETWORKS[self.dataset]

    @property
    def implementations(self) -> tuple[str, ...]:
        return (
            IMPLEMENTATIONS
            + (("compiled",) if self.compile else ())
            + (("baseline",) if self.baseline else ())
        )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["network"] = dataclasses.asdict(self.resolved_network())
        return out


@dataclass(frozen=True)
class Timing:
    """Seconds per step of one implementation, one value per round: wall-clock, and the
    process's CPU time (user + system; it does not advance while other processes hold the
    cores, so on a shared machine with one torch thread it is the steadier of the two)."""

    elbo: str
    batch_size: int
    implementation: str
    steps_per_block: int
    seconds_per_step: tuple[float, ...]
    cpu_seconds_per_step: tuple[float, ...] = ()
    first_call_seconds: float = math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.seconds_per_step)

    @property
    def cpu_median(self) -> float:
        return (
            statistics.median(self.cpu_seconds_per_step) if self.cpu_seconds_per_step else math.nan
        )

    @property
    def spread(self) -> float:
        return max(self.seconds_per_step) / self.median

    def to_dict(self) -> dict[str, Any]:
        return {
            "elbo": self.elbo,
            "batch_size": self.batch_size,
            "implementation": self.implementation,
            "steps_per_block": self.steps_per_block,
            "median_ms": self.median * MS_PER_S,
            "min_ms": min(self.seconds_per_step) * MS_PER_S,
            "spread": self.spread,
            "rounds_ms": [s * MS_PER_S for s in self.seconds_per_step],
            "cpu_median_ms": self.cpu_median * MS_PER_S,
            "first_call_s": self.first_call_seconds,
            "cpu_rounds_ms": [s * MS_PER_S for s in self.cpu_seconds_per_step],
        }


@functools.cache
def cached_dataset(name: str, data_dir: str | None) -> Dataset:
    """:func:`pyro_vae.data.images.load_dataset`, once per process and arguments: MNIST's files are
    read and checksummed once however many benchmarks use them (callers must not modify the
    tensors)."""
    return load_dataset(name, data_dir)


def _binarized_images(config: BenchConfig) -> torch.Tensor:
    dataset = cached_dataset(config.dataset, config.data_dir)
    generator = torch.Generator().manual_seed(config.seed)
    return torch.bernoulli(dataset.train.images, generator=generator)


def _batch(images: torch.Tensor, batch_size: int, seed: int) -> torch.Tensor:
    if batch_size > images.shape[0]:
        raise ValueError(f"batch size {batch_size} exceeds the {images.shape[0]} training images")
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    return images[order[:batch_size]]


def torch_loss(model: VAE, x: torch.Tensor, elbo: str) -> torch.Tensor:
    """−ELBO averaged over the batch, written directly in torch.

    ``meanfield``: E_q[−log p(x|z)] + KL(N(loc, scale²) ‖ N(0, I)) in closed form.
    ``trace``: −log p(x|z) + log q(z|x) − log p(z) at one reparameterized z; the −½ log 2π
    constants of log q and log p cancel and are left out.
    The closed forms are spelled out on purpose: this is the no-distribution-object floor.
    """
    loc, scale = model.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    nll = F.binary_cross_entropy_with_logits(model.decoder(z), x, reduction="none").sum(-1)
    if elbo == "meanfield":
        kl = 0.5 * (loc.square() + scale.square() - 1.0).sum(-1) - scale.log().sum(-1)
    else:
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log()).sum(-1)
        log_p = (-0.5 * z.square()).sum(-1)
        kl = log_q - log_p
    return (nll + kl).mean()


def _adam(model: torch.nn.Module, lr: float, adam: str) -> torch.optim.Adam:
    """``adam`` "fused": :func:`pyro_vae.train.make_optimizer`'s Adam; "plain": torch's default."""
    if adam == "fused":
        return make_optimizer(model.parameters(), lr)
    return torch.optim.Adam(model.parameters(), lr=lr)


def _torch_step(
    model: VAE, batch: torch.Tensor, elbo: str, lr: float, adam: str = "fused"
) -> Callable[[], None]:
    optimizer = _adam(model, lr, adam)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch_loss(model, batch, elbo).backward()
        optimizer.step()

    return step


def _loss_step(
    model: VAE,
    batch: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    lr: float,
    adam: str,
) -> Callable[[], None]:
    """The step of :func:`pyro_vae.fit`: :func:`pyro_vae.train.svi_step` on
    ``loss_fn(batch)``, Adam."""
    optimizer = _adam(model, lr, adam)
    loss_of_batch = partial(loss_fn, batch)
    batch_size = batch.shape[0]

    def step() -> None:
        svi_step(loss_of_batch, batch_size, optimizer)

    return step


def _fused_loss(model: VAE, estimator: Any, elbo: str) -> FusedLoss:
    """:func:`pyro_vae.train.fused.training_loss`, which must be the fused one."""
    loss_fn = training_loss(model, estimator)
    if not isinstance(loss_fn, FusedLoss):
        raise ValueError(f"the package has no fused loss for this VAE with {elbo!r}")
    return loss_fn


def _traced_loss(model: Any, estimator: Any) -> Callable[..., torch.Tensor]:
    """The traced path's loss, ``estimator.differentiable_loss(model.model, model.guide, x)``."""
    return training_loss(model, estimator, fused=False)


def _fused_step(
    model: VAE, batch: torch.Tensor, elbo: str, lr: float, adam: str = "fused"
) -> Callable[[], None]:
    return _loss_step(
        model, batch, _fused_loss(model, make_estimator(elbo, max_plate_nesting=1), elbo), lr, adam
    )


def _traced_step(
    model: VAE,
    batch: torch.Tensor,
    elbo: str,
    lr: float,
    adam: str = "fused",
    estimator: Any = None,
) -> Callable[[], None]:
    estimator = make_estimator(elbo, max_plate_nesting=1) if estimator is None else estimator
    return _loss_step(model, batch, _traced_loss(model, estimator), lr, adam)


COMPILE_CHECKS: dict[tuple[str, int], dict[str, float]] = {}


def _compiled_step(
    model: VAE, batch: torch.Tensor, elbo: str, lr: float, adam: str = "fused"
) -> Callable[[], None]:
    """:func:`_fused_step` with ``torch.compile`` around everything but the noise draw. Its
    first call is compared with the traced path on the same draw (to rounding), and the largest
    differences are kept in :data:`COMPILE_CHECKS`."""
    estimator = make_estimator(elbo, max_plate_nesting=1)
    fused = _fused_loss(model, estimator, elbo)
    traced = _traced_loss(model, estimator)

    def loss_at(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        loc, scale = model.encoder(x)
        return -fused.bound(x, loc, scale, eps).sum(-1)

    compiled = torch.compile(loss_at)

    def loss_fn(x: torch.Tensor) -> torch.Tensor:
        eps = torch.empty((x.shape[0], model.latent_dim), dtype=x.dtype, device=x.device).normal_()
        return compiled(x, eps)

    b = batch.shape[0]
    start = time.perf_counter()
    value, grads = _loss_and_grads(model, lambda: loss_fn(batch) / b, 0)
    compile_seconds = time.perf_counter() - start  # compilation included, unless reused
    want, want_grads = _loss_and_grads(model, lambda: traced(batch) / b, 0)
    torch.testing.assert_close(value, want, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    for mine, theirs in zip(grads, want_grads):
        torch.testing.assert_close(mine, theirs, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    COMPILE_CHECKS[elbo, b] = {
        "first_call_seconds": compile_seconds,
        "loss_abs_difference": (value - want).abs().item(),
        "grad_max_relative_difference": max(
            ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
            for g, w in zip(grads, want_grads)
        ),
    }
    return _loss_step(model, batch, loss_fn, lr, adam)


def _pyro_step(
    model: VAE, batch: torch.Tensor, elbo: str, lr: float, adam: str = "fused"
) -> Callable[[], None]:
    """Stock Pyro with its own (per-parameter, unfused) Adam whatever ``adam`` says."""
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": lr}), STOCK_ELBOS[elbo]())

    return lambda: svi.step(batch)


def load_baseline(path: str) -> Any:
    """The package folder ``path`` imported as :data:`BASELINE_MODULE` (its own relative
    imports resolve inside it), next to the installed ``pyro_vae``."""
    spec = importlib.util.spec_from_file_location(
        BASELINE_MODULE, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
    )
    if spec is None:
        raise ValueError(f"no Python package in {path!r}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_MODULE] = package
    spec.loader.exec_module(package)
    try:
        importlib.import_module(f"{BASELINE_MODULE}.infer")
    except ModuleNotFoundError as error:  # a copy from before pyro_vae/infer/
        if error.name != f"{BASELINE_MODULE}.infer":
            raise
        importlib.import_module(f"{BASELINE_MODULE}.objectives")
    return package


def _baseline_estimators(package: Any) -> Any:
    """The estimator module of a baseline package: ``infer``, or ``objectives`` before it."""
    return getattr(package, "infer", None) or package.objectives


def _baseline_step(
    model: VAE, batch: torch.Tensor, elbo: str, lr: float, adam: str = "fused", package: Any = None
) -> Callable[[], None]:
    """The package step of ``package`` (see :func:`load_baseline`) on a copy of ``model``."""
    config = model.config
    twin = package.models.VAE(
        model.input_dim, config.latent_dim, config.hidden, config.scale_fn
    ).to(batch.device)
    twin.load_state_dict(model.state_dict())
    twin.name = f"{model.name}-baseline"
    return _traced_step(
        twin,
        batch,
        elbo,
        lr,
        adam,
        estimator=_baseline_estimators(package).make_estimator(elbo, max_plate_nesting=1),
    )


STEP_BUILDERS = {
    "torch": _torch_step,
    "fused": _fused_step,
    "traced": _traced_step,
    "pyro": _pyro_step,
    "compiled": _compiled_step,
}
# Pyro validation around each timed block: off in the package's loop, on (the default) for users.
VALIDATION = {
    "torch": None,
    "fused": False,
    "traced": False,
    "pyro": True,
    "compiled": False,
    "baseline": False,
}


def _model_copy(base: VAE, name: str) -> VAE:
    """An independent copy of ``base`` registered in Pyro's param store under its own name."""
    model = copy.deepcopy(base)
    model.name = name
    return model


def _loss_and_grads(
    model: VAE, loss_fn: Callable[[], torch.Tensor], seed: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        loss = loss_fn()
    return loss.detach(), list(torch.autograd.grad(loss, list(model.parameters())))


def check_equivalence(base: VAE, batch: torch.Tensor, elbo: str, seed: int) -> float:
    """Assert that on the same random draw the fused loss and gradients equal the traced path's
    bit for bit, and :func:`torch_loss`'s equal them to float rounding (its closed forms are
    other arithmetic); return the loss per datapoint."""
    b = batch.shape[0]
    model = _model_copy(base, f"check-{elbo}-{b}")
    estimator = make_estimator(elbo, max_plate_nesting=1)
    fused = training_loss(model, estimator)
    traced = _traced_loss(model, estimator)
    traced_value, traced_grads = _loss_and_grads(model, lambda: traced(batch) / b, seed)
    fused_value, fused_grads = _loss_and_grads(model, lambda: fused(batch) / b, seed)
    torch_value, torch_grads = _loss_and_grads(model, lambda: torch_loss(model, batch, elbo), seed)
    if not (
        torch.equal(fused_value, traced_value) and all(map(torch.equal, fused_grads, traced_grads))
    ):
        raise AssertionError(
            f"{elbo}, B = {b}: the fused loss or gradients differ from the traced path's"
        )
    torch.testing.assert_close(torch_value, traced_value, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    for mine, theirs in zip(torch_grads, traced_grads):
        torch.testing.assert_close(mine, theirs, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    return float(traced_value)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_block_clocks(
    step: Callable[[], None], steps: int, sync: Callable[[], None], validation: bool | None = None
) -> tuple[float, float]:
    """Wall-clock and CPU seconds per step over a block of ``steps`` consecutive steps."""
    context = nullcontext() if validation is None else pyro.validation_enabled(validation)
    with context:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        sync()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _time_block(
    step: Callable[[], None], steps: int, sync: Callable[[], None], validation: bool | None = None
) -> float:
    return _time_block_clocks(step, steps, sync, validation)[0]


def _setup(config: BenchConfig) -> tuple[torch.device, VAE, dict[int, torch.Tensor]]:
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    images = _binarized_images(config).to(device)
    network = config.resolved_network()
    torch.manual_seed(config.seed)
    base = VAE(images.shape[1], network.latent_dim, network.hidden, network.scale_fn).to(device)
    batches = {b: _batch(images, b, config.seed) for b in config.batch_sizes}
    pyro.clear_param_store()
    return device, base, batches


def run_benchmark(config: BenchConfig, log: Callable[[str], None] = print) -> list[Timing]:
    """Time every (ELBO, batch size, implementation) of ``config``; see the module docstring."""
    device, base, batches = _setup(config)
    sync = _synchronizer(device)
    keys = [
        (elbo, b, impl)
        for elbo in config.elbos
        for b in config.batch_sizes
        for impl in config.implementations
    ]
    if config.check:
        for elbo in config.elbos:
            for b, batch in batches.items():
                value = check_equivalence(base, batch, elbo, config.seed)
                log(
                    f"check {elbo:9s} B={b:<4d} fused == traced (bit for bit), torch == traced "
                    f"(to rounding): loss/B {value:.4f}"
                )

    steps: dict[tuple[str, int, str], Callable[[], None]] = {}
    builders = dict(STEP_BUILDERS)
    if config.baseline:
        builders["baseline"] = partial(_baseline_step, package=load_baseline(config.baseline))
    for elbo, b, impl in keys:
        model = _model_copy(base, f"bench-{impl}-{elbo}-{b}")
        steps[elbo, b, impl] = builders[impl](model, batches[b], elbo, config.lr, config.adam)
        if impl == "compiled":
            log(f"compiled {elbo:9s} B={b:<4d} vs traced: {COMPILE_CHECKS[elbo, b]}")

    block_steps, first_call = {}, {}
    for key, step in steps.items():
        validation = VALIDATION[key[2]]
        first_call[key] = _time_block(step, 1, sync, validation)
        _time_block(step, config.warmup_steps, sync, validation)
        estimate = _time_block(step, config.calibration_steps, sync, validation)
        block_steps[key] = max(config.min_block_steps, math.ceil(config.block_seconds / estimate))

    def block(key: tuple[str, int, str]) -> None:
        context = (
            nullcontext()
            if VALIDATION[key[2]] is None
            else pyro.validation_enabled(VALIDATION[key[2]])
        )
        with context:
            for _ in range(block_steps[key]):
                steps[key]()

    timings = harness.interleave(
        {key: partial(block, key) for key in keys},
        config.rounds,
        clocks=harness.synced_clocks(sync),
    )
    log(f"{config.rounds} interleaved rounds done")
    per_step = {key: [t / block_steps[key] for t in timings.wall[key]] for key in keys}
    cpu_per_step = {key: [t / block_steps[key] for t in timings.cpu[key]] for key in keys}
    return [
        Timing(
            elbo,
            b,
            impl,
            block_steps[elbo, b, impl],
            tuple(per_step[elbo, b, impl]),
            tuple(cpu_per_step[elbo, b, impl]),
            first_call[elbo, b, impl],
        )
        for elbo, b, impl in keys
    ]


# Ratios reported when both implementations were timed: name -> (numerator, denominator).
RATIOS = {
    "fused_over_torch": ("fused", "torch"),
    "traced_over_torch": ("traced", "torch"),
    "pyro_over_torch": ("pyro", "torch"),
    "fused_over_traced": ("fused", "traced"),
    "compiled_over_torch": ("compiled", "torch"),
    "compiled_over_fused": ("compiled", "fused"),
    "baseline_over_torch": ("baseline", "torch"),
    "traced_over_baseline": ("traced", "baseline"),
    "fused_over_baseline": ("fused", "baseline"),
}
RATIO_LABELS = {
    "fused_over_torch": "fused / torch",
    "traced_over_torch": "traced / torch",
    "pyro_over_torch": "stock Pyro / torch",
    "fused_over_traced": "fused / traced",
    "compiled_over_torch": "compiled / torch",
    "compiled_over_fused": "compiled / fused",
    "baseline_over_torch": "baseline / torch",
    "traced_over_baseline": "traced / baseline",
    "fused_over_baseline": "fused / baseline",
}
CLOCKS = ("cpu", "wall")  # the clocks of :func:`markdown_table`, in the order printed


def paired_ratio(top: Sequence[float], bottom: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``top[r] / bottom[r]`` (:func:`harness.paired_ratio`'s
    per-round ratios): each ratio is of two blocks timed next to each other, so a load that
    drifts over seconds cancels from it."""
    per_round = harness.paired_ratio(top, bottom)["per_round"]
    if len(per_round) < 2:
        return per_round[0], per_round[0], per_round[0]
    low, middle, high = statistics.quantiles(per_round, n=4, method="inclusive")
    return middle, low, high


def ratios(timings: Sequence[Timing]) -> list[dict[str, Any]]:
    """Per (ELBO, B): the median step time of each implementation (``{impl}_ms`` wall clock,
    ``{impl}_cpu_ms`` CPU time) and the ratios of :data:`RATIOS`: of wall-clock medians
    (``name``), of CPU-time medians (``name_cpu``), and the median over rounds of the per-round
    CPU-time ratio with its quartiles (``name_paired_cpu``, ``name_paired_cpu_quartiles``; see
    :func:`paired_ratio`), the steadiest of them on a shared machine."""
    medians = {(t.elbo, t.batch_size, t.implementation): t.median for t in timings}
    cpu = {(t.elbo, t.batch_size, t.implementation): t.cpu_median for t in timings}
    rounds = {(t.elbo, t.batch_size, t.implementation): t.cpu_seconds_per_step for t in timings}
    implementations = list(dict.fromkeys(t.implementation for t in timings))
    pairs = {
        name: pair
        for name, pair in RATIOS.items()
        if pair[0] in implementations and pair[1] in implementations
    }
    rows = []
    for elbo, b in dict.fromkeys((t.elbo, t.batch_size) for t in timings):
        rows.append(
            {
                "elbo": elbo,
                "batch_size": b,
                **{f"{impl}_ms": medians[elbo, b, impl] * MS_PER_S for impl in implementations},
                **{f"{impl}_cpu_ms": cpu[elbo, b, impl] * MS_PER_S for impl in implementations},
                **{
                    name: medians[elbo, b, top] / medians[elbo, b, bottom]
                    for name, (top, bottom) in pairs.items()
                },
                **{
                    f"{name}_cpu": cpu[elbo, b, top] / cpu[elbo, b, bottom]
                    for name, (top, bottom) in pairs.items()
                },
            }
        )
        for name, (top, bottom) in pairs.items():
            middle, low, high = paired_ratio(rounds[elbo, b, top], rounds[elbo, b, bottom])
            rows[-1][f"{name}_paired_cpu"] = middle
            rows[-1][f"{name}_paired_cpu_quartiles"] = [low, high]
    return rows


def format_paired(row: dict[str, Any], name: str) -> str:
    low, high = row[f"{name}_paired_cpu_quartiles"]
    return f"{row[f'{name}_paired_cpu']:.2f}× ({low:.2f}–{high:.2f})"


def markdown_table(rows: Sequence[dict[str, Any]], clock: str = "cpu") -> str:
    """Milliseconds per step (medians) and ratios: ``clock="cpu"``, CPU time with the paired
    ratios and their quartiles; ``"wall"``, wall-clock time with ratios of medians."""
    implementations = [i for i in LABELS if f"{i}_ms" in rows[0]]
    names = [name for name in RATIOS if name in rows[0]]
    header = (
        "| ELBO | B | "
        + " | ".join(f"{LABELS[i]} ms" for i in implementations)
        + " | "
        + " | ".join(RATIO_LABELS[name] for name in names)
        + " |"
    )
    title = (
        "CPU time: medians, and per-round ratios' median (quartiles)"
        if clock == "cpu"
        else "wall clock: medians and ratios of medians"
    )
    lines = [title, "", header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        if clock == "cpu":
            times = [f"{row[f'{impl}_cpu_ms']:.3f}" for impl in implementations]
            ratio_cells = [format_paired(row, name) for name in names]
        else:
            times = [f"{row[f'{impl}_ms']:.3f}" for impl in implementations]
            ratio_cells = [f"{row[name]:.2f}×" for name in names]
        lines.append(
            "| " + " | ".join([row["elbo"], str(row["batch_size"]), *times, *ratio_cells]) + " |"
        )
    return "\n".join(lines)


def package_estimators(elbos: Sequence[str]) -> dict[str, str]:
    """The class behind each ``make_estimator(name)``: what the traced path measured."""
    return {
        name: f"{type(make_estimator(name, max_plate_nesting=1)).__module__}."
        f"{type(make_estimator(name, max_plate_nesting=1)).__qualname__}"
        for name in elbos
    }


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages as text ("n/a" where there are none)."""
    load = harness.load_average()
    return "n/a" if load is None else " ".join(f"{value:.2f}" for value in load)


def environment(device: torch.device, elbos: Sequence[str]) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "package_estimators": package_estimators(elbos),
        "load_average": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _landmark_shares(stats: pstats.Stats, total: float) -> list[tuple[str, float, int]]:
    """Cumulative share of ``total`` and call count of each landmark; a matching function called
    by another match (a nested ``get_trace``) is already inside its caller and is skipped."""
    found = []
    for label, suffix, name in LANDMARKS:
        matches = {
            key
            for key in stats.stats
            if key[2] == name and key[0].replace(os.sep, "/").endswith(suffix)
        }
        outer = [key for key in matches if not matches & set(stats.stats[key][4])]
        if outer:
            cumulative = sum(stats.stats[key][3] for key in outer)
            calls = sum(stats.stats[key][1] for key in outer)
            found.append((label, cumulative / total, calls))
    return found


def run_profile(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Profile ``config.profile_impl``'s step (default: the traced path's) with cProfile for
    every (ELBO, batch size) of ``config``."""
    device, base, batches = _setup(config)
    sync = _synchronizer(device)
    impl, validation = config.profile_impl, VALIDATION[config.profile_impl]
    report = {}
    for elbo in config.elbos:
        for b, batch in batches.items():
            model = _model_copy(base, f"profile-{impl}-{elbo}-{b}")
            step = STEP_BUILDERS[impl](model, batch, elbo, config.lr, config.adam)
            _time_block(step, config.warmup_steps, sync, validation)
            unprofiled = _time_block(step, config.profile_steps, sync, validation)
            if config.profiler == "torch":
                report[f"{elbo}/{b}"] = _torch_profile(
                    step,
                    config,
                    sync,
                    validation,
                    device,
                    f"{LABELS[impl]}, {elbo}, B={b}",
                    unprofiled,
                    log,
                )
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            _time_block(step, config.profile_steps, sync, validation)
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            total = stats.total_tt
            log(
                f"\n## {LABELS[impl]}, {elbo}, B={b}: {config.profile_steps} steps, "
                f"{unprofiled * MS_PER_S:.3f} ms/step unprofiled, "
                f"{total / config.profile_steps * MS_PER_S:.3f} ms/step under cProfile\n"
            )
            stats.sort_stats(config.profile_sort).print_stats(config.profile_top)
            shares = _landmark_shares(stats, total)
            log("share of the profiled step (cumulative; nested rows overlap):")
            for label, share, calls in shares:
                log(f"  {label:45s} {share:6.1%}  ({calls / config.profile_steps:.0f} calls/step)")
            report[f"{elbo}/{b}"] = {
                "unprofiled_ms": unprofiled * MS_PER_S,
                "profiled_ms": total / config.profile_steps * MS_PER_S,
                "landmarks": {label.strip(): share for label, share, _ in shares},
            }
    return report


def _torch_profile(
    step: Callable[[], Any],
    config: BenchConfig,
    sync: Callable[[], None],
    validation: bool | None,
    device: torch.device,
    title: str,
    unprofiled: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """``config.profile_steps`` steps under :mod:`torch.profiler` (CPU, and CUDA on a GPU): the
    operators with the largest self time, per step, as torch's own table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        _time_block(step, config.profile_steps, sync, validation)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total_us = sum(getattr(e, key) for e in events)
    log(
        f"\n## {title}: {config.profile_steps} steps, {unprofiled * MS_PER_S:.3f} ms/step "
        f"unprofiled; operators by {key.replace('_', ' ')} (all steps)\n"
    )
    log(events.table(sort_by=key, row_limit=config.profile_top))
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: config.profile_top]
    return {
        "unprofiled_ms": unprofiled * MS_PER_S,
        "operators_self_us_per_step": {e.key: getattr(e, key) / config.profile_steps for e in top},
        "total_self_us_per_step": total_us / config.profile_steps,
    }


def _breakdown_parts(model: VAE, x: torch.Tensor, elbo: str) -> dict[str, Callable[[], Any]]:
    """Nested pieces of one step's forward and backward pass, cheapest first."""
    traced = _traced_loss(model, make_estimator(elbo, max_plate_nesting=1))
    fused = training_loss(model, make_estimator(elbo, max_plate_nesting=1))
    hidden = partial(poutine.block, hide_types=["param"])

    def networks() -> None:
        loc, scale = model.encoder(x)
        model.decoder(loc + scale * torch.randn_like(loc))

    return {
        "the two networks (encoder, one draw, decoder)": networks,
        "hand-written loss, forward": lambda: torch_loss(model, x, elbo),
        "model and guide, no effect handler": lambda: (model.guide(x), model.model(x)),
        "model and guide, traced (trace_pair)": lambda: trace_pair(
            hidden(model.model), hidden(model.guide), (x,), {}
        ),
        "fused loss, forward": lambda: fused(x),
        "traced loss, forward": lambda: traced(x),
        "hand-written loss, forward + backward": lambda: torch_loss(model, x, elbo).backward(),
        "fused loss, forward + backward": lambda: (fused(x) / x.shape[0]).backward(),
        "traced loss, forward + backward": lambda: (traced(x) / x.shape[0]).backward(),
    }


def graph_nodes(loss: torch.Tensor) -> int:
    """The number of autograd nodes behind ``loss`` (what backward walks)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(parent for parent, _ in node.next_functions)
    return len(seen)


def _graph_sizes(model: VAE, x: torch.Tensor, elbo: str) -> dict[str, int]:
    estimator = make_estimator(elbo, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        return {
            "hand-written": graph_nodes(torch_loss(model, x, elbo)),
            "fused": graph_nodes(training_loss(model, estimator)(x) / x.shape[0]),
            "traced": graph_nodes(_traced_loss(model, estimator)(x) / x.shape[0]),
        }


def run_breakdown(
    config: BenchConfig, log: Callable[[str], None] = print
) -> dict[str, dict[str, float]]:
    """Median microseconds of CPU time of each :func:`_breakdown_parts` piece (no optimizer
    step: it is the same in every loop), timed in interleaved rounds, validation off."""
    device, base, batches = _setup(config)
    sync = _synchronizer(device)
    report = {}
    for elbo in config.elbos:
        for b, batch in batches.items():
            model = _model_copy(base, f"breakdown-{elbo}-{b}")
            parts = _breakdown_parts(model, batch, elbo)
            times: dict[str, list[float]] = {name: [] for name in parts}
            for _ in range(config.rounds):
                for name, part in parts.items():
                    _time_block(part, config.min_block_steps, sync, False)
                    times[name].append(
                        _time_block_clocks(part, config.profile_steps // 2, sync, False)[1]
                    )
            model.zero_grad(set_to_none=True)
            report[f"{elbo}/{b}"] = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            sizes = _graph_sizes(model, batch, elbo)
            report[f"{elbo}/{b}"]["autograd_nodes"] = sizes
            log(f"\n{elbo}, B = {b}: median µs of CPU time, {config.rounds} rounds")
            for name, micros in report[f"{elbo}/{b}"].items():
                if name != "autograd_nodes":
                    log(f"  {name:45s} {micros:9.1f}")
            log(
                "  autograd nodes of the loss: "
                + ", ".join(f"{key} {value}" for key, value in sizes.items())
            )
    return report


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _elbo_list(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in ELBOS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ELBO {unknown}: choose from {ELBOS}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=tuple(NETWORKS), default=defaults.dataset)
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (--dataset mnist)")
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
        default=defaults.batch_sizes,
        help="comma-separated, default %(default)s",
    )
    p.add_argument(
        "--elbos",
        type=_elbo_list,
        default=defaults.elbos,
        help="comma-separated subset of trace,meanfield",
    )
    p.add_argument(
        "--hidden",
        type=_int_list,
        help="hidden widths, e.g. 256,128 (default: 128 for digits, 400 for mnist)",
    )
    p.add_argument("--latent-dim", type=_positive_int, help="default: 8 for digits, 20 for mnist")
    p.add_argument("--device", choices=DEVICES, default=defaults.device)
    p.add_argument(
        "--threads",
        type=_positive_int,
        help=f"torch.set_num_threads (default: torch's, {torch.get_num_threads()})",
    )
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--warmup-steps", type=_positive_int, default=defaults.warmup_steps)
    p.add_argument("--rounds", type=_positive_int, default=defaults.rounds)
    p.add_argument(
        "--block-seconds",
        type=float,
        default=defaults.block_seconds,
        help="target length of one timed block of steps (default %(default)s)",
    )
    p.add_argument(
        "--baseline",
        metavar="DIR",
        help="also time the traced package step of the package copy in DIR (e.g. an "
        "earlier commit's pyro_vae folder)",
    )
    p.add_argument(
        "--adam",
        choices=ADAMS,
        default=defaults.adam,
        help="torch.optim.Adam(fused=True) as pyro_vae.train builds it, or plain "
        "(default %(default)s)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the fused loss under torch.compile (tens of seconds to compile)",
    )
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the fused-vs-traced and torch-vs-traced loss and gradient checks",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="time nested pieces of the forward and backward pass instead",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile one implementation's step instead of timing (see --profiler)",
    )
    p.add_argument(
        "--profiler",
        choices=("cprofile", "torch"),
        default=defaults.profiler,
        help="cprofile: Python functions, with the share of trace construction, "
        "validation, ...; torch: torch.profiler's operator table (CPU, and "
        "CUDA on a GPU) (default %(default)s)",
    )
    p.add_argument(
        "--profile-impl",
        choices=tuple(STEP_BUILDERS),
        default=defaults.profile_impl,
        help="which step --profile runs (default %(default)s)",
    )
    p.add_argument("--profile-steps", type=_positive_int, default=defaults.profile_steps)
    p.add_argument("--profile-top", type=_positive_int, default=defaults.profile_top)
    p.add_argument(
        "--profile-sort", choices=("cumulative", "tottime"), default=defaults.profile_sort
    )
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.dataset == "mnist" and args.data_dir is None and "PYRO_VAE_DATA_DIR" not in os.environ:
        p.error("--dataset mnist needs --data-dir (or $PYRO_VAE_DATA_DIR)")
    network = None
    if args.hidden is not None or args.latent_dim is not None:
        fallback = NETWORKS[args.dataset]
        network = ModelConfig(
            latent_dim=args.latent_dim or fallback.latent_dim, hidden=args.hidden or fallback.hidden
        )
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    return BenchConfig(**given, network=network)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        return _run(config)
    except PyroVAEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _run(config: BenchConfig) -> int:
    device = resolve_device(config.device)
    if config.breakdown:
        report = {
            "config": config.to_dict(),
            "breakdown": run_breakdown(config),
            "environment": environment(device, config.elbos),
        }
    elif config.profile:
        report = {
            "config": config.to_dict(),
            "profile": run_profile(config),
            "environment": environment(device, config.elbos),
        }
    else:
        load_before = load_average()
        harness.warn_if_busy(harness.load_average(), "start")
        timings = run_benchmark(config, log=lambda line: print(line, file=sys.stderr))
        rows = ratios(timings)
        network = config.resolved_network()
        print(
            f"\nSVI step, {config.dataset}, hidden {list(network.hidden)}, latent "
            f"{network.latent_dim}, {device}, {torch.get_num_threads()} threads, "
            f"{config.adam} Adam; medians of {config.rounds} interleaved rounds; load average "
            f"{load_before} before, {load_average()} after"
        )
        for name, cls in package_estimators(config.elbos).items():
            print(f"traced path {name}: make_estimator({name!r}, max_plate_nesting=1) -> {cls}")
        for clock in CLOCKS:
            print()
            print(markdown_table(rows, clock))
        harness.warn_if_busy(harness.load_average(), "end")
        noisy = [t for t in timings if t.spread > NOISY_SPREAD]
        if noisy:
            print(
                f"\nwarning: {len(noisy)} of {len(timings)} timings had a round over "
                f"{NOISY_SPREAD:g}x their median (machine busy?); the medians may still hold, "
                "but consider rerunning, or --threads 1 on a shared machine",
                file=sys.stderr,
            )
        report = {
            "config": config.to_dict(),
            "environment": {
                **environment(device, config.elbos),
                "load_average_before": load_before,
            },
            "summary": rows,
            "timings": [t.to_dict() for t in timings],
            "compile_checks": {f"{elbo}/{b}": check for (elbo, b), check in COMPILE_CHECKS.items()},
        }
    if config.out:
        harness.write_json(config.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
