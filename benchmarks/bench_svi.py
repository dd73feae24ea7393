"""Wall-clock cost of one SVI step: hand-written torch vs the package's step vs stock Pyro SVI.

Three implementations of the same gradient step on the same network, batch and Adam are timed in
one process, interleaved so that they share the machine's noise:

``torch``
    A hand-written loop on the model's own encoder/decoder modules: ``z = loc + scale * eps``,
    Bernoulli log-likelihood by ``binary_cross_entropy_with_logits``, closed-form KL (``meanfield``)
    or the single-sample Monte Carlo KL ``log q(z|x) - log p(z)`` (``trace``), loss averaged over
    the batch, ``torch.optim.Adam``. This is the floor: no traces, no distribution objects.
``package``
    The step of :func:`pyro_vae.train.train`: ``make_elbo(name).differentiable_loss`` divided by
    the batch size, ``torch.optim.Adam``, Pyro validation off. The estimator class behind
    ``make_elbo`` is printed and recorded, since it is the package's choice.
``pyro``
    What a Pyro user writes: ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step(batch)``
    (or ``TraceMeanField_ELBO()``) with Pyro's default validation on.
``torch_fused``, ``package_fused`` (with ``--fused-adam``)
    The same two steps with ``torch.optim.Adam(..., fused=True)`` (one fused kernel for all
    parameters; CPU and CUDA), which a training loop may choose regardless of the loss. The
    ratios report both the like-for-like ``package_fused / torch_fused`` and what the fused
    package step gains over the plain hand-written loop, ``package_fused / torch``.
``baseline`` (with ``--baseline DIR``)
    The package step of another copy of the package, e.g. an earlier commit's
    (``git archive COMMIT pyro_vae | tar -x -C /tmp/before``, then ``--baseline
    /tmp/before/pyro_vae``), imported under another name in the same process: its ``VAE`` with
    the same weights and its ``objectives.make_estimator``. Before/after comparisons then share
    the process and the interleaved rounds.

Before timing, the hand-written loss and gradients are checked against the package's on the same
random draw, so the comparison is between equal computations. Each (ELBO, batch size,
implementation) is warmed up, calibrated to blocks of about ``--block-seconds``, then timed in
``--rounds`` rounds whose order rotates; the median seconds per step over the rounds is reported.

``--breakdown`` instead times nested pieces of the forward and backward pass (the networks
alone, the hand-written loss, the model and guide without and with tracing, the package's loss)
with ``timeit``-style blocks, so the difference between the two loops can be split up.

``--profile`` instead runs one step (``--profile-impl``, default the package's) under
:mod:`cProfile` and prints the functions with the largest cumulative time, plus the share of a few
landmarks (trace construction, log-prob computation, param-store registration, distribution
construction, validation, backward, optimizer). cProfile inflates Python-heavy code relative to
torch kernels, so read the shares as an upper bound on Python overhead.

    python benchmarks/bench_svi.py                                  # digits, B = 20 and 128
    python benchmarks/bench_svi.py --dataset mnist --data-dir DIR --device cuda --out bench.json
    python benchmarks/bench_svi.py --fused-adam --threads 1              # + Adam(fused=True) twins
    python benchmarks/bench_svi.py --baseline /tmp/before/pyro_vae      # before/after, one process
    python benchmarks/bench_svi.py --profile --elbos trace --batch-sizes 128
    python benchmarks/bench_svi.py --breakdown --elbos meanfield --batch-sizes 20 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import importlib
import importlib.util
import math
import os
import platform
import pstats
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

from pyro_vae import VAE, ModelConfig, PyroVAEError, load_digits, load_mnist, make_elbo
from pyro_vae.config import DEVICES
from pyro_vae.io import write_json
from pyro_vae.traces import trace_pair
from pyro_vae.train import resolve_device

IMPLEMENTATIONS = ("torch", "package", "pyro")
FUSED_IMPLEMENTATIONS = ("torch_fused", "package_fused")
LABELS = {"torch": "hand-written torch", "package": "package step", "pyro": "stock Pyro SVI",
          "torch_fused": "hand-written, fused Adam", "package_fused": "package, fused Adam",
          "baseline": "baseline package step"}
BASELINE_MODULE = "pyro_vae_baseline"
STOCK_ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
ELBOS = tuple(STOCK_ELBOS)  # the estimators with a stock Pyro and a hand-written twin
NETWORKS = {"digits": ModelConfig(latent_dim=8, hidden=(128,)),
            "mnist": ModelConfig(latent_dim=20, hidden=(400,))}
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
    ("package estimator differentiable_loss", "pyro_vae/objectives.py", "differentiable_loss"),
    ("  vectorized_log_probs (particle plate)", "pyro_vae/traces.py", "vectorized_log_probs"),
    ("  get_importance_trace", "pyro/infer/enum.py", "get_importance_trace"),
    ("    run guide, replay model under poutine.trace", "pyro/poutine/trace_messenger.py",
     "get_trace"),
    ("    Trace.compute_log_prob", "pyro/poutine/trace_struct.py", "compute_log_prob"),
    ("    Trace.compute_score_parts", "pyro/poutine/trace_struct.py", "compute_score_parts"),
    ("    pyro.sample", "pyro/primitives.py", "sample"),
    ("    plate messenger", "pyro/poutine/plate_messenger.py", "_process_message"),
    ("    register_module (pyro.param per weight)", "pyro_vae/models.py", "register_module"),
    ("      pyro.param", "pyro/primitives.py", "param"),
    ("    encoder / decoder forward", "pyro_vae/nets.py", "forward"),
    ("    distribution __init__ (torch)", "torch/distributions/distribution.py", "__init__"),
    ("    kl_divergence", "torch/distributions/kl.py", "kl_divergence"),
    ("    validation: check_model_guide_match", "pyro/util.py", "check_model_guide_match"),
    ("    validation: check_site_shape", "pyro/util.py", "check_site_shape"),
    ("    validation: Distribution._validate_sample", "torch/distributions/distribution.py",
     "_validate_sample"),
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
    rounds: int = 7
    block_seconds: float = 0.12
    min_block_steps: int = 5
    check: bool = True
    fused_adam: bool = False
    baseline: str | None = None
    profile: bool = False
    breakdown: bool = False
    profile_impl: str = "package"
    profile_steps: int = 300
    profile_top: int = 25
    profile_sort: str = "cumulative"
    out: str | None = None

    def resolved_network(self) -> ModelConfig:
        return self.network if self.network is not None else NETWORKS[self.dataset]

    @property
    def implementations(self) -> tuple[str, ...]:
        return (IMPLEMENTATIONS + (FUSED_IMPLEMENTATIONS if self.fused_adam else ())
                + (("baseline",) if self.baseline else ()))

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

    @property
    def median(self) -> float:
        return statistics.median(self.seconds_per_step)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds_per_step) if self.cpu_seconds_per_step \
            else math.nan

    @property
    def spread(self) -> float:
        return max(self.seconds_per_step) / self.median

    def to_dict(self) -> dict[str, Any]:
        return {"elbo": self.elbo, "batch_size": self.batch_size,
                "implementation": self.implementation, "steps_per_block": self.steps_per_block,
                "median_ms": self.median * MS_PER_S,
                "min_ms": min(self.seconds_per_step) * MS_PER_S, "spread": self.spread,
                "rounds_ms": [s * MS_PER_S for s in self.seconds_per_step],
                "cpu_median_ms": self.cpu_median * MS_PER_S,
                "cpu_rounds_ms": [s * MS_PER_S for s in self.cpu_seconds_per_step]}


def _binarized_images(config: BenchConfig) -> torch.Tensor:
    dataset = load_digits() if config.dataset == "digits" else load_mnist(config.data_dir)
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


def _torch_step(model: VAE, batch: torch.Tensor, elbo: str, lr: float, fused: bool = False
                ) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch_loss(model, batch, elbo).backward()
        optimizer.step()

    return step


def _package_step(model: VAE, batch: torch.Tensor, elbo: str, lr: float, fused: bool = False,
                  estimator: Any = None) -> Callable[[], None]:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=fused or None)
    estimator = make_elbo(elbo) if estimator is None else estimator
    batch_size = batch.shape[0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = estimator.differentiable_loss(model.model, model.guide, batch)
        (loss / batch_size).backward()
        optimizer.step()

    return step


def _pyro_step(model: VAE, batch: torch.Tensor, elbo: str, lr: float) -> Callable[[], None]:
    svi = SVI(model.model, model.guide, pyro.optim.Adam({"lr": lr}), STOCK_ELBOS[elbo]())

    return lambda: svi.step(batch)


def load_baseline(path: str) -> Any:
    """The package folder ``path`` imported as :data:`BASELINE_MODULE` (its own relative
    imports resolve inside it), next to the installed ``pyro_vae``."""
    spec = importlib.util.spec_from_file_location(
        BASELINE_MODULE, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    if spec is None:
        raise ValueError(f"no Python package in {path!r}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_MODULE] = package
    spec.loader.exec_module(package)
    importlib.import_module(f"{BASELINE_MODULE}.objectives")
    return package


def _baseline_step(model: VAE, batch: torch.Tensor, elbo: str, lr: float, package: Any
                   ) -> Callable[[], None]:
    """The package step of ``package`` (see :func:`load_baseline`) on a copy of ``model``."""
    config = model.config
    twin = package.models.VAE(model.input_dim, config.latent_dim, config.hidden,
                              config.scale_fn).to(batch.device)
    twin.load_state_dict(model.state_dict())
    twin.name = f"{model.name}-baseline"
    return _package_step(twin, batch, elbo, lr,
                         estimator=package.objectives.make_estimator(elbo, max_plate_nesting=1))


STEP_BUILDERS = {"torch": _torch_step, "package": _package_step, "pyro": _pyro_step,
                 "torch_fused": partial(_torch_step, fused=True),
                 "package_fused": partial(_package_step, fused=True)}
# Pyro validation around each timed block: off in the package's loop, on (the default) for users.
VALIDATION = {"torch": None, "package": False, "pyro": True, "torch_fused": None,
              "package_fused": False, "baseline": False}


def _model_copy(base: VAE, name: str) -> VAE:
    """An independent copy of ``base`` registered in Pyro's param store under its own name."""
    model = copy.deepcopy(base)
    model.name = name
    return model


