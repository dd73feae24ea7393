"""The performance report in one run: SVI step ratios, evaluation throughput, memory.

All numbers of a report come from one process on one machine (memory probes from fresh child
processes on the CPU), so they share its load and its clock:

``svi``
    :func:`bench_svi.run_benchmark` for the digits network (64-128-8) and an MNIST-size one
    (784-400-20) at B = 20 and 128, ``meanfield`` and ``trace``: hand-written torch, the
    package's fused path (what :func:`pyro_vae.fit` runs for its own VAE), the package's
    Pyro-traced path (``make_estimator(name).differentiable_loss`` / B, what every other pair runs)
    and stock Pyro ``SVI``; the first three with the same ``torch.optim.Adam`` (``--adam``,
    default ``fused=True`` as in the training loop). Interleaved rounds, medians of wall-clock
    and CPU time; the targets are read on the CPU-time ratios on a shared CPU.
``evaluation``
    log p̂_K(x) of an MNIST-size VAE (784-400-20; digits' 64-128-8 without ``--data-dir``):
    :func:`pyro_vae.evaluate.evaluate_dataset` against a batched hand-written evaluator on the
    same chunks and the same random numbers (so their values agree to rounding), and the
    decoder's matrix products alone on the same shapes, ``[chunk·batch, in] @ [in, out]``.
    FLOPs are the matrix products' 2·in·out per row: the decoder once per (datapoint,
    particle), the encoder once per datapoint (the package's evaluator runs it once per chunk;
    that extra work is overhead, not counted). Interleaved rounds; fastest and median.
``memory``
    Peak memory above the starting point of ``--memory-steps`` package training steps (B =
    128, Adam state included; the fused and the traced path) and of the package's evaluator at
    two K with the same particle chunk: equal peaks show that evaluation memory does not grow
    with K. CUDA: the caching
    allocator's peak (``torch.cuda.max_memory_allocated``); CPU: the resident-set high-water
    mark of a fresh child process (``/proc/self/status`` VmHWM after resetting it, glibc's
    mmap threshold fixed so that freed tensors leave the resident set).

The device follows ``--device`` and everything lives on it; clocks are read after a
synchronization. ::

    python benchmarks/bench_perf.py --data-dir DIR --threads 1 --out perf-cpu.json
    python benchmarks/bench_perf.py --data-dir DIR --device cuda --out perf-h200.json
    python benchmarks/bench_perf.py --quick                 # smoke run, digits only
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from pyro_vae import VAE, ModelConfig, PyroVAEError, make_estimator
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.images import fixed_binarization
from pyro_vae.models.config import DEVICES
from pyro_vae.train import svi_step
from pyro_vae.train.fused import training_loss

HERE = Path(__file__).resolve().parent
NETWORKS = {
    "digits": ModelConfig(latent_dim=8, hidden=(128,)),
    "mnist": ModelConfig(latent_dim=20, hidden=(400,)),
}
TARGETS = {
    "svi_b128": 1.05,
    "svi_b20": 1.2,
    "svi_b128_cuda": 1.5,
    "evaluation_cpu": 1.1,
    "evaluation_seconds_cuda": 10.0,
}
KIB = 1024
EXIT_USER_ERROR = 2
MIB = 1024 * 1024
PROBE_PREFIX = "PROBE "
MMAP_THRESHOLD = 128 * KIB


def _load(name: str) -> Any:
    """A sibling benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load("harness")
bench_svi = _load("bench_svi")
bench_evaluate = _load("bench_evaluate")


@dataclass(frozen=True)
class PerfConfig:
    """What one report measures. ``None`` sizes take the device's default (:meth:`resolved`):
    a few hundred datapoints and K = 1000 on a CPU, the full protocol (10 000 images, K = 5000)
    on a GPU."""

    data_dir: str | None = None
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    svi_datasets: tuple[str, ...] = ("digits", "mnist")
    svi_rounds: int = 21
    block_seconds: float = 0.05
    adam: str = "fused"
    eval_num_data: int | None = None
    eval_particles: int | None = None
    eval_batch_size: int | None = None
    eval_particle_chunk: int | None = None
    eval_rounds: int = 3
    validation: bool = True
    matmul_precision: str = "highest"
    memory_steps: int = 20
    memory_particles: tuple[int, ...] | None = None
    memory_num_data: int = 100
    out: str | None = None

    def resolved(self, device: torch.device) -> PerfConfig:
        gpu = device.type == "cuda"
        defaults = {
            "eval_num_data": 10_000 if gpu else 200,
            "eval_particles": 5000 if gpu else 1000,
            "eval_batch_size": 500 if gpu else 100,
            "eval_particle_chunk": 1000 if gpu else 500,
            "memory_particles": (1000, 5000) if gpu else (500, 2000),
        }
        return dataclasses.replace(
            self, **{key: value for key, value in defaults.items() if getattr(self, key) is None}
        )


