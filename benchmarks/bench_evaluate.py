"""Per-datapoint log p̂_K(x) of one VAE three ways: the package's evaluator, hand-written torch,
and stock ``pyro.infer.Importance``.

``package``
    :func:`pyro_vae.evaluate.evaluate_dataset` on the VAE's ``model``/``guide`` pair at its
    defaults (particle chunk sized automatically) unless ``--particle-chunk`` sets one: traces
    with a vectorized particle plate, streaming statistics (log p̂, ELBO, var log w, ESS), k-hat
    off. ``package+khat`` is the same with PSIS k-hat (only for K ≥ 21, which PSIS needs).
``torch@C``
    The same computation written by hand on the model's own encoder and decoder modules, in
    particle chunks of C (one contender per C of ``--hand-chunks``, 50 and 500):
    ``z = loc + scale * eps``, log p(x|z) by ``binary_cross_entropy_with_logits``, Gaussian
    log-densities, a streaming logsumexp over the chunks and batches. The faster of them (by
    median CPU time) is the floor the package is compared with.
``importance``
    What a Pyro user would write without this package: ``Importance(model, guide, K).run(x_n)``
    per datapoint and ``get_log_normalizer()`` (one trace per particle). It is far slower, so it
    runs on fewer datapoints and particles, and rates are compared per (datapoint × particle).

The implementations run in one process on the same K, images and network (``--network iwae1``:
the IWAE paper's 784-200-200-50 tanh net); they are timed in ``--rounds`` rounds whose order
rotates (so they share the machine's noise), each measurement repeating a call until it takes
about ``--min-seconds`` (a K = 1 call takes milliseconds). The report is the per-round ratios of
CPU time (user + system; one thread, so the work done), package over each hand-written
contender, with their median and range, and the machine's load average before and after. With
the same seed and the same chunk, ``package`` and ``torch@C`` consume the same random numbers
in the same order, so their log p̂ agree to float rounding; with other chunks the draws differ
and the check reports the paired difference in standard errors.

Each round also records the process's minor page faults. On Linux/glibc much of the CPU time of
both evaluators can be the kernel zeroing pages: the ``[chunk, batch, D]`` tensors are handed back
to the system when freed and faulted in again by the next chunk, and how often that happens
depends on the order of allocations, not on the arithmetic. The report gives the faults and the
allocator settings (``MALLOC_*`` and ``THP_MEM_ALLOC_ENABLE`` environment variables) next to the
times, so a ratio can be read in context.

``--throughput`` adds the arithmetic: FLOPs are the matrix products' 2·in·out per row, the
decoder once per (datapoint, particle) and the encoder once per datapoint (the package's
evaluator runs it once per chunk; that extra work is overhead, not counted), divided by each
evaluator's median CPU time, next to the machine's GEMM rate: the fastest rate of the decoder's
matrix products alone (``[chunk·batch, in] @ [in, out]``, ``addmm``, no activations) over the
chunks the contenders use, and the median scaled to the full protocol (10 000 images,
K = 5000). ``--memory`` adds the evaluator's
peak memory (k-hat off) at each K of ``--memory-particles`` with the same particle chunk, each
in a fresh child process on the CPU (:mod:`peak_memory`): equal peaks show that evaluation
memory does not grow with K.

    python benchmarks/bench_evaluate.py                                   # digits, K = 5000
    python benchmarks/bench_evaluate.py --data mnist --data-dir DIR --num-data 200 --out b.json
    python benchmarks/bench_evaluate.py --run-dir runs/my-run --particles 1000
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/bench_evaluate.py                 # glibc keeps freed memory: no refaults
    python benchmarks/bench_evaluate.py --data mnist --data-dir DIR --network iwae1 --threads 1 \
        --num-data 100 --particles 5000 --rounds 9 --throughput --out eval-cpu.json
    python benchmarks/bench_evaluate.py --data mnist --data-dir DIR --network iwae1 --threads 1 \
        --num-data 100 --particles 5 --rounds 9 --importance-particles 5
    python benchmarks/bench_evaluate.py --data mnist --data-dir DIR --device cuda --throughput \
        --num-data 10000 --batch-size 500 --particle-chunk 1000 --memory-particles 1000 5000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import Importance
from torch.distributions import Normal
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import peak_memory

from pyro_vae import VAE, ModelConfig, PyroVAEError, TrainConfig, load_digits, load_mnist
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.images import fixed_binarization
from pyro_vae.evaluate import MIN_KHAT_PARTICLES, evaluate_dataset, format_table
from pyro_vae.evaluate.chunks import DEFAULT_PARTICLE_CHUNK
from pyro_vae.models.config import DEVICES

NETWORKS = {
    "digits": ModelConfig(latent_dim=8, hidden=(128,)),
    "mnist": ModelConfig(latent_dim=20, hidden=(400,)),
}
#: ``--network``: ``small`` is the data set's entry of :data:`NETWORKS`; ``iwae1`` the IWAE
#: paper's one-stochastic-layer net (784-200-200-50 on MNIST), tanh, Bernoulli pixels
IWAE1 = ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh")
HAND_CHUNKS = (50, 500)
TARGET_IMPORTANCE_SPEEDUP = 100.0
EXIT_USER_ERROR = 2
NUM_SE = 4.0
ROUNDING_TOLERANCE = 1e-3
FULL_PROTOCOL = 10_000 * 5000  # test images × K
MATMUL_ROUNDS = 5


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[harness.parent_parser(rounds=7, warmup=0, threads=None)],
    )
    p.add_argument("--data", choices=sorted(NETWORKS), default="digits")
    p.add_argument(
        "--network",
        choices=("small", "iwae1"),
        default="small",
        help="small: 64-128-8 (digits) or 784-400-20 (mnist); iwae1: 784-200-200-50 tanh",
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (for --data mnist)")
    p.add_argument("--run-dir", help="evaluate this trained run's VAE instead of a new one")
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="train the new VAE this many epochs first (default 0: random weights)",
    )
    p.add_argument("--particles", type=int, default=5000, help="K (default 5000)")
    p.add_argument("--num-data", type=int, default=300, help="test images evaluated")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument(
        "--particle-chunk",
        type=harness.positive_int,
        help="the package's particle chunk (default: its own default, sized automatically)",
    )
    p.add_argument(
        "--hand-chunks",
        type=harness.positive_int,
        nargs="+",
        default=HAND_CHUNKS,
        metavar="C",
        help="particle chunks of the hand-written evaluator, each its own contender (50 500)",
    )
    p.add_argument(
        "--importance-data", type=int, default=3, help="datapoints for pyro.infer.Importance"
    )
    p.add_argument(
        "--importance-particles",
        type=int,
        default=200,
        help="particles per datapoint for pyro.infer.Importance",
    )
    p.add_argument(
        "--no-validation",
        action="store_true",
        help="turn Pyro's distribution validation off (default: Pyro's default, on)",
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="where to evaluate (cpu)")
    p.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision (high: TF32 on GPUs)",
    )
    p.add_argument(
        "--throughput",
        action="store_true",
        help="also FLOP/s of both evaluators and of the decoder's matrix products alone",
    )
    p.add_argument(
        "--memory", action="store_true", help="also the evaluator's peak memory at two K"
    )
    p.add_argument(
        "--memory-particles",
        type=harness.positive_int,
        nargs="+",
        default=(500, 2000),
        metavar="K",
        help="the K of --memory (500 2000)",
    )
    p.add_argument(
        "--memory-num-data",
        type=harness.positive_int,
        default=100,
        help="test images of --memory, in one batch (100)",
    )
    p.add_argument(
        "--no-khat-contender",
        action="store_true",
        help="leave out the package with k-hat (a shorter run)",
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=0.25,
        help="each measurement repeats a call until it takes about this long (0.25)",
    )
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    harness.check_out(p, args.out)
    return args


def _setup(args: argparse.Namespace) -> tuple[VAE, torch.Tensor]:
    """The VAE and the binarized test images (first ``--num-data``), on ``--device``."""
    device = resolve_device(args.device)
    if args.run_dir:
        from pyro_vae.runs import load_run

        run = load_run(args.run_dir, device=str(device), data_dir=args.data_dir)
        return run.model.eval(), run.eval_images("test")[: args.num_data].to(device)
    dataset = load_digits() if args.data == "digits" else load_mnist(args.data_dir)
    images = fixed_binarization(dataset.test.images[: args.num_data], args.seed)
    if args.epochs > 0:
        from pyro_vae import fit

        config = TrainConfig(
            dataset=args.data,
            data_dir=args.data_dir,
            epochs=args.epochs,
            model=network(args),
            seed=args.seed,
            device="cpu",
        )
        model = fit(config=config, progress=False).model
    else:
        torch.manual_seed(args.seed)
        net = network(args)
        model = VAE(dataset.input_dim, net.latent_dim, net.hidden, activation=net.activation)
        model.decoder.set_output_bias(dataset.train.images.mean(0))
    pyro.clear_param_store()
    return model.to(device).eval(), images.to(device)


def network(args: argparse.Namespace) -> ModelConfig:
    """The VAE's sizes: ``--network``'s choice for ``--data``."""
    return IWAE1 if args.network == "iwae1" else NETWORKS[args.data]


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - start) for start in range(0, total, size)]


@torch.no_grad()
def handwritten_log_px(
    vae: VAE, images: torch.Tensor, particles: int, batch_size: int, particle_chunk: int
) -> torch.Tensor:
    """log p̂_K(x) per image with torch ops only, on the images' device, drawing the same
    standard normals in the same order as the package's evaluator."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        loc, scale = vae.encoder(x)
        guide = Normal(loc, scale)
        lse = x.new_full((x.shape[0],), -math.inf)
        for size in _chunks(particles, particle_chunk):
            eps = torch.empty((size, *loc.shape), dtype=x.dtype, device=x.device).normal_()
            z = loc + eps * scale
            logits = vae.decoder(z)
            log_lik = -F.binary_cross_entropy_with_logits(
                logits, x.expand_as(logits), reduction="none"
            ).sum(-1)
            log_w = log_lik + Normal(0.0, 1.0).log_prob(z).sum(-1) - guide.log_prob(z).sum(-1)
            lse = torch.logaddexp(lse, torch.logsumexp(log_w, 0))
        out.append(lse - math.log(particles))
    return torch.cat(out)