def check_equivalence(base: VAE, batch: torch.Tensor, elbo: str, seed: int) -> float:
    """Assert that :func:`torch_loss` and the package's loss / B agree in value and gradient on
    the same random draw; return the loss."""
    results = []
    for implementation in ("torch", "package"):
        model = _model_copy(base, f"check-{implementation}-{elbo}-{batch.shape[0]}")
        pyro.set_rng_seed(seed)
        if implementation == "torch":
            loss = torch_loss(model, batch, elbo)
        else:
            with pyro.validation_enabled(False):
                loss = make_elbo(elbo).differentiable_loss(model.model, model.guide, batch)
            loss = loss / batch.shape[0]
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (torch_value, torch_grads), (package_value, package_grads) = results
    torch.testing.assert_close(torch_value, package_value, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    for mine, theirs in zip(torch_grads, package_grads):
        torch.testing.assert_close(mine, theirs, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    return float(torch_value)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_block_clocks(step: Callable[[], None], steps: int, sync: Callable[[], None],
                       validation: bool | None = None) -> tuple[float, float]:
    """Wall-clock and CPU seconds per step over a block of ``steps`` consecutive steps."""
    context = nullcontext() if validation is None else pyro.validation_enabled(validation)
    with context:
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        sync()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _time_block(step: Callable[[], None], steps: int, sync: Callable[[], None],
                validation: bool | None = None) -> float:
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
    keys = [(elbo, b, impl) for elbo in config.elbos for b in config.batch_sizes
            for impl in config.implementations]
    if config.check:
        for elbo in config.elbos:
            for b, batch in batches.items():
                value = check_equivalence(base, batch, elbo, config.seed)
                log(f"check {elbo:9s} B={b:<4d} torch == package: loss/B {value:.4f}")

    steps: dict[tuple[str, int, str], Callable[[], None]] = {}
    builders = dict(STEP_BUILDERS)
    if config.baseline:
        builders["baseline"] = partial(_baseline_step, package=load_baseline(config.baseline))
    for elbo, b, impl in keys:
        model = _model_copy(base, f"bench-{impl}-{elbo}-{b}")
        steps[elbo, b, impl] = builders[impl](model, batches[b], elbo, config.lr)

    block_steps = {}
    for key, step in steps.items():
        validation = VALIDATION[key[2]]
        _time_block(step, config.warmup_steps, sync, validation)
        estimate = _time_block(step, config.calibration_steps, sync, validation)
        block_steps[key] = max(config.min_block_steps, math.ceil(config.block_seconds / estimate))

    per_step: dict[tuple[str, int, str], list[float]] = {key: [] for key in keys}
    cpu_per_step: dict[tuple[str, int, str], list[float]] = {key: [] for key in keys}
    for round_index in range(config.rounds):
        shift = round_index % len(keys)
        for key in keys[shift:] + keys[:shift]:
            wall, cpu = _time_block_clocks(steps[key], block_steps[key], sync,
                                           VALIDATION[key[2]])
            per_step[key].append(wall)
            cpu_per_step[key].append(cpu)
        log(f"round {round_index + 1}/{config.rounds} done")
    return [Timing(elbo, b, impl, block_steps[elbo, b, impl], tuple(per_step[elbo, b, impl]),
                   tuple(cpu_per_step[elbo, b, impl]))
            for elbo, b, impl in keys]


# Ratios reported when both implementations were timed: name -> (numerator, denominator).
RATIOS = {"package_over_torch": ("package", "torch"), "pyro_over_torch": ("pyro", "torch"),
          "package_fused_over_torch_fused": ("package_fused", "torch_fused"),
          "package_fused_over_torch": ("package_fused", "torch"),
          "baseline_over_torch": ("baseline", "torch"),
          "package_over_baseline": ("package", "baseline")}
RATIO_LABELS = {"package_over_torch": "package / torch", "pyro_over_torch": "stock Pyro / torch",
                "package_fused_over_torch_fused": "package / torch, both fused Adam",
                "package_fused_over_torch": "package fused / torch plain",
                "baseline_over_torch": "baseline / torch",
                "package_over_baseline": "package / baseline",
                "package_over_torch_cpu": "package / torch (CPU time)"}


def ratios(timings: Sequence[Timing]) -> list[dict[str, Any]]:
    """Median step time of each implementation, and the ratios of :data:`RATIOS`, per (ELBO, B),
    of wall-clock medians (and, suffixed ``_cpu``, of CPU-time medians)."""
    medians = {(t.elbo, t.batch_size, t.implementation): t.median for t in timings}
    cpu = {(t.elbo, t.batch_size, t.implementation): t.cpu_median for t in timings}
    implementations = list(dict.fromkeys(t.implementation for t in timings))
    rows = []
    for elbo, b in dict.fromkeys((t.elbo, t.batch_size) for t in timings):
        times = {f"{impl}_ms": medians[elbo, b, impl] * MS_PER_S for impl in implementations}
        rows.append({"elbo": elbo, "batch_size": b, **times,
                     **{name: medians[elbo, b, top] / medians[elbo, b, bottom]
                        for name, (top, bottom) in RATIOS.items()
                        if top in implementations and bottom in implementations},
                     **{f"{name}_cpu": cpu[elbo, b, top] / cpu[elbo, b, bottom]
                        for name, (top, bottom) in RATIOS.items()
                        if top in implementations and bottom in implementations}})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    implementations = [i for i in LABELS if f"{i}_ms" in rows[0]]
    names = [name for name in [*RATIOS, "package_over_torch_cpu"] if name in rows[0]]
    header = ("| ELBO | B | " + " | ".join(f"{LABELS[i]} (ms/step)" for i in implementations)
              + " | " + " | ".join(RATIO_LABELS[name] for name in names) + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cells = [row["elbo"], str(row["batch_size"]),
                 *(f"{row[f'{impl}_ms']:.3f}" for impl in implementations),
                 *(f"{row[name]:.2f}×" for name in names)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def package_estimators(elbos: Sequence[str]) -> dict[str, str]:
    """The class behind each ``make_elbo(name)``: what the "package step" measured."""
    return {name: f"{type(make_elbo(name)).__module__}.{type(make_elbo(name)).__qualname__}"
            for name in elbos}


def environment(device: torch.device, elbos: Sequence[str]) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "pyro": pyro.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "package_estimators": package_estimators(elbos)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _landmark_shares(stats: pstats.Stats, total: float) -> list[tuple[str, float, int]]:
    """Cumulative share of ``total`` and call count of each landmark; a matching function called
    by another match (a nested ``get_trace``) is already inside its caller and is skipped."""
    found = []
    for label, suffix, name in LANDMARKS:
        matches = {key for key in stats.stats
                   if key[2] == name and key[0].replace(os.sep, "/").endswith(suffix)}
        outer = [key for key in matches if not matches & set(stats.stats[key][4])]
        if outer:
            cumulative = sum(stats.stats[key][3] for key in outer)
            calls = sum(stats.stats[key][1] for key in outer)
            found.append((label, cumulative / total, calls))
    return found


def run_profile(config: BenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Profile ``config.profile_impl``'s step (default: the package's) with cProfile for every
    (ELBO, batch size) of ``config``."""
    device, base, batches = _setup(config)
    sync = _synchronizer(device)
    impl, validation = config.profile_impl, VALIDATION[config.profile_impl]
    report = {}
    for elbo in config.elbos:
        for b, batch in batches.items():
            model = _model_copy(base, f"profile-{impl}-{elbo}-{b}")
            step = STEP_BUILDERS[impl](model, batch, elbo, config.lr)
            _time_block(step, config.warmup_steps, sync, validation)
            unprofiled = _time_block(step, config.profile_steps, sync, validation)
            profiler = cProfile.Profile()
            profiler.enable()
            _time_block(step, config.profile_steps, sync, validation)
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            total = stats.total_tt
            log(f"\n## {LABELS[impl]}, {elbo}, B={b}: {config.profile_steps} steps, "
                f"{unprofiled * MS_PER_S:.3f} ms/step unprofiled, "
                f"{total / config.profile_steps * MS_PER_S:.3f} ms/step under cProfile\n")
            stats.sort_stats(config.profile_sort).print_stats(config.profile_top)
            shares = _landmark_shares(stats, total)
            log("share of the profiled step (cumulative; nested rows overlap):")
            for label, share, calls in shares:
                log(f"  {label:45s} {share:6.1%}  ({calls / config.profile_steps:.0f} calls/step)")
            report[f"{elbo}/{b}"] = {
                "unprofiled_ms": unprofiled * MS_PER_S,
                "profiled_ms": total / config.profile_steps * MS_PER_S,
                "landmarks": {label.strip(): share for label, share, _ in shares}}
    return report


def _breakdown_parts(model: VAE, x: torch.Tensor, elbo: str) -> dict[str, Callable[[], Any]]:
    """Nested pieces of one step's forward and backward pass, cheapest first."""
    estimator = make_elbo(elbo)
    hidden = partial(poutine.block, hide_types=["param"])

    def networks() -> None:
        loc, scale = model.encoder(x)
        model.decoder(loc + scale * torch.randn_like(loc))

    return {
        "the two networks (encoder, one draw, decoder)": networks,
        "hand-written loss, forward": lambda: torch_loss(model, x, elbo),
        "model and guide, no effect handler": lambda: (model.guide(x), model.model(x)),
        "model and guide, traced (trace_pair)":
            lambda: trace_pair(hidden(model.model), hidden(model.guide), (x,), {}),
        "package loss, forward": lambda: estimator.differentiable_loss(model.model, model.guide,
                                                                        x),
        "hand-written loss, forward + backward": lambda: torch_loss(model, x, elbo).backward(),
        "package loss, forward + backward": lambda: (
            estimator.differentiable_loss(model.model, model.guide, x) / x.shape[0]).backward(),
    }


def run_breakdown(config: BenchConfig, log: Callable[[str], None] = print
                  ) -> dict[str, dict[str, float]]:
    """Median microseconds of each :func:`_breakdown_parts` piece (no optimizer step: it is
    the same in both loops), timed in interleaved rounds, validation off."""
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
                    times[name].append(_time_block(part, config.profile_steps // 2, sync, False))
            model.zero_grad(set_to_none=True)
            report[f"{elbo}/{b}"] = {name: statistics.median(t) * 1e6 for name, t in times.items()}
            log(f"\n{elbo}, B = {b}: median µs of {config.rounds} rounds")
            for name, micros in report[f"{elbo}/{b}"].items():
                log(f"  {name:45s} {micros:9.1f}")
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
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
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
    p.add_argument("--batch-sizes", type=_int_list, default=defaults.batch_sizes,
                   help="comma-separated, default %(default)s")
    p.add_argument("--elbos", type=_elbo_list, default=defaults.elbos,
                   help="comma-separated subset of trace,meanfield")
    p.add_argument("--hidden", type=_int_list,
                   help="hidden widths, e.g. 256,128 (default: 128 for digits, 400 for mnist)")
    p.add_argument("--latent-dim", type=_positive_int,
                   help="default: 8 for digits, 20 for mnist")
    p.add_argument("--device", choices=DEVICES, default=defaults.device)
    p.add_argument("--threads", type=_positive_int,
                   help=f"torch.set_num_threads (default: torch's, {torch.get_num_threads()})")
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--warmup-steps", type=_positive_int, default=defaults.warmup_steps)
    p.add_argument("--rounds", type=_positive_int, default=defaults.rounds)
    p.add_argument("--block-seconds", type=float, default=defaults.block_seconds,
                   help="target length of one timed block of steps (default %(default)s)")
    p.add_argument("--baseline", metavar="DIR",
                   help="also time the package step of the package copy in DIR (e.g. an "
                        "earlier commit's pyro_vae folder)")
    p.add_argument("--fused-adam", action="store_true",
                   help="also time the hand-written and package steps with Adam(fused=True)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the torch-vs-package loss and gradient check")
    p.add_argument("--breakdown", action="store_true",
                   help="time nested pieces of the forward and backward pass instead")
    p.add_argument("--profile", action="store_true",
                   help="profile one implementation's step with cProfile instead of timing")
    p.add_argument("--profile-impl", choices=tuple(LABELS), default=defaults.profile_impl,
                   help="which step --profile runs (default %(default)s)")
    p.add_argument("--profile-steps", type=_positive_int, default=defaults.profile_steps)
    p.add_argument("--profile-top", type=_positive_int, default=defaults.profile_top)
    p.add_argument("--profile-sort", choices=("cumulative", "tottime"),
                   default=defaults.profile_sort)
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.dataset == "mnist" and args.data_dir is None and "PYRO_VAE_DATA_DIR" not in os.environ:
        p.error("--dataset mnist needs --data-dir (or $PYRO_VAE_DATA_DIR)")
    network = None
    if args.hidden is not None or args.latent_dim is not None:
        fallback = NETWORKS[args.dataset]
        network = ModelConfig(latent_dim=args.latent_dim or fallback.latent_dim,
                              hidden=args.hidden or fallback.hidden)
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
        report = {"config": config.to_dict(), "breakdown": run_breakdown(config),
                  "environment": environment(device, config.elbos)}
    elif config.profile:
        report = {"config": config.to_dict(), "profile": run_profile(config),
                  "environment": environment(device, config.elbos)}
    else:
        timings = run_benchmark(config, log=lambda line: print(line, file=sys.stderr))
        rows = ratios(timings)
        network = config.resolved_network()
        print(f"\nSVI step, {config.dataset}, hidden {list(network.hidden)}, latent "
              f"{network.latent_dim}, {device}, {torch.get_num_threads()} threads; "
              f"median of {config.rounds} rounds")
        for name, cls in package_estimators(config.elbos).items():
            print(f"package step {name}: make_elbo({name!r}) -> {cls}")
        print()
        print(markdown_table(rows))
        noisy = [t for t in timings if t.spread > NOISY_SPREAD]
        if noisy:
            print(f"\nwarning: {len(noisy)} of {len(timings)} timings had a round over "
                  f"{NOISY_SPREAD:g}x their median (machine busy?); the medians may still hold, "
                  "but consider rerunning, or --threads 1 on a shared machine", file=sys.stderr)
        report = {"config": config.to_dict(), "environment": environment(device, config.elbos),
                  "summary": rows, "timings": [t.to_dict() for t in timings]}
    if config.out:
        write_json(config.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