# ----------------------------------------------------------------------------- helpers

_synchronizer = bench_svi._synchronizer


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> tuple[float, Any]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def _dataset_images(name: str, data_dir: str | None, split: str) -> torch.Tensor:
    """One split's images, from :func:`bench_svi.cached_dataset`: loaded once per process."""
    return getattr(bench_svi.cached_dataset(name, data_dir), split).images


def _vae(name: str, train_images: torch.Tensor, device: torch.device, seed: int) -> VAE:
    network = NETWORKS[name]
    torch.manual_seed(seed)
    vae = VAE(train_images.shape[1], network.latent_dim, network.hidden)
    vae.set_output_bias(train_images.mean(0))
    return vae.to(device).eval()


def _linear_layers(module: nn.Module) -> list[nn.Linear]:
    return [layer for layer in module.modules() if isinstance(layer, nn.Linear)]


def _matmul_flops(layers: Sequence[nn.Linear]) -> int:
    """2·in·out per input row, summed over the layers."""
    return sum(2 * layer.in_features * layer.out_features for layer in layers)


def environment(device: torch.device) -> dict[str, Any]:
    info = bench_svi.environment(device, ("trace", "meanfield"))
    try:
        info["cpu"] = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    info["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    return info


# ----------------------------------------------------------------------------- SVI


def svi_section(config: PerfConfig, log: Callable[[str], None]) -> dict[str, Any]:
    out = {}
    for name in config.svi_datasets:
        if name == "mnist" and config.data_dir is None:
            log("svi: skipping the MNIST-size net (pass --data-dir)")
            continue
        bench = bench_svi.BenchConfig(
            dataset=name,
            data_dir=config.data_dir,
            device=config.device,
            threads=config.threads,
            seed=config.seed,
            rounds=config.svi_rounds,
            block_seconds=config.block_seconds,
            adam=config.adam,
        )
        load_before = bench_svi.load_average()
        timings = bench_svi.run_benchmark(bench, log=log)
        network = NETWORKS[name]
        out[name] = {
            "network": f"{network.hidden} latent {network.latent_dim}",
            "load_average": [load_before, bench_svi.load_average()],
            "summary": bench_svi.ratios(timings),
            "timings": [t.to_dict() for t in timings],
        }
    return out


# ----------------------------------------------------------------------------- evaluation

handwritten_log_px = bench_evaluate.handwritten_log_px


def package_log_px(
    vae: VAE, images: torch.Tensor, particles: int, batch_size: int, particle_chunk: int
) -> torch.Tensor:
    return bench_evaluate.package_log_px(
        vae, images, particles, batch_size, particle_chunk, khat=False
    )


@torch.no_grad()
def decoder_matmul_rate(
    vae: VAE, rows: int, sync: Callable[[], None], repeats: int = 5
) -> dict[str, float]:
    """FLOP/s of the decoder's matrix products alone (``addmm``, no activations) on inputs of
    ``rows`` rows: the shapes of one evaluation chunk. Two random input sets alternate."""
    layers = _linear_layers(vae.decoder)
    device = layers[0].weight.device
    inputs = [torch.randn(rows, layers[0].in_features, device=device) for _ in range(2)]

    def chain(h: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            h = torch.addmm(layer.bias, h, layer.weight.t())
        return h

    chain(inputs[0])
    seconds = [_timed(lambda i=i: chain(inputs[i % 2]), sync)[0] for i in range(repeats)]
    flops = rows * _matmul_flops(layers)
    return {
        "rows": rows,
        "flops_per_call": flops,
        "seconds_min": min(seconds),
        "seconds_median": statistics.median(seconds),
        "flops_per_s": flops / min(seconds),
    }


def evaluation_section(
    config: PerfConfig, device: torch.device, log: Callable[[str], None]
) -> dict[str, Any]:
    name = "mnist" if config.data_dir is not None else "digits"
    vae = _vae(name, _dataset_images(name, config.data_dir, "train"), device, config.seed)
    test = _dataset_images(name, config.data_dir, "test")[: config.eval_num_data]
    images = fixed_binarization(test, config.seed).to(device)
    n, k = images.shape[0], config.eval_particles
    b, c = config.eval_batch_size, config.eval_particle_chunk
    sync = _synchronizer(device)
    runners = {
        "package": lambda: package_log_px(vae, images, k, b, c),
        "torch": lambda: handwritten_log_px(vae, images, k, b, c),
    }
    with pyro.validation_enabled(config.validation):
        for key, _run in runners.items():
            pyro.set_rng_seed(config.seed)
            (package_log_px if key == "package" else handwritten_log_px)(
                vae, images[:2], min(k, 2 * c), b, c
            )
        timings = harness.interleave(
            runners,
            config.eval_rounds,
            clocks=harness.synced_clocks(sync),
            before=lambda key, r: pyro.set_rng_seed(config.seed + r),
        )
    seconds, values = timings.wall, timings.last
    for r, order in enumerate(timings.orders):
        for key in order:
            log(f"evaluation round {r + 1}/{config.eval_rounds} {key:8s} {seconds[key][r]:8.3f} s")
    decoder_flops = _matmul_flops(_linear_layers(vae.decoder))
    encoder_flops = _matmul_flops(_linear_layers(vae.encoder))
    flops = n * k * decoder_flops + n * encoder_flops
    matmul = decoder_matmul_rate(vae, min(b, n) * c, sync)
    best = {key: min(times) for key, times in seconds.items()}
    difference = (
        (values["package"].cpu().double() - values["torch"].cpu().double()).abs().max().item()
    )
    rates = {key: flops / best[key] for key in best}
    return {
        "network": name,
        "num_data": n,
        "particles": k,
        "batch_size": b,
        "particle_chunk": c,
        "validation": config.validation,
        "rounds": config.eval_rounds,
        "seconds_all": seconds,
        "seconds_min": best,
        "seconds_median": {key: statistics.median(times) for key, times in seconds.items()},
        "ratio_package_over_torch": best["package"] / best["torch"],
        "ratio_package_over_torch_median": (
            statistics.median(seconds["package"]) / statistics.median(seconds["torch"])
        ),
        "flops": flops,
        "flops_per_s": rates,
        "matmul": matmul,
        "fraction_of_matmul_rate": {
            key: rate / matmul["flops_per_s"] for key, rate in rates.items()
        },
        "mean_log_px": {key: value.cpu().double().mean().item() for key, value in values.items()},
        "max_abs_difference_package_torch": difference,
        "projected_seconds_full_protocol": {
            key: best[key] * (10_000 * 5000) / (n * k) for key in best
        },
    }


# ----------------------------------------------------------------------------- memory


def _rss_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def _peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak memory of ``fn()`` above what was in use when it started, and how it was read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, "torch.cuda.max_memory_allocated"
    start = _rss_kib()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    fn()
    return (_rss_kib()["VmHWM"] - start) * KIB, "VmHWM - VmRSS (/proc/self/status)"


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement (``spec["kind"]`` "train" or "eval") in this process."""
    device = resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    name = spec["network"]
    train = _dataset_images(name, spec["data_dir"], "train")
    vae = _vae(name, train, device, spec["seed"])
    if spec["kind"] == "train":
        vae.train()
        batch = fixed_binarization(train[: spec["batch_size"]], spec["seed"]).to(device)
        optimizer = bench_svi._adam(vae, 1e-3, spec["adam"])
        loss_fn = training_loss(
            vae, make_estimator(spec["elbo"], max_plate_nesting=1), fused=spec["path"] == "fused"
        )

        def work() -> None:
            with pyro.validation_enabled(False):
                for _ in range(spec["steps"]):
                    svi_step(lambda: loss_fn(batch), batch.shape[0], optimizer)
    else:
        test = _dataset_images(name, spec["data_dir"], "test")[: spec["num_data"]]
        images = fixed_binarization(test, spec["seed"]).to(device)

        def work() -> None:
            package_log_px(
                vae, images, spec["particles"], spec["batch_size"], spec["particle_chunk"]
            )

    peak, method = _peak_bytes(work, device)
    return {**spec, "peak_bytes": peak, "peak_mib": peak / MIB, "method": method}


def _probe(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return memory_probe(spec)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    line = next(
        line for line in reversed(done.stdout.splitlines()) if line.startswith(PROBE_PREFIX)
    )
    return json.loads(line[len(PROBE_PREFIX) :])


def memory_section(
    config: PerfConfig, device: torch.device, log: Callable[[str], None]
) -> dict[str, Any]:
    name = "mnist" if config.data_dir is not None else "digits"
    base = {
        "device": config.device,
        "threads": config.threads,
        "data_dir": config.data_dir,
        "network": name,
        "seed": config.seed,
    }
    training = []
    for path in ("fused", "traced"):
        train = _probe(
            {
                **base,
                "kind": "train",
                "batch_size": 128,
                "adam": config.adam,
                "steps": config.memory_steps,
                "elbo": "meanfield",
                "path": path,
            },
            device,
        )
        training.append(train)
        log(
            f"memory: {config.memory_steps} training steps, {path} path, B = 128: "
            f"{train['peak_mib']:.1f} MiB"
        )
    evaluations = []
    for k in config.memory_particles:
        probe = _probe(
            {
                **base,
                "kind": "eval",
                "num_data": config.memory_num_data,
                "particles": k,
                "batch_size": config.memory_num_data,
                "particle_chunk": config.eval_particle_chunk,
            },
            device,
        )
        evaluations.append(probe)
        log(f"memory: evaluation K = {k}: {probe['peak_mib']:.1f} MiB")
    peaks = [probe["peak_bytes"] for probe in evaluations]
    params = sum(
        p.numel() * p.element_size()
        for p in _vae(
            name, _dataset_images(name, config.data_dir, "train"), device, config.seed
        ).parameters()
    )
    return {
        "training": training,
        "evaluation": evaluations,
        "parameter_bytes": params,
        "evaluation_peak_ratio_largest_over_smallest_k": max(peaks) / max(min(peaks), 1),
    }


# ----------------------------------------------------------------------------- report


def _target(batch_size: int, device: torch.device) -> float:
    if device.type == "cuda":
        return TARGETS["svi_b128_cuda"]
    return TARGETS["svi_b128"] if batch_size >= 128 else TARGETS["svi_b20"]


def _svi_lines(svi: dict[str, Any], device: torch.device) -> list[str]:
    """The SVI table: CPU-time medians, the paired CPU-time ratios to the hand-written step
    (median over rounds, quartiles in brackets; :func:`bench_svi.paired_ratio`), and whether
    the fused and the traced path meet the target by that median."""
    lines = [
        "| net | ELBO | B | torch ms | fused ms | traced ms | Pyro ms | fused/torch "
        "| traced/torch | Pyro/torch | target | fused meets | traced meets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, section in svi.items():
        for row in section["summary"]:
            target = _target(row["batch_size"], device)
            lines.append(
                f"| {name} | {row['elbo']} | {row['batch_size']} | "
                + " | ".join(
                    f"{row[f'{impl}_cpu_ms']:.3f}" for impl in ("torch", "fused", "traced", "pyro")
                )
                + " | "
                + " | ".join(
                    bench_svi.format_paired(row, f"{impl}_over_torch")
                    for impl in ("fused", "traced", "pyro")
                )
                + f" | ≤ {target}× | "
                + " | ".join(
                    "yes" if row[f"{impl}_over_torch_paired_cpu"] <= target else "no"
                    for impl in ("fused", "traced")
                )
                + " |"
            )
    return lines


def summary_lines(report: dict[str, Any], device: torch.device) -> list[str]:
    lines = [
        f"\n## SVI step ({device}, {report['environment']['torch_threads']} threads, "
        f"{report['config']['adam']} Adam, {report['config']['svi_rounds']} interleaved "
        "rounds; CPU-time medians; ratios: median of the per-round ratios, quartiles in "
        "brackets)\n",
        *_svi_lines(report["svi"], device),
    ]
    for name, section in report["svi"].items():
        before, after = section["load_average"]
        lines.append(f"load average during {name}: {before} before, {after} after")
    ev = report["evaluation"]
    lines += [
        f"\n## Evaluation: {ev['network']}, N = {ev['num_data']}, K = {ev['particles']}, "
        f"batch {ev['batch_size']}, chunk {ev['particle_chunk']}\n",
        "| implementation | fastest s | median s | GFLOP/s | of matmul rate |",
        "|---|---|---|---|---|",
    ]
    for key in ("package", "torch"):
        lines.append(
            f"| {key} | {ev['seconds_min'][key]:.3f} | {ev['seconds_median'][key]:.3f} | "
            f"{ev['flops_per_s'][key] / 1e9:.1f} | "
            f"{ev['fraction_of_matmul_rate'][key]:.0%} |"
        )
    lines += [
        f"| decoder matmuls alone | | | {ev['matmul']['flops_per_s'] / 1e9:.1f} | 100% |",
        f"\npackage / hand-written: {ev['ratio_package_over_torch']:.3f}× fastest, "
        f"{ev['ratio_package_over_torch_median']:.3f}× median (target ≤ "
        f"{TARGETS['evaluation_cpu']}× on CPU); log p̂ max |Δ| "
        f"{ev['max_abs_difference_package_torch']:.2e}; full protocol (10 000 × K = 5000) "
        f"projected {ev['projected_seconds_full_protocol']['package']:.1f} s",
    ]
    memory = report["memory"]
    lines += [f"\n## Peak memory above the start ({memory['training'][0]['method']})\n"]
    for probe in memory["training"]:
        lines.append(
            f"training, {probe['steps']} steps at B = 128, {probe['path']} path: "
            f"{probe['peak_mib']:.1f} MiB "
            f"(parameters {memory['parameter_bytes'] / MIB:.1f} MiB)"
        )
    for probe in memory["evaluation"]:
        lines.append(
            f"evaluation, N = {probe['num_data']}, K = {probe['particles']}, chunk "
            f"{probe['particle_chunk']}: {probe['peak_mib']:.1f} MiB"
        )
    return lines


def run(config: PerfConfig, log: Callable[[str], None]) -> dict[str, Any]:
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.set_float32_matmul_precision(config.matmul_precision)
    config = config.resolved(device)
    report = {
        "config": dataclasses.asdict(config),
        "environment": environment(device),
        "targets": TARGETS,
    }
    report["svi"] = svi_section(config, log)
    report["evaluation"] = evaluation_section(config, device, log)
    report["memory"] = memory_section(config, device, log)
    return report


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: Sequence[str] | None = None) -> tuple[PerfConfig, argparse.Namespace]:
    defaults = PerfConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (MNIST-size rows)")
    p.add_argument("--device", choices=DEVICES, default=defaults.device)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--svi-rounds", type=int, default=defaults.svi_rounds)
    p.add_argument("--block-seconds", type=float, default=defaults.block_seconds)
    p.add_argument(
        "--adam",
        choices=bench_svi.ADAMS,
        default=defaults.adam,
        help="Adam of the hand-written and package steps (default %(default)s, as "
        "pyro_vae.train builds it)",
    )
    p.add_argument("--eval-num-data", type=int, help="default 200 (CPU) / 10000 (GPU)")
    p.add_argument("--eval-particles", type=int, help="K; default 1000 (CPU) / 5000 (GPU)")
    p.add_argument("--eval-batch-size", type=int, help="default 100 (CPU) / 500 (GPU)")
    p.add_argument("--eval-particle-chunk", type=int, help="default 500 (CPU) / 1000 (GPU)")
    p.add_argument("--eval-rounds", type=int, default=defaults.eval_rounds)
    p.add_argument(
        "--no-validation",
        dest="validation",
        action="store_false",
        help="Pyro validation off in the evaluator (default: Pyro's default, on)",
    )
    p.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default=defaults.matmul_precision,
        help="torch.set_float32_matmul_precision (high: TF32 on GPUs)",
    )
    p.add_argument("--memory-steps", type=int, default=defaults.memory_steps)
    p.add_argument(
        "--memory-particles",
        type=_int_list,
        help="the two K of the memory probe, default 500,2000 (CPU) / 1000,5000",
    )
    p.add_argument("--memory-num-data", type=int, default=defaults.memory_num_data)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: digits SVI only, 2 rounds, small evaluation",
    )
    p.add_argument("--out", help="write the report as JSON here")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(PerfConfig)}
    given = {key: value for key, value in vars(args).items() if key in fields and value is not None}
    if args.quick:
        given.update(
            svi_datasets=("digits",),
            svi_rounds=2,
            block_seconds=0.03,
            eval_num_data=20,
            eval_particles=100,
            eval_batch_size=10,
            eval_particle_chunk=50,
            eval_rounds=1,
            memory_steps=3,
            memory_particles=(50, 200),
            memory_num_data=10,
        )
    return PerfConfig(**given), args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; bad input (data, device) gives one line and exit status 2."""
    try:
        return _main(argv)
    except PyroVAEError as exc:
        print(f"bench_perf: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(argv: Sequence[str] | None) -> int:
    config, args = parse_args(argv)
    if args.memory_probe:
        print(PROBE_PREFIX + json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    device = resolve_device(config.device)
    if config.data_dir is not None:  # a missing or damaged file fails now, not after the SVI part
        bench_svi.cached_dataset("mnist", config.data_dir)
    report = run(config, log=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(summary_lines(report, device)))
    if config.out:
        harness.write_json(config.out, report)
        print(f"\nwrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