def package_log_px(
    vae: VAE,
    images: torch.Tensor,
    particles: int,
    batch_size: int,
    particle_chunk: int | None,
    khat: bool,
) -> torch.Tensor:
    """The package's evaluator; ``particle_chunk=None`` leaves its default."""
    chunk = {} if particle_chunk is None else {"particle_chunk": particle_chunk}
    result = evaluate_dataset(
        vae.model,
        vae.guide,
        images,
        num_particles=particles,
        batch_size=batch_size,
        khat=khat,
        **chunk,
    )
    return result.log_px


def importance_log_px(vae: VAE, images: torch.Tensor, particles: int) -> torch.Tensor:
    """Stock Pyro: one ``Importance`` run (one trace per particle) per datapoint."""
    values = []
    for n in range(images.shape[0]):
        posterior = Importance(vae.model, vae.guide, num_samples=particles).run(images[n : n + 1])
        values.append(float(posterior.get_log_normalizer()))
    return torch.tensor(values, dtype=torch.float64)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _linear_layers(module: torch.nn.Module) -> list[torch.nn.Linear]:
    return [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)]


def matmul_flops(module: torch.nn.Module) -> int:
    """2·in·out per input row, summed over the module's linear layers."""
    return sum(2 * layer.in_features * layer.out_features for layer in _linear_layers(module))


