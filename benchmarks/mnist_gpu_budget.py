"""The IWAE paper's MNIST numbers under a wall-clock budget on one GPU.

Burda, Grosse and Salakhutdinov (2016), "Importance Weighted Autoencoders", one stochastic layer:
dynamically binarized MNIST, encoder 784-200-200-(2×50) and decoder 50-200-200-784 with tanh,
a Bernoulli decoder whose output bias starts at logit(mean training image), and the test
log-likelihood estimated with K = 5000 importance samples. Targets, each within
``--minutes 10`` of training on one GPU:

    meanfield (the VAE, k = 1, closed-form KL)   test log p̂(x) ≥ −86.5
    iwae, dreg with k = 50                       test log p̂(x) ≥ −84.5

The model is the package's ``VAE(784, 50, (200, 200), activation="tanh")`` with
``initialize_from_data``; the loss is ``make_estimator(name, importance_samples=k)`` through
:func:`pyro_vae.train.fused.training_loss` (the fused path for ``meanfield``, the traced one for
``iwae`` and ``dreg``), as in :func:`pyro_vae.fit`. That function runs whole epochs and
evaluates after each, so this script has its own loop around the same step
(:func:`pyro_vae.train.svi_step`: loss / B, Adam; Pyro validation off), stopped by wall time:

* dynamic binarization: a fresh x ~ Bernoulli(intensity) of the whole training set each epoch,
  drawn on the device, which holds the whole training set;
* Adam with ε = 1e-4 (as in the paper) and a learning rate decaying exponentially *in wall
  time* from ``--lr`` to ``--lr-final`` over the budget, so the schedule ends when the budget
  does whatever the speed of the machine;
* batch ``--batch-size`` (default 256; the paper used 20, but a step costs about the same
  Python time at any batch size on a GPU, so larger batches buy more epochs per minute);
* float32 parameters and losses; matrix products in TF32 while training
  (``--train-matmul-precision high``; "highest" is plain float32) and in float32 for the
  final evaluation;
* the loss is read back (a device synchronization) once per epoch only.

Every ``--probe-seconds`` the clock is paused and log p̂ with K = ``--probe-particles`` is
estimated on the first ``--probe-images`` test images, for the training curve. The final
evaluation is :func:`pyro_vae.evaluate.evaluate_dataset` with K = ``--eval-particles`` on the
test set binarized once with a fixed seed. The script writes ``budget.json`` (settings,
machine, curve, result, peak memory, pass/fail), ``budget.png`` and ``per_image.pt`` (each
test image's log p̂ and ELBO) into ``--out-dir``; ``mnist_gpu_rows.py`` runs the table's
one-layer rows in one go. ::

    python benchmarks/mnist_gpu_budget.py --data-dir DIR --estimator meanfield --out-dir runs/vae
    python benchmarks/mnist_gpu_budget.py --data-dir DIR --estimator iwae --out-dir runs/iwae
    python benchmarks/mnist_gpu_budget.py --data-dir DIR --estimator dreg --out-dir runs/dreg
    # smoke run on a CPU:
    python benchmarks/mnist_gpu_budget.py --data-dir DIR --device cpu --threads 1 --minutes 0.2 \\
        --eval-particles 10 --limit 500 --out-dir /tmp/budget
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import torch

from pyro_vae import VAE, PyroVAEError, load_mnist
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.builtin import TEST_BINARIZATION_OFFSET
from pyro_vae.data.images import binarize, fixed_binarization
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.infer import make_estimator
from pyro_vae.models.config import DEVICES
from pyro_vae.train import svi_step
from pyro_vae.train.fused import training_loss
from pyro_vae.train.step import BUILTIN_PLATE_NESTING as MAX_PLATE_NESTING
from pyro_vae.util.io import write_json
from pyro_vae.util.rng import forked_rng

LATENT_DIM = 50
HIDDEN = (200, 200)
ACTIVATION = "tanh"
TARGETS = {"meanfield": -86.5, "iwae": -84.5, "dreg": -84.5}
ADAM_EPS = 1e-4
SECONDS_PER_MINUTE = 60.0
MIB = 1024 * 1024
EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class BudgetConfig:
    """One budgeted run. ``importance_samples`` applies to iwae and dreg (k = 50 in the
    paper's rows); ``limit`` keeps the first training and test images only (smoke runs)."""

    data_dir: str | None = None
    estimator: str = "iwae"
    importance_samples: int = 50
    minutes: float = 10.0
    batch_size: int = 256
    lr: float = 2e-3
    lr_final: float = 1e-4
    train_matmul_precision: str = "high"
    device: str = "auto"
    threads: int | None = None
    seed: int = 0
    eval_particles: int = 5000
    eval_batch_size: int = 500
    eval_particle_chunk: int = 1000
    probe_seconds: float = 60.0
    probe_images: int = 1000
    probe_particles: int = 100
    limit: int | None = None
    out_dir: str = "mnist-budget"

    @property
    def k(self) -> int:
        return 1 if self.estimator == "meanfield" else self.importance_samples


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(config: BudgetConfig, elapsed: float) -> float:
    """``lr`` · (``lr_final`` / ``lr``)^(elapsed / budget): exponential decay in wall time."""
    fraction = min(elapsed / (config.minutes * SECONDS_PER_MINUTE), 1.0)
    return config.lr * (config.lr_final / config.lr) ** fraction


def _probe(model: VAE, images: torch.Tensor, config: BudgetConfig) -> float:
    model.eval()
    with forked_rng():
        result = evaluate_dataset(
            model.model,
            model.guide,
            images,
            num_particles=config.probe_particles,
            batch_size=config.eval_batch_size,
            particle_chunk=config.eval_particle_chunk,
            khat=False,
        )
    model.train()
    return result.log_px.mean().item()


def train_within_budget(
    model: VAE,
    train_images: torch.Tensor,
    probe_images: torch.Tensor,
    config: BudgetConfig,
    log=print,
    on_probe: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train until ``config.minutes`` of training wall time (probes excluded) have passed;
    ``on_probe`` receives the curve so far after each probe (to save partial results)."""
    device = train_images.device
    estimator = make_estimator(
        config.estimator, importance_samples=config.k, max_plate_nesting=MAX_PLATE_NESTING
    )
    loss_fn = training_loss(model, estimator)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=ADAM_EPS)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    budget = config.minutes * SECONDS_PER_MINUTE
    curve: dict[str, list[float]] = {
        "epoch_minutes": [],
        "train_loss": [],
        "probe_minutes": [],
        "probe_log_px": [],
    }
    num_train, steps, epoch, trained = train_images.shape[0], 0, 0, 0.0
    next_probe = config.probe_seconds
    torch.set_float32_matmul_precision(config.train_matmul_precision)
    model.train()
    with pyro.validation_enabled(False):
        while trained < budget:
            epoch += 1
            _sync(device)
            start = time.perf_counter()
            images = binarize(train_images, generator)
            order = torch.randperm(num_train, device=device, generator=generator)
            loss_sum = torch.zeros((), device=device)
            seen = 0
            for begin in range(0, num_train, config.batch_size):
                if trained + time.perf_counter() - start >= budget:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, trained + time.perf_counter() - start)
                batch = images[order[begin : begin + config.batch_size]]
                loss_sum += svi_step(partial(loss_fn, batch), batch.shape[0], optimizer)
                seen += batch.shape[0]
                steps += 1
            mean_loss = loss_sum.item() / max(seen, 1)
            _sync(device)
            trained += time.perf_counter() - start
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the training loss became {mean_loss} in epoch {epoch}")
            curve["epoch_minutes"].append(trained / SECONDS_PER_MINUTE)
            curve["train_loss"].append(mean_loss)
            if trained >= next_probe or trained >= budget:
                torch.set_float32_matmul_precision("highest")
                curve["probe_minutes"].append(trained / SECONDS_PER_MINUTE)
                curve["probe_log_px"].append(_probe(model, probe_images, config))
                torch.set_float32_matmul_precision(config.train_matmul_precision)
                next_probe += config.probe_seconds
                log(
                    f"{trained / SECONDS_PER_MINUTE:6.2f} min  epoch {epoch:5d}  step {steps:7d}"
                    f"  train loss {mean_loss:8.3f}  test log p̂ (K = {config.probe_particles},"
                    f" {probe_images.shape[0]} images) {curve['probe_log_px'][-1]:8.3f}"
                )
                if on_probe is not None:
                    on_probe(
                        {"epochs": epoch, "steps": steps, "train_seconds": trained, "curve": curve}
                    )
    torch.set_float32_matmul_precision("highest")
    return {
        "epochs": epoch,
        "steps": steps,
        "train_seconds": trained,
        "curve": curve,
        "steps_per_second": steps / trained if trained else math.nan,
        "final_lr": optimizer.param_groups[0]["lr"],
    }


def plot_curve(
    curve: dict[str, list[float]], config: BudgetConfig, result: dict[str, Any], path: Path
) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(curve["epoch_minutes"], curve["train_loss"])
    left.set_xlabel("training minutes")
    left.set_ylabel(f"training loss per image ({config.estimator}, k = {config.k})")
    left.set_yscale("log")
    right.plot(
        curve["probe_minutes"],
        curve["probe_log_px"],
        marker="o",
        label=f"test log p̂, K = {config.probe_particles}",
    )
    right.axhline(TARGETS[config.estimator], color="k", linestyle="--", label="target")
    right.axhline(
        result["log_px"]["mean"],
        color="C3",
        linestyle=":",
        label=f"final, K = {config.eval_particles}",
    )
    right.set_xlabel("training minutes")
    right.set_ylabel("nats")
    right.legend()
    fig.suptitle(
        f"MNIST 784-200-200-50 tanh, {config.estimator} (k = {config.k}), "
        f"batch {config.batch_size}, {config.minutes:g} min"
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def environment(device: torch.device) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(config: BudgetConfig, out: Path | None = None) -> dict[str, Any]:
    """Train, evaluate and return the report; with ``out``, the report so far is written to
    ``out/budget.json`` after every probe (a run stopped early keeps its curve)."""
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    pyro.set_rng_seed(config.seed)
    dataset = load_mnist(config.data_dir)
    train_images = dataset.train.images[: config.limit].to(device)
    test = fixed_binarization(
        dataset.test.images[: config.limit], config.seed + TEST_BINARIZATION_OFFSET
    ).to(device)
    model = VAE(train_images.shape[1], LATENT_DIM, HIDDEN, activation=ACTIVATION).to(device)
    model.initialize_from_data(train_images)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def save_partial(training: dict[str, Any]) -> None:
        if out is not None:
            write_json(
                out / "budget.json",
                {
                    "config": asdict(config),
                    "partial": True,
                    "environment": environment(device),
                    "training": training,
                },
            )

    training = train_within_budget(
        model, train_images, test[: config.probe_images], config, on_probe=save_partial
    )
    train_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    result = evaluate_dataset(
        model.model,
        model.guide,
        test,
        num_particles=config.eval_particles,
        batch_size=config.eval_batch_size,
        particle_chunk=config.eval_particle_chunk,
        khat=False,
    )
    _sync(device)
    eval_seconds = time.perf_counter() - start
    eval_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary = result.summary()
    if out is not None:  # each test image's log p̂, for paired differences between rows
        torch.save(
            {"log_px": result.log_px.double().cpu(), "elbo": result.elbo.double().cpu()},
            out / "per_image.pt",
        )
    target = TARGETS[config.estimator]
    return {
        "config": asdict(config),
        "partial": False,
        "k": config.k,
        "environment": environment(device),
        "training": training,
        "eval_seconds": eval_seconds,
        "log_px": summary["log_px"],
        "elbo": summary["elbo"],
        "peak_memory_mib": {
            "training": None if train_peak is None else train_peak / MIB,
            "evaluation": None if eval_peak is None else eval_peak / MIB,
        },
        "target": target,
        "passed": summary["log_px"]["mean"] >= target,
        "full_protocol": config.limit is None and config.eval_particles == 5000,
    }


def parse_args(argv: Sequence[str] | None = None) -> BudgetConfig:
    d = BudgetConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the MNIST IDX files")
    p.add_argument("--estimator", choices=sorted(TARGETS), default=d.estimator)
    p.add_argument(
        "--importance-samples",
        type=int,
        default=d.importance_samples,
        help="k of iwae and dreg (default %(default)s)",
    )
    p.add_argument("--minutes", type=float, default=d.minutes, help="training wall time")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="starting learning rate")
    p.add_argument(
        "--lr-final",
        type=float,
        default=d.lr_final,
        help="learning rate at the end of the budget (exponential decay)",
    )
    p.add_argument(
        "--train-matmul-precision",
        choices=("highest", "high", "medium"),
        default=d.train_matmul_precision,
    )
    p.add_argument("--device", choices=DEVICES, default=d.device)
    p.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's; 1 on a busy shared CPU)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-particles", type=int, default=d.eval_particles)
    p.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    p.add_argument("--eval-particle-chunk", type=int, default=d.eval_particle_chunk)
    p.add_argument("--probe-seconds", type=float, default=d.probe_seconds)
    p.add_argument("--probe-images", type=int, default=d.probe_images)
    p.add_argument("--probe-particles", type=int, default=d.probe_particles)
    p.add_argument("--limit", type=int, help="first N training and test images (smoke runs)")
    p.add_argument("--out-dir", default=d.out_dir)
    return BudgetConfig(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the budget; bad input (data, device) gives one line and exit status 2, and an output
    folder this call created is removed again if nothing was written into it."""
    config = parse_args(argv)
    out = Path(config.out_dir)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run(config, out)
    except PyroVAEError as exc:
        if created and not any(out.iterdir()):
            out.rmdir()
        print(f"mnist_gpu_budget: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    write_json(out / "budget.json", report)
    plot_curve(report["training"]["curve"], config, report, out / "budget.png")
    training = report["training"]
    print(
        f"\n{config.estimator} (k = {config.k}): {training['epochs']} epochs, "
        f"{training['steps']} steps in {training['train_seconds'] / 60:.2f} min "
        f"({training['steps_per_second']:.0f} steps/s); test log p̂ (K = "
        f"{config.eval_particles}) {report['log_px']['mean']:.3f} ± "
        f"{report['log_px']['stderr']:.3f} in {report['eval_seconds']:.1f} s; target ≥ "
        f"{report['target']}: {'passed' if report['passed'] else 'NOT reached'}"
        f"{'' if report['full_protocol'] else ' (not the full protocol: --limit or K)'}"
    )
    print(f"wrote {out / 'budget.json'} and {out / 'budget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