@torch.no_grad()
def decoder_matmul_rate(vae: VAE, rows: int, sync: Callable[[], None]) -> dict[str, float]:
    """FLOP/s of the decoder's matrix products alone (``addmm``, no activations) on inputs of
    ``rows`` rows, the shapes of one evaluation chunk: two random input sets alternate over
    :data:`MATMUL_ROUNDS` rounds."""
    layers = _linear_layers(vae.decoder)
    device = layers[0].weight.device
    inputs = [torch.randn(rows, layers[0].in_features, device=device) for _ in range(2)]

    def chain(h: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = torch.addmm(layer.bias, h, layer.weight.t())
        return h

    turn = iter(range(2 * MATMUL_ROUNDS))
    timings = harness.interleave(
        {"matmul": lambda: chain(inputs[next(turn) % 2])},
        MATMUL_ROUNDS,
        warmup=1,
        clocks=harness.synced_clocks(sync),
    )
    seconds, flops = timings.wall["matmul"], rows * matmul_flops(vae.decoder)
    return {
        "rows": rows,
        "flops_per_call": flops,
        "seconds_min": min(seconds),
        "seconds_median": statistics.median(seconds),
        "flops_per_s": flops / min(seconds),
    }


def gemm_rate(vae: VAE, row_counts: Sequence[int], sync: Callable[[], None]) -> dict[str, Any]:
    """:func:`decoder_matmul_rate` at each of ``row_counts`` (the shapes of the contenders'
    chunks); the machine's GEMM rate is the fastest of them."""
    measured = [decoder_matmul_rate(vae, rows, sync) for rows in sorted(set(row_counts))]
    return {
        "by_rows": measured,
        "flops_per_s": max(m["flops_per_s"] for m in measured),
    }


def throughput(vae: VAE, report: dict[str, Any], sync: Callable[[], None]) -> dict[str, Any]:
    """FLOPs of log p̂_K over the images, each evaluator's rate by its median CPU time, the
    same as a fraction of the machine's GEMM rate (:func:`gemm_rate` on the decoder's shapes at
    every chunk the contenders use), and the full protocol's projection."""
    setup = report["setup"]
    median = {name: statistics.median(v) for name, v in report["cpu_seconds_all"].items()}
    n, k = setup["num_data"], setup["particles"]
    flops = n * k * matmul_flops(vae.decoder) + n * matmul_flops(vae.encoder)
    batch = min(setup["batch_size"], n)
    chunks = [*setup["hand_chunks"], setup["particle_chunk"] or DEFAULT_PARTICLE_CHUNK]
    matmul = gemm_rate(vae, [batch * min(chunk, k) for chunk in chunks], sync)
    rates = {name: flops / seconds for name, seconds in median.items()}
    return {
        "flops": flops,
        "flops_per_s": rates,
        "matmul": matmul,
        "fraction_of_matmul_rate": {
            name: rate / matmul["flops_per_s"] for name, rate in rates.items()
        },
        "projected_seconds_full_protocol": {
            name: seconds * FULL_PROTOCOL / (n * k) for name, seconds in median.items()
        },
    }


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of the package's evaluator (k-hat off) at ``spec["particles"]`` on the first
    ``spec["num_data"]`` test images in one batch, in this process."""
    args = argparse.Namespace(**spec)
    harness.set_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    vae, images = _setup(args)

    def work() -> None:
        package_log_px(
            vae, images, spec["particles"], spec["num_data"], spec["particle_chunk"], khat=False
        )

    peak, method = peak_memory.peak_bytes(work, images.device)
    return {**spec, "peak_bytes": peak, "peak_mib": peak / peak_memory.MIB, "method": method}


def memory_section(args: argparse.Namespace, vae: VAE, device: torch.device) -> dict[str, Any]:
    """:func:`memory_probe` at each K of ``--memory-particles``, each in a fresh process (CPU)."""
    keys = ("data", "network", "data_dir", "run_dir", "epochs", "seed", "device", "threads")
    keys += ("particle_chunk", "matmul_precision")
    base = {key: getattr(args, key) for key in keys}
    base.update(num_data=args.memory_num_data)
    probes = []
    for k in args.memory_particles:
        probe = peak_memory.probe(Path(__file__), {**base, "particles": k}, device, memory_probe)
        probes.append(probe)
        print(
            f"memory: evaluation, N = {probe['num_data']}, K = {k}, chunk "
            f"{probe['particle_chunk']}: {probe['peak_mib']:.1f} MiB above the start "
            f"({probe['method']})"
        )
    peaks = [probe["peak_bytes"] for probe in probes]
    return {
        "evaluation": probes,
        "parameter_bytes": sum(p.numel() * p.element_size() for p in vae.parameters()),
        "evaluation_peak_ratio_largest_over_smallest_k": max(peaks) / max(min(peaks), 1),
    }


def _minor_faults() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _allocator_environment() -> dict[str, str]:
    return {
        key: value
        for key, value in sorted(os.environ.items())
        if key.startswith("MALLOC_") or key == "THP_MEM_ALLOC_ENABLE"
    }


def _agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Largest |a − b|, and the mean paired difference with its standard error."""
    diff = a.double() - b.double()
    se = diff.std().item() / math.sqrt(diff.shape[0]) if diff.shape[0] > 1 else math.nan
    return {
        "max_abs_difference": diff.abs().max().item(),
        "mean_difference": diff.mean().item(),
        "stderr": se,
    }


def calls_for(fn: Callable[[], Any], seconds: float, sync: Callable[[], None]) -> int:
    """Calls of ``fn`` per measurement so that one takes about ``seconds`` (at least one),
    from one timed call after a warm one: a few-millisecond call is timed over many."""
    fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return max(1, round(seconds / max(time.perf_counter() - start, 1e-9)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    harness.set_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.memory_probe:
        result = memory_probe(json.loads(args.memory_probe))
        peak_memory.answer(result)
        return result
    vae, images = _setup(args)
    sync = _synchronizer(images.device)
    n, k, batch = images.shape[0], args.particles, args.batch_size
    package = dict(particles=k, batch_size=batch, particle_chunk=args.particle_chunk)
    runners: dict[str, Callable[[], torch.Tensor]] = {
        "package": lambda: package_log_px(vae, images, khat=False, **package),
    }
    if k >= MIN_KHAT_PARTICLES and not args.no_khat_contender:  # PSIS needs enough weights
        runners["package+khat"] = lambda: package_log_px(vae, images, khat=True, **package)
    hands = [f"torch@{chunk}" for chunk in args.hand_chunks]
    for name, chunk in zip(hands, args.hand_chunks):
        runners[name] = lambda c=chunk: handwritten_log_px(vae, images, k, batch, c)
    with pyro.validation_enabled(not args.no_validation):
        calls = {name: calls_for(run, args.min_seconds, sync) for name, run in runners.items()}
        session = harness.Session()
        timings = harness.interleave(
            runners,
            args.rounds,
            args.warmup,
            calls=calls,
            clocks=harness.synced_clocks(sync),
            counters={"page_faults": _minor_faults},
            before=lambda name, r: pyro.set_rng_seed(args.seed + max(r, 0)),
        )
        session.finish()
        imp_n, imp_k = min(args.importance_data, n), args.importance_particles
        pyro.set_rng_seed(args.seed)
        imp_timings = harness.interleave(
            {"importance": lambda: importance_log_px(vae, images[:imp_n], imp_k)}, rounds=1
        )
    seconds, cpu_seconds, values = timings.wall, timings.cpu, timings.last
    page_faults = timings.counts["page_faults"]
    imp_seconds, imp_values = imp_timings.wall["importance"][0], imp_timings.last["importance"]
    for r, order in enumerate(timings.orders):
        for name in order:
            print(
                f"round {r + 1}/{args.rounds} {name:<13} {seconds[name][r]:9.4f} s wall "
                f"{cpu_seconds[name][r]:9.4f} s CPU {page_faults[name][r]:>9,.0f} page faults"
            )
    median = {name: statistics.median(times) for name, times in seconds.items()}
    median_cpu = {name: statistics.median(times) for name, times in cpu_seconds.items()}
    best_hand = min(hands, key=lambda name: median_cpu[name])
    rate = {name: n * k / median_cpu[name] for name in median_cpu}
    rate["importance"] = imp_n * imp_k / imp_seconds
    paired = session.report(timings, baseline=best_hand)
    report = {
        "setup": {
            "data": args.data if not args.run_dir else f"run {args.run_dir}",
            "network": args.network,
            "epochs": args.epochs,
            "num_data": n,
            "particles": k,
            "batch_size": batch,
            "particle_chunk": args.particle_chunk,
            "hand_chunks": list(args.hand_chunks),
            "rounds": args.rounds,
            "calls_per_measurement": calls,
            "importance_data": imp_n,
            "importance_particles": imp_k,
            "validation": not args.no_validation,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "python": platform.python_version(),
            "allocator_environment": _allocator_environment(),
            "load_average_before": session.load_start,
            "load_average_after": session.load_end,
        },
        "seconds_min": {name: min(times) for name, times in seconds.items()},
        "seconds_median": median,
        "seconds_all": seconds,
        "cpu_seconds_min": {name: min(times) for name, times in cpu_seconds.items()},
        "cpu_seconds_median": median_cpu,
        "cpu_seconds_all": cpu_seconds,
        "page_faults_median": {name: statistics.median(f) for name, f in page_faults.items()},
        "page_faults_all": page_faults,
        "importance_seconds": imp_seconds,
        "rate_datapoint_particles_per_s": rate,
        "best_hand": best_hand,
        "cpu_ratio_package_over_best_hand": paired["ratios"]["package"]["cpu"],
        "cpu_ratio_package_over_each_hand": {
            name: harness.paired_ratio(cpu_seconds["package"], cpu_seconds[name]) for name in hands
        },
        "speedup_package_over_importance": rate["package"] / rate["importance"],
        "mean_log_px": {name: value.double().mean().item() for name, value in values.items()},
        "agreement_package_minus_best_hand": _agreement(values["package"], values[best_hand]),
        "importance_mean_log_px": imp_values.mean().item(),
        "package_mean_log_px_same_datapoints": values["package"][:imp_n].double().mean().item(),
        "paired": paired,
    }
    _print(report)
    if args.throughput:
        report["throughput"] = throughput(vae, report, sync)
        _print_throughput(report["throughput"])
    if args.memory:
        report["memory"] = memory_section(args, vae, images.device)
    with pyro.validation_enabled(not args.no_validation):
        pyro.set_rng_seed(args.seed)
        summary = evaluate_dataset(
            vae.model,
            vae.guide,
            images,
            num_particles=k,
            batch_size=batch,
            **({} if args.particle_chunk is None else {"particle_chunk": args.particle_chunk}),
        ).summary()
    print("\n" + format_table(summary))
    report["summary"] = summary
    if args.out:
        harness.write_json(args.out, report)
        print(f"\nwrote {args.out}")
    return report


def _print(report: dict[str, Any]) -> None:
    setup = report["setup"]
    chunk = setup["particle_chunk"] or "default"
    print(
        f"\n{setup['data']} ({setup['network']} network): N = {setup['num_data']} images, "
        f"K = {setup['particles']}, batch {setup['batch_size']}, package chunk {chunk}, "
        f"hand chunks {setup['hand_chunks']}, {setup['torch_threads']} torch threads, "
        f"validation {setup['validation']}, calls per measurement {setup['calls_per_measurement']}"
    )
    print(
        f"load average {setup['load_average_before']} before, "
        f"{setup['load_average_after']} after; allocator environment "
        f"{setup['allocator_environment'] or 'default'}"
    )
    print(
        f"{'implementation':<16}{'median CPU s':>13}{'min CPU s':>11}{'median wall s':>14}"
        f"{'median faults':>15}{'(datapoint×particle)/s':>26}"
    )
    for name, seconds in report["cpu_seconds_median"].items():
        print(
            f"{name:<16}{seconds:>13.4f}{report['cpu_seconds_min'][name]:>11.4f}"
            f"{report['seconds_median'][name]:>14.4f}"
            f"{report['page_faults_median'][name]:>15,.0f}"
            f"{report['rate_datapoint_particles_per_s'][name]:>26,.0f}"
        )
    print(
        f"{'importance':<16}{report['importance_seconds']:>13.3f}{'':>40}"
        f"{report['rate_datapoint_particles_per_s']['importance']:>26,.0f}"
        f"   ({setup['importance_data']} datapoints × {setup['importance_particles']})"
    )
    print("per-round CPU-time ratios, median (min–max):")
    for name, ratio in report["cpu_ratio_package_over_each_hand"].items():
        best = "  (the faster hand-written one)" if name == report["best_hand"] else ""
        print(f"  package / {name:<12} {harness.format_ratio(ratio)}{best}")
    ratios = report["paired"]["ratios"]
    if "package+khat" in ratios:
        print(
            f"  package+khat / {report['best_hand']:<7} "
            f"{harness.format_ratio(ratios['package+khat']['cpu'])}"
        )
    speedup = report["speedup_package_over_importance"]
    print(
        f"package vs Importance: {speedup:,.0f}× faster per datapoint×particle "
        f"(target ≥ {TARGET_IMPORTANCE_SPEEDUP:.0f})"
    )
    agree = report["agreement_package_minus_best_hand"]
    if agree["max_abs_difference"] < ROUNDING_TOLERANCE:
        verdict = "identical up to float rounding (same draws)"
    elif not abs(agree["mean_difference"]) >= NUM_SE * agree["stderr"]:
        verdict = f"agree within {NUM_SE:.0f} SE (other draws)"
    else:
        verdict = "DISAGREE"
    print(
        f"log p̂ package − {report['best_hand']}: max |Δ| {agree['max_abs_difference']:.2e}, "
        f"mean {agree['mean_difference']:+.2e} ± {agree['stderr']:.2e} nats: {verdict}"
    )


def _print_throughput(section: dict[str, Any]) -> None:
    print(f"\n{'implementation':<24}{'GFLOP/s':>10}{'of GEMM rate':>14}   (median CPU time)")
    for name, rate in section["flops_per_s"].items():
        print(f"{name:<24}{rate / 1e9:>10.1f}{section['fraction_of_matmul_rate'][name]:>14.0%}")
    for m in section["matmul"]["by_rows"]:
        print(f"{'decoder addmm alone':<24}{m['flops_per_s'] / 1e9:>10.1f}   at {m['rows']:,} rows")
    print(f"machine GEMM rate (fastest): {section['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s")
    projected = section["projected_seconds_full_protocol"]["package"]
    print(f"full protocol (10 000 × K = 5000) projected for the package: {projected:.1f} s")


def _cli() -> int:
    """``main`` from the command line: bad input (data, device) gives one line and status 2."""
    try:
        main()
    except (PyroVAEError, peak_memory.ProbeError) as exc:
        print(f"bench_evaluate: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
