"""Rows of the MNIST log-likelihood table (Burda et al. 2016, Table 1), on a CPU through the
package's engine or on one GPU under a wall-clock budget, measured by the package's evaluator.

Every row is the IWAE paper's network (one stochastic layer: 784-200-200-50, tanh, Bernoulli
decoder whose bias starts at logit(mean training image)), an estimator (``--row vae``:
``meanfield``; ``iwae``/``dreg`` with ``--k`` importance samples, 50 by default), Adam with the
learning rate decaying exponentially from ``--lr`` to ``--lr-final`` over the wall-clock budget
``--minutes`` (or over ``--epochs``), and at the end log p̂_K with K = ``--eval-particles``
(5000 in the paper) on the test images, with its standard error and the test ELBO.

**The table** (the default mode; one CPU thread): trained by :func:`pyro_vae.fit`, batch 128,
dynamically binarized MNIST (a fresh Bernoulli draw of the 60 000 training images every
epoch). Two callbacks of the engine do the budget and the curve: the learning rate and the
stop, and a probe of log p̂ (K = ``--probe-particles``) on the first ``--probe-images`` test
images every ``--probe-every`` epochs (a curve only: nothing is selected on it). The test
images (all 10 000 unless ``--eval-limit``) have a fixed seeded binarization; the row is
appended to ``--out`` (JSON, written atomically after every row) with its command.

    python benchmarks/mnist_table.py --data-dir DIR --row vae --minutes 40 --threads 1
    python benchmarks/mnist_table.py --data-dir DIR --row iwae --k 50 --epochs 30
    python benchmarks/mnist_table.py --data-dir DIR --row vae --epochs 1 --limit 512 \\
        --eval-particles 10 --eval-limit 100 --out /tmp/smoke.json          # a smoke run

``--row vamp`` trains the one-layer model with the VampPrior (``--pseudo-inputs``, 500 by
default; :mod:`pyro_vae.models.vampprior`) with ``meanfield``. ``--layers 2`` trains the
two-stochastic-layer model (latents 100 and 50, hidden 200-200 and 100-100); ``--protocol
fixed`` the fixed binarized MNIST (``binarized_mnist.npz``, 50 000 training images, probe on
the validation images, test on its 10 000) through the user-data path of :func:`pyro_vae.fit`.
``--per-image`` saves every test image's log p̂ and ELBO, ``--pairs A.pt B.pt ...`` prints the
paired differences between saved rows, ``--plot PNG`` the probe curves of ``--out``'s rows.
``--row all`` trains a protocol's and depth's whole table at one budget, one row after the
other (dynamic: VAE, IWAE k=5 and k=50, DReG k=50; fixed: VAE, IWAE k=50 and, one layer, the
VampPrior), saves each row's per-image scores in ``--per-image-dir`` and records the paired
difference of every two rows in ``--out``:

    python benchmarks/mnist_table.py --data-dir DIR --row all --epochs 30 --threads 1

``--row families`` trains IWAE k=50 and the estimator families beside it the same way: ``renyi``
(α = 0.5), ``miwae`` and ``piwae`` (M = 5 groups of K = 10 draws), ``ciwae`` (``elbo_weight``
0.5) and ``rws``, each drawing 50 samples per datapoint and step, with every paired difference.
``--device cuda`` (or ``auto``) trains and scores the table's rows the same way on a GPU.

**The budget** (``--out-dir``; meant for one GPU, ``--device`` auto): a one-layer dynamic row
(``--row`` ``iwae`` by default) trained by this script's own loop around the package's step
(:func:`pyro_vae.train.svi_step` on :func:`pyro_vae.train.fused.training_loss`: the fused loss
for ``meanfield`` and ``iwae``, the traced one for ``dreg``; Pyro validation off) until
``--minutes`` (10) of training wall time have passed. The whole training set lives on the
device and is binarized afresh there every epoch; batch 256 (a step costs about the same Python
time at any batch size on a GPU, so larger batches buy epochs); Adam with ε = 1e-4 as in the
paper; the learning rate set before every step from the wall time, so the schedule ends with
the budget; TF32 matrix products while training (``--train-matmul-precision high``) and float32
for probes and evaluation; the loss read back once per epoch. Every ``--probe-seconds`` (60)
the clock is paused for a probe. ``--limit`` keeps the first training *and* test images. It
writes ``budget.json`` (settings, machine, curve, result, peak memory, whether the target of
a 10-minute budget was reached: −86.5 for the VAE, −84.5 for IWAE and DReG; written after
every probe too), ``budget.png`` and ``per_image.pt`` into ``--out-dir``. ::

    python benchmarks/mnist_table.py --data-dir DIR --row iwae --out-dir runs/iwae
    python benchmarks/mnist_table.py --data-dir DIR --device cpu --threads 1 --minutes 0.2 \\
        --eval-particles 10 --limit 500 --out-dir /tmp/budget            # a smoke run

``--out-dir`` with ``--row all`` (or ``--rows vae iwae5 ...``) runs the table's four one-layer
rows (vae, iwae5, iwae50, dreg50) that way, one after the other or, with ``--parallel``, all at
once, one process each on the same device (a step of this small network leaves most of a GPU
idle), each process's output in its row folder's ``log.txt``. ``rows.json`` holds one entry per
row (settings, epochs, steps, seconds, test log p̂ with its standard error, test ELBO, the
published number) and the paired differences; each row's folder holds its ``budget.json``,
``budget.png`` and ``per_image.pt``. A row that fails stops the command with one line; the rows
already written stay (in parallel, the other rows finish and are written, and the command still
fails). Four rows at 2 minutes each fit in about 10 minutes of GPU time. ::

    python benchmarks/mnist_table.py --data-dir DIR --row all --minutes 2 --out-dir runs/rows
    python benchmarks/mnist_table.py --data-dir DIR --row all --parallel --minutes 7 \\
        --out-dir runs/rows

Published rows (test log p̂, K = 5000, nats): dynamic, 1 layer: VAE −86.76, IWAE k=5 −85.54,
IWAE k=50 −84.78; 2 layers: VAE −85.33, IWAE k=50 −82.90 (Burda et al. 2016, 3 280 epochs);
fixed (pythae's reproductions): VAE −89.78, IWAE k=50 −86.82.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shlex
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import pyro_vae.data.builtin as builtin
from pyro_vae import ModelConfig, PyroVAEError, TrainConfig, fit
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.images import (
    Dataset,
    Split,
    binarize,
    fixed_binarization,
    load_binarized_mnist,
    load_mnist,
)
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.infer import make_estimator
from pyro_vae.models.config import DEVICES
from pyro_vae.models.vae import VAE
from pyro_vae.models.vae2 import VAE2
from pyro_vae.models.vampprior import VampPriorVAE
from pyro_vae.train import Callback, svi_step
from pyro_vae.train.fused import training_loss
from pyro_vae.train.step import BUILTIN_PLATE_NESTING
from pyro_vae.util.io import write_json
from pyro_vae.util.rng import forked_rng

ROWS = {"vae": "meanfield", "iwae": "iwae", "dreg": "dreg", "vamp": "meanfield"}
#: the estimator families' rows (table mode): their estimator, its options and M, each drawing
#: M·K = 50 samples per datapoint and step at the default K, as the IWAE k=50 row does
FAMILIES = {
    "renyi": {"elbo_options": {"alpha": 0.5}},
    "miwae": {"particles": 5},
    "piwae": {"particles": 5},
    "ciwae": {"elbo_options": {"elbo_weight": 0.5}},
    "rws": {},
}
ROWS.update({name: name for name in FAMILIES})
TABLE = {  # --row all: (row, k) in the order trained
    "dynamic": [("vae", 1), ("iwae", 5), ("iwae", 50), ("dreg", 50)],
    "fixed": [("vae", 1), ("iwae", 50), ("vamp", 1)],
}
#: --row families: IWAE k=50 and the families beside it, paired on the same test images
FAMILY_TABLE = [
    ("iwae", 50),
    *((name, 10 if "particles" in FAMILIES[name] else 50) for name in FAMILIES),
]
PUBLISHED = {  # (protocol, layers, row, k): test log p̂ at K = 5000 (fixed: pythae's table)
    ("dynamic", 1, "vae", 1): -86.76,
    ("dynamic", 1, "iwae", 5): -85.54,
    ("dynamic", 1, "iwae", 50): -84.78,
    ("dynamic", 2, "vae", 1): -85.33,
    ("dynamic", 2, "iwae", 50): -82.90,
    ("fixed", 1, "vae", 1): -89.78,
    ("fixed", 1, "iwae", 50): -86.82,
    ("fixed", 1, "vamp", 1): -85.79,
}
NETWORKS = {  # Burda et al.'s architectures: 1 layer 784-200-200-50; 2 layers 100-50 latents
    1: ModelConfig(latent_dim=50, hidden=(200, 200), activation="tanh"),
    2: ModelConfig(
        family="vae2",
        latent_dim=100,
        hidden=(200, 200),
        latent2_dim=50,
        hidden2=(100, 100),
        activation="tanh",
    ),
}
MODEL_NAMES = {1: "1-layer 784-200-200-50 tanh", 2: "2-layer 784-(200-200)-100-(100-100)-50 tanh"}
#: the budget's targets within 10 minutes on one GPU, by estimator
TARGETS = {"meanfield": -86.5, "iwae": -84.5, "dreg": -84.5}
#: each mode's defaults of the options left unset; an option only the other mode has is refused
DEFAULTS = {
    "table": {
        "row": "vae",
        "protocol": "dynamic",
        "layers": 1,
        "pseudo_inputs": 500,
        "minutes": None,
        "epochs": 100_000,
        "batch_size": 128,
        "threads": 1,
        "device": "cpu",
        "probe_every": 10,
        "eval_limit": None,
        "out": Path("benchmarks/results/mnist_table.json"),
        "per_image": None,
        "per_image_dir": None,
        "quiet": False,
    },
    "budget": {
        "row": "iwae",
        "minutes": 10.0,
        "batch_size": 256,
        "threads": None,
        "device": "auto",
        "train_matmul_precision": "high",
        "eval_batch_size": 500,
        "eval_particle_chunk": 1000,
        "probe_seconds": 60.0,
        "rows": None,
        "parallel": False,
    },
}
#: the budget's settings in its budget.json, passed on to each row of --parallel
BUDGET_SETTINGS = (
    "minutes",
    "batch_size",
    "lr",
    "lr_final",
    "train_matmul_precision",
    "device",
    "threads",
    "seed",
    "eval_particles",
    "eval_batch_size",
    "eval_particle_chunk",
    "probe_seconds",
    "probe_images",
    "probe_particles",
    "limit",
)
ADAM_EPS = 1e-4
MIB = 1024 * 1024
EXIT_USER_ERROR = 2
#: the command that trains one row of --parallel in a process of its own
ROW_COMMAND = [sys.executable, str(Path(__file__).resolve())]


def row_k(args: argparse.Namespace) -> int:
    """The row's importance samples: 1 for ``meanfield``, else ``--k`` (50 by default; 10 for
    ``miwae`` and ``piwae``, whose M = 5 makes 50 draws)."""
    if ROWS[args.row] == "meanfield":
        return 1
    if args.k is not None:
        return args.k
    return 10 if "particles" in FAMILIES.get(args.row, {}) else 50


def score(model, images: torch.Tensor, particles: int, **options: Any):
    """log p̂ with ``particles`` importance samples (and the ELBO) of each of ``images``."""
    return evaluate_dataset(
        model.model, model.guide, images, num_particles=particles, khat=False, **options
    )


def print_pairs(pairs: list[dict[str, Any]]) -> None:
    for d in pairs:
        print(f"{d['a']} − {d['b']}: {d['mean']:+.3f} ± {d['stderr']:.3f} nats")


# The table: a row trained by the package's engine.


class Schedule(Callback):
    """Learning rate lr · (lr_final / lr)^fraction after each epoch, the fraction of the
    wall-clock budget (or of the epochs) used; stops the run when the budget is spent."""

    def __init__(self, lr: float, lr_final: float, minutes: float | None, epochs: int):
        self.lr, self.lr_final, self.epochs = lr, lr_final, epochs
        self.seconds = None if minutes is None else 60.0 * minutes
        self.start = time.perf_counter()

    def on_epoch_end(self, loop) -> None:
        elapsed = time.perf_counter() - self.start
        fraction = elapsed / self.seconds if self.seconds is not None else loop.epoch / self.epochs
        for group in loop.optimizer.param_groups:
            group["lr"] = self.lr * (self.lr_final / self.lr) ** min(fraction, 1.0)
        if self.seconds is not None and elapsed >= self.seconds:
            loop.stop = True


class Probe(Callback):
    """log p̂_K on fixed probe images every ``every`` epochs: the training curve."""

    def __init__(self, images: torch.Tensor, particles: int, every: int):
        self.images, self.particles, self.every = images, particles, every
        self.curve: list[dict[str, float]] = []
        self.start = time.perf_counter()

    def on_epoch_end(self, loop) -> None:
        if loop.epoch % self.every:
            return
        with forked_rng():
            torch.manual_seed(loop.epoch)
            result = score(loop.model, self.images, self.particles)
        self.curve.append(
            {
                "epoch": loop.epoch,
                "seconds": time.perf_counter() - self.start,
                "log_px": result.log_px.mean().item(),
            }
        )
        print(f"epoch {loop.epoch}: probe log p̂ {self.curve[-1]['log_px']:.2f}", flush=True)


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    k = row_k(args)
    network = NETWORKS[args.layers]
    if args.row == "vamp":
        if args.layers != 1:
            raise PyroVAEError(
                "--row vamp is the one-layer model with the VampPrior: use --layers 1"
            )
        network = dataclasses.replace(network, family="vampprior", pseudo_inputs=args.pseudo_inputs)
    config = TrainConfig(
        dataset="mnist",
        data_dir=args.data_dir,
        model=network,
        elbo=ROWS[args.row],
        importance_samples=k,
        particles=FAMILIES.get(args.row, {}).get("particles", 1),
        elbo_options=FAMILIES.get(args.row, {}).get("elbo_options", {}),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_particles=1,
        final_particles=0,
        device=args.device,
    )
    device = resolve_device(args.device)
    schedule = Schedule(args.lr, args.lr_final, args.minutes, args.epochs)
    start = time.perf_counter()
    if args.protocol == "dynamic":
        test_count = len(load_mnist(args.data_dir).test)
        probe_images = builtin.evaluation_images(load_mnist(args.data_dir), "test", config)[
            : args.probe_images
        ].to(device)
        probe = Probe(probe_images, args.probe_particles, args.probe_every)
        load = builtin.prepare_data  # a smoke run (--limit): the first training images only

        def limited(*a: Any, **kw: Any) -> Dataset:
            return _limited(load(*a, **kw), args.limit)

        with mock.patch.object(builtin, "prepare_data", load if args.limit is None else limited):
            result = fit(config=config, callbacks=[schedule, probe], progress=not args.quiet)
        images = builtin.evaluation_images(load_mnist(args.data_dir), "test", config)
    else:  # the fixed binarization: the package's network as a pair on the user-data path
        data = load_binarized_mnist(args.data_dir, verify=args.limit is None)
        train = (data.train if args.limit is None else data.train[: args.limit]).to(device)
        valid = data.valid[: args.probe_images].to(device)
        probe = Probe(valid, args.probe_particles, args.probe_every)
        model = build_network(network, train, device)
        result = fit(
            model,
            train,
            config=config.replace(dataset=None, model=None, binarize="none"),
            callbacks=[schedule, probe],
            progress=not args.quiet,
        )
        images, test_count = data.test, len(data.test)
    train_seconds = time.perf_counter() - start
    images = (images[: args.eval_limit] if args.eval_limit else images).to(device)
    start = time.perf_counter()
    with forked_rng():
        torch.manual_seed(args.seed)
        scored = score(
            result.model,
            images,
            args.eval_particles,
            batch_size=100,
            particle_chunk=min(args.eval_particles, 500),
        )
    summary = scored.summary()
    history = result.history
    if args.per_image is not None:  # for paired differences between rows (same test images)
        args.per_image.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"log_px": scored.log_px.double(), "elbo": scored.elbo.double()}, args.per_image)
    steps_per_epoch = math.ceil(
        (60_000 if args.protocol == "dynamic" else 50_000) / args.batch_size
    )
    return {
        "protocol": args.protocol,
        "estimator": ROWS[args.row],
        "model": MODEL_NAMES[args.layers]
        + (f", VampPrior with {args.pseudo_inputs} pseudo-inputs" if args.row == "vamp" else ""),
        "k": k,
        "particles": config.particles,
        "elbo_options": config.elbo_options,
        "budget_minutes": args.minutes,
        "epochs": len(history.epoch),
        "steps": len(history.epoch) * steps_per_epoch if args.limit is None else None,
        "batch_size": args.batch_size,
        "lr": [args.lr, args.lr_final],
        "device": device.type,
        "threads": torch.get_num_threads(),
        "train_seconds": train_seconds,
        "eval_seconds": time.perf_counter() - start,
        "test_images": scored.num_datapoints,
        "eval_particles": args.eval_particles,
        "test_log_px": summary["log_px"]["mean"],
        "test_log_px_stderr": summary["log_px"]["stderr"],
        "test_elbo": summary["elbo"]["mean"],
        "published": PUBLISHED.get((args.protocol, args.layers, args.row, k)),
        "curve": probe.curve,
        "train_loss": history.train_loss,
        "machine": platform.machine(),
        "command": shlex.join([sys.executable, *sys.argv]),
        "limit": args.limit,
        "test_count": test_count,
        "per_image": None if args.per_image is None else str(args.per_image),
    }


def build_network(
    network: ModelConfig, train: torch.Tensor, device: torch.device | None = None
) -> torch.nn.Module:
    """The package's VAE (two-layer VAE, VampPrior VAE) sized for 784 pixels (on ``device``),
    its decoder bias at the logit of the mean training image."""
    common = dict(
        latent_dim=network.latent_dim, hidden=network.hidden, activation=network.activation
    )
    if network.family == "vae2":
        model = VAE2(784, latent2_dim=network.latent2_dim, hidden2=network.hidden2, **common)
    elif network.family == "vampprior":
        model = VampPriorVAE(784, pseudo_inputs=network.pseudo_inputs, **common)
    else:
        model = VAE(784, **common)
    model.to(device)
    model.initialize_from_data(train)
    return model


def _limited(dataset: Dataset, limit: int) -> Dataset:
    train = Split(dataset.train.images[:limit], dataset.train.labels[:limit])
    return Dataset(dataset.name, train, dataset.test, dataset.image_shape, dataset.num_classes)


# The budget: a one-layer dynamic row trained for a wall-clock budget by this script's loop.


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rate(args: argparse.Namespace, elapsed: float) -> float:
    """``lr`` · (``lr_final`` / ``lr``)^(elapsed / budget): exponential decay in wall time."""
    fraction = min(elapsed / (args.minutes * 60.0), 1.0)
    return args.lr * (args.lr_final / args.lr) ** fraction


def budget_probe(model: VAE, images: torch.Tensor, args: argparse.Namespace) -> float:
    model.eval()
    with forked_rng():
        result = score(model, images, args.probe_particles, **eval_options(args))
    model.train()
    return result.log_px.mean().item()


def eval_options(args: argparse.Namespace) -> dict[str, int]:
    return dict(batch_size=args.eval_batch_size, particle_chunk=args.eval_particle_chunk)


def train_within_budget(
    model: VAE, train_images: torch.Tensor, probe_images: torch.Tensor, args, on_probe=None
) -> dict[str, Any]:
    """Train until ``args.minutes`` of training wall time (probes excluded) have passed;
    ``on_probe`` receives the training so far after each probe (to save partial results)."""
    device, k = train_images.device, row_k(args)
    estimator = make_estimator(
        ROWS[args.row], importance_samples=k, max_plate_nesting=BUILTIN_PLATE_NESTING
    )
    loss_fn = training_loss(model, estimator)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, eps=ADAM_EPS)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    budget = args.minutes * 60.0
    curve: dict[str, list[float]] = {
        "epoch_minutes": [],
        "train_loss": [],
        "probe_minutes": [],
        "probe_log_px": [],
    }
    num_train, steps, epoch, trained = train_images.shape[0], 0, 0, 0.0
    next_probe = args.probe_seconds
    torch.set_float32_matmul_precision(args.train_matmul_precision)
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
            for begin in range(0, num_train, args.batch_size):
                if trained + time.perf_counter() - start >= budget:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(args, trained + time.perf_counter() - start)
                batch = images[order[begin : begin + args.batch_size]]
                loss_sum += svi_step(partial(loss_fn, batch), batch.shape[0], optimizer)
                seen += batch.shape[0]
                steps += 1
            mean_loss = loss_sum.item() / max(seen, 1)
            _sync(device)
            trained += time.perf_counter() - start
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"the training loss became {mean_loss} in epoch {epoch}")
            curve["epoch_minutes"].append(trained / 60.0)
            curve["train_loss"].append(mean_loss)
            if trained >= next_probe or trained >= budget:
                torch.set_float32_matmul_precision("highest")
                curve["probe_minutes"].append(trained / 60.0)
                curve["probe_log_px"].append(budget_probe(model, probe_images, args))
                torch.set_float32_matmul_precision(args.train_matmul_precision)
                next_probe += args.probe_seconds
                print(
                    f"{trained / 60.0:6.2f} min  epoch {epoch:5d}  step {steps:7d}"
                    f"  train loss {mean_loss:8.3f}  test log p̂ (K = {args.probe_particles},"
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


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_budget(report: dict[str, Any], path: Path) -> None:
    config, curve = report["config"], report["training"]["curve"]
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(curve["epoch_minutes"], curve["train_loss"])
    left.set_xlabel("training minutes")
    left.set_ylabel(f"training loss per image ({config['estimator']}, k = {report['k']})")
    left.set_yscale("log")
    right.plot(
        curve["probe_minutes"],
        curve["probe_log_px"],
        marker="o",
        label=f"test log p̂, K = {config['probe_particles']}",
    )
    right.axhline(report["target"], color="k", linestyle="--", label="target")
    right.axhline(
        report["log_px"]["mean"],
        color="C3",
        linestyle=":",
        label=f"final, K = {config['eval_particles']}",
    )
    right.set_xlabel("training minutes")
    right.set_ylabel("nats")
    right.legend()
    fig.suptitle(
        f"MNIST 784-200-200-50 tanh, {config['estimator']} (k = {report['k']}), "
        f"batch {config['batch_size']}, {config['minutes']:g} min"
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


def budget_config(args: argparse.Namespace) -> dict[str, Any]:
    """The settings of a budget run, as its budget.json records them."""
    return {
        "data_dir": args.data_dir,
        "estimator": ROWS[args.row],
        "importance_samples": 50 if args.k is None else args.k,
        **{name: getattr(args, name) for name in BUDGET_SETTINGS},
        "out_dir": str(args.out_dir),
    }


def run_budget(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Train, evaluate and return the report; with ``out``, the report so far is written to
    ``out/budget.json`` after every probe (a run stopped early keeps its curve)."""
    device = resolve_device(args.device)
    pyro.set_rng_seed(args.seed)
    dataset = load_mnist(args.data_dir)
    train_images = dataset.train.images[: args.limit].to(device)
    test = fixed_binarization(
        dataset.test.images[: args.limit], args.seed + builtin.TEST_BINARIZATION_OFFSET
    ).to(device)
    model = build_network(NETWORKS[1], train_images, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = budget_config(args)

    def save_partial(training: dict[str, Any]) -> None:
        if out is not None:
            report = dict(config=config, partial=True, environment=environment(device))
            write_json(out / "budget.json", {**report, "training": training})

    training = train_within_budget(
        model, train_images, test[: args.probe_images], args, on_probe=save_partial
    )
    train_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    result = score(model, test, args.eval_particles, **eval_options(args))
    _sync(device)
    eval_seconds = time.perf_counter() - start
    eval_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary = result.summary()
    if out is not None:  # each test image's log p̂, for paired differences between rows
        torch.save(
            {"log_px": result.log_px.double().cpu(), "elbo": result.elbo.double().cpu()},
            out / "per_image.pt",
        )
    target = TARGETS[ROWS[args.row]]
    return {
        "config": config,
        "partial": False,
        "k": row_k(args),
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
        "full_protocol": args.limit is None and args.eval_particles == 5000,
    }


def budget_main(args: argparse.Namespace) -> int:
    """One budget row into ``args.out_dir``; bad input (data, device) gives one line and exit
    status 2, and an output folder this call created is removed again if it stayed empty."""
    out = args.out_dir
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_budget(args, out)
    except PyroVAEError as exc:
        if created and not any(out.iterdir()):
            out.rmdir()
        print(f"mnist_table: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    write_json(out / "budget.json", report)
    plot_budget(report, out / "budget.png")
    training, k = report["training"], report["k"]
    print(
        f"\n{ROWS[args.row]} (k = {k}): {training['epochs']} epochs, "
        f"{training['steps']} steps in {training['train_seconds'] / 60:.2f} min "
        f"({training['steps_per_second']:.0f} steps/s); test log p̂ (K = "
        f"{args.eval_particles}) {report['log_px']['mean']:.3f} ± "
        f"{report['log_px']['stderr']:.3f} in {report['eval_seconds']:.1f} s; target ≥ "
        f"{report['target']}: {'passed' if report['passed'] else 'NOT reached'}"
        f"{'' if report['full_protocol'] else ' (not the full protocol: --limit or K)'}"
    )
    print(f"wrote {out / 'budget.json'} and {out / 'budget.png'}")
    return 0


# The budget's rows: the table's one-layer dynamic rows, one after the other or all at once.


def budget_rows(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(name, row, k) of each row ``--row all`` or ``--rows`` chose."""
    rows = [(row_name("dynamic", 1, row, k), row, k) for row, k in table_rows("dynamic", 1)]
    return [r for r in rows if args.rows is None or r[0] in args.rows]


def row_argv(args: argparse.Namespace, row: str, k: int, folder: Path) -> list[str]:
    """The command line of one budget row of ``args``, for a process of its own."""
    argv = [] if args.data_dir is None else ["--data-dir", args.data_dir]
    for name in BUDGET_SETTINGS:
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return [*argv, "--row", row, "--k", str(k), "--out-dir", str(folder)]


def run_parallel(args: argparse.Namespace, chosen: list[tuple[str, str, int]]) -> list[int]:
    """Start every row's budget run at once (its output to ``log.txt`` in the row's folder)
    and wait for all of them; their exit statuses, in order."""
    processes = []
    for name, row, k in chosen:
        folder = args.out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "log.txt", "w") as log:
            processes.append(
                subprocess.Popen(
                    [*ROW_COMMAND, *row_argv(args, row, k, folder)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return [process.wait() for process in processes]


def row_entry(name: str, row: str, k: int, folder: Path) -> dict[str, Any]:
    """A row of ``rows.json`` from the row's ``budget.json``."""
    report = json.loads((folder / "budget.json").read_text())
    training = report["training"]
    return {
        "row": name,
        "estimator": ROWS[row],
        "k": k,
        "minutes": report["config"]["minutes"],
        "epochs": training["epochs"],
        "steps": training["steps"],
        "train_seconds": training["train_seconds"],
        "eval_seconds": report["eval_seconds"],
        "eval_particles": report["config"]["eval_particles"],
        "test_log_px": report["log_px"]["mean"],
        "test_log_px_stderr": report["log_px"]["stderr"],
        "test_elbo": report["elbo"]["mean"],
        "published": PUBLISHED.get(("dynamic", 1, row, k)),
        "environment": report["environment"],
        "full_protocol": report["full_protocol"],
    }


def rows_main(args: argparse.Namespace) -> int:
    """The chosen rows into ``args.out_dir`` and their paired differences into ``rows.json``."""
    chosen, out = budget_rows(args), args.out_dir
    fresh = [p for p in (out, *(out / name for name, _, _ in chosen)) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed = 0
    if args.parallel:
        errors = {}  # a failed row's last line of output, by row
        for (name, row, k), status in zip(chosen, run_parallel(args, chosen)):
            if status == 0:
                rows.append(row_entry(name, row, k, out / name))
            else:
                log = (out / name / "log.txt").read_text().strip().splitlines()
                errors[name], failed = (log or [f"status {status}"])[-1], failed or status
        if not rows and len(set(errors.values())) == 1:  # bad input: one line
            print(f"mnist_table: every row failed ({next(iter(errors.values()))})", file=sys.stderr)
        else:
            for name, line in errors.items():
                print(f"mnist_table: the {name} row failed ({line})", file=sys.stderr)
    else:
        for name, row, k in chosen:
            one = argparse.Namespace(**{**vars(args), "row": row, "k": k, "out_dir": out / name})
            failed = budget_main(one)
            if failed:
                print(f"mnist_table: the {name} row failed (status {failed})", file=sys.stderr)
                break
            rows.append(row_entry(name, row, k, out / name))
            write_json(out / "rows.json", {"rows": rows, "pairs": []})
    if not rows:
        for path in reversed(fresh):
            shutil.rmtree(path, ignore_errors=True)
        return failed
    names = [r["row"] for r in rows]
    pairs = paired_differences([out / name / "per_image.pt" for name in names], names)
    write_json(out / "rows.json", {"rows": rows, "pairs": pairs})
    print(f"\nrow       epochs  test log p̂ (K = {rows[0]['eval_particles']})      published")
    for r in rows:
        print(
            f"{r['row']:8s} {r['epochs']:7d}  {r['test_log_px']:8.3f} ± "
            f"{r['test_log_px_stderr']:.3f}      "
            f"{'—' if r['published'] is None else r['published']}"
        )
    print_pairs(pairs)
    print(f"wrote {out / 'rows.json'}")
    return failed


# The one command line.


def build_parser() -> argparse.ArgumentParser:
    """Every mode's options; those left unset take their mode's :data:`DEFAULTS`."""
    positive, number = harness.positive_int, float
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument(
        "--data-dir",
        help="folder with the MNIST IDX files, or with "
        "binarized_mnist.npz for --protocol fixed ($PYRO_VAE_DATA_DIR)",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        help="the budget mode: train by wall time (meant for one GPU) and write budget.json, "
        "budget.png and per_image.pt here (with --row all or --rows: a folder per row and "
        "rows.json)",
    )
    p.add_argument(
        "--row",
        choices=[*sorted(ROWS), "all", "families"],
        help="the row to train (table: vae, budget: iwae), or all: every row of --protocol "
        "and --layers at the same budget, with their paired differences; families: IWAE k=50 "
        "and renyi (alpha 0.5), miwae and piwae (M = 5, K = 10), ciwae (elbo_weight 0.5) and "
        "rws, paired",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=[name for name, _, _ in budget_rows(argparse.Namespace(rows=None))],
        help="budget mode: these of the one-layer rows only",
    )
    p.add_argument(
        "--parallel",
        action="store_true",
        default=None,
        help="budget mode: train the rows at the same time, one process each on the same device",
    )
    p.add_argument(
        "--layers",
        type=int,
        choices=(1, 2),
        help="stochastic layers: 1 (784-200-200-50) or 2 (100 and 50 latents)",
    )
    p.add_argument(
        "--protocol",
        choices=("dynamic", "fixed"),
        help="dynamic: a fresh binarization of MNIST's IDX files every epoch, "
        "test on a fixed one; fixed: binarized_mnist.npz (50k/10k/10k), "
        "probe on validation images",
    )
    p.add_argument(
        "--k", "--importance-samples", type=positive, help="importance samples of iwae/dreg (50)"
    )
    p.add_argument(
        "--pseudo-inputs", type=positive, help="pseudo-inputs of the VampPrior row (500)"
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        help="table: cpu (or auto, cuda: the same rows on a GPU); budget: auto, cpu or cuda",
    )
    p.add_argument("--minutes", type=number, help="wall-clock training budget (budget: 10)")
    p.add_argument("--epochs", type=positive, help="epoch cap (the budget usually stops first)")
    p.add_argument("--batch-size", type=positive, help="table 128, budget 256")
    p.add_argument("--lr", type=number, default=2e-3, help="starting learning rate")
    p.add_argument(
        "--lr-final", type=number, default=1e-4, help="learning rate at the end (exponential)"
    )
    p.add_argument(
        "--train-matmul-precision",
        choices=("highest", "high", "medium"),
        help="budget: float32 matrix products while training (high: TF32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=positive, help="torch's threads (table 1, budget torch's)")
    p.add_argument("--probe-images", type=positive, default=1000)
    p.add_argument("--probe-particles", type=positive, default=100)
    p.add_argument("--probe-every", type=positive, help="table: probe every N epochs (10)")
    p.add_argument("--probe-seconds", type=number, help="budget: probe every S seconds (60)")
    p.add_argument("--eval-particles", type=positive, default=5000)
    p.add_argument("--eval-batch-size", type=positive, help="budget: 500")
    p.add_argument("--eval-particle-chunk", type=positive, help="budget: 1000")
    p.add_argument("--eval-limit", type=positive, help="table: the first N test images only")
    p.add_argument(
        "--limit", type=positive, help="the first N training images only (budget: and test)"
    )
    p.add_argument("--out", type=Path, help=f"table: its JSON ({DEFAULTS['table']['out']})")
    p.add_argument(
        "--per-image",
        type=Path,
        help="save each test image's log p̂ and ELBO here (.pt) for paired differences",
    )
    p.add_argument(
        "--per-image-dir",
        type=Path,
        help="--row all: the folder of the rows' per-image files (default: next to "
        "--out, named after it)",
    )
    p.add_argument(
        "--pairs",
        nargs="+",
        type=Path,
        metavar="PT",
        help="print the paired differences of log p̂ between saved rows, and exit",
    )
    p.add_argument(
        "--plot",
        type=Path,
        metavar="PNG",
        help="plot the probe curves of the rows in --out into PNG, and exit",
    )
    p.add_argument("--quiet", action="store_true", default=None)
    return p


def parse_args(argv: list[str] | None) -> tuple[str, argparse.Namespace]:
    """The mode (pairs, plot, table, budget, rows) and the options with its defaults filled
    in; an option of another mode, or a missing budget, is a :class:`PyroVAEError`."""
    args = build_parser().parse_args(argv)
    mode = "budget" if args.out_dir is not None else "table"
    other = DEFAULTS["table" if mode == "budget" else "budget"]
    for name in other.keys() - DEFAULTS[mode].keys():
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise PyroVAEError(
                f"{flag} is an option of the "
                + ("table: drop --out-dir" if mode == "budget" else "budget: give --out-dir")
            )
    for name, value in DEFAULTS[mode].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pairs or args.plot:
        if mode == "budget":
            raise PyroVAEError("--pairs and --plot read the table's files: drop --out-dir")
        return ("pairs" if args.pairs else "plot"), args
    if mode == "table":
        if args.device == "cuda" and not torch.cuda.is_available():
            raise PyroVAEError("--device cuda: no CUDA GPU is available here")
        if args.minutes is None and args.epochs == DEFAULTS["table"]["epochs"]:
            raise PyroVAEError("give --minutes or --epochs")
        return mode, args
    if args.row == "vamp" or args.row in FAMILIES or args.row == "families":
        raise PyroVAEError(f"--row {args.row}: the budget trains the vae, iwae and dreg rows")
    if args.row != "all" and args.rows is None:
        if args.parallel:
            raise PyroVAEError("--parallel trains the rows of --row all or --rows")
        return mode, args
    if args.k is not None:
        raise PyroVAEError("the rows set their own k: drop --k")
    return "rows", args


def plot_curves(table: Path, png: Path) -> None:
    """The probe curves of every row of ``table`` against epochs and training minutes."""
    plt = pyplot()
    rows = json.loads(table.read_text())["rows"]
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for i, row in enumerate(rows):
        budget = (
            f"{row['budget_minutes']:.0f} min"
            if row.get("budget_minutes")
            else f"{row['epochs']} epochs"
        )
        estimator = "VampPrior" if "VampPrior" in row["model"] else row["estimator"]
        threads = f", {row['threads']} threads" if row.get("threads", 1) != 1 else ""
        label = (
            f"{row['protocol']}, {row['model'].split()[0]}, {estimator} "
            f"k={row['k']}, {budget}{threads}"
        )
        values = [point["log_px"] for point in row["curve"]]
        style = dict(marker=".", label=label, linestyle=("-", "--", ":")[i // 10 % 3])
        axes[0].plot([point["epoch"] for point in row["curve"]], values, **style)
        axes[1].plot([point["seconds"] / 60 for point in row["curve"]], values, **style)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("training minutes (1 CPU thread unless labelled)")
    for axis in axes:
        axis.set_ylabel("probe log p̂ (K = 100, nats)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="lower right")
    figure.suptitle("MNIST: probe log p̂ on 1000 held-out images during training")
    figure.tight_layout()
    figure.savefig(png, dpi=110)


def paired_differences(paths: list[Path], names: list[str] | None = None) -> list[dict[str, Any]]:
    """Mean and standard error of log p̂_a(x) − log p̂_b(x) over the same test images, for
    every pair of saved rows (named by their files' stems unless ``names`` are given): the
    error of a difference is far smaller than that of either row, because the images' own
    difficulty cancels."""
    names = [path.stem for path in paths] if names is None else names
    if len(set(names)) != len(names):
        raise PyroVAEError(f"the rows to pair need distinct names, got {names}")
    rows = {name: torch.load(path)["log_px"] for name, path in zip(names, paths)}
    out = []
    names = list(rows)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if rows[a].shape != rows[b].shape:
                raise PyroVAEError(f"{a} and {b} were evaluated on different test images")
            diff = rows[a] - rows[b]
            out.append(
                {
                    "a": a,
                    "b": b,
                    "mean": diff.mean().item(),
                    "stderr": (diff.std() / math.sqrt(diff.numel())).item(),
                }
            )
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        mode, args = parse_args(argv)
    except PyroVAEError as exc:
        print(f"mnist_table: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    harness.set_threads(args.threads)
    if mode == "budget":
        return budget_main(args)
    if mode == "rows":
        return rows_main(args)
    try:
        if mode == "plot":
            plot_curves(args.out, args.plot)
            print(f"wrote {args.plot}")
            return 0
        if mode == "pairs":
            print_pairs(paired_differences(args.pairs))
            return 0
        return train_table(args)
    except (OSError, PyroVAEError) as exc:
        print(f"mnist_table: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def train_table(args: argparse.Namespace) -> int:
    """The table's row, or (``--row all``) every row and their paired differences."""
    if args.row not in ("all", "families"):
        train_and_record(args)
        return 0
    if args.k is not None or args.per_image is not None:
        raise PyroVAEError(
            f"--row {args.row} sets each row's k and names its per-image files: "
            "drop --k and --per-image (see --per-image-dir)"
        )
    folder = args.per_image_dir or args.out.with_name(args.out.stem + "-per-image")
    saved = {}
    rows = FAMILY_TABLE if args.row == "families" else table_rows(args.protocol, args.layers)
    for row, k in rows:
        name = row_name(args.protocol, args.layers, row, k)
        saved[name] = folder / f"{name}.pt"
        train_and_record(
            argparse.Namespace(**{**vars(args), "row": row, "k": k, "per_image": saved[name]})
        )
    pairs = paired_differences(list(saved.values()), names=list(saved))
    table = json.loads(args.out.read_text())
    for pair in pairs:
        pair.update(
            protocol=args.protocol,
            images=table["rows"][-1]["test_images"],
            epochs=args.epochs if args.minutes is None else f"{args.minutes:g}min",
        )
    print_pairs(pairs)
    write_json(args.out, {**table, "pairs": [*table.get("pairs", []), *pairs]})
    return 0


def table_rows(protocol: str, layers: int) -> list[tuple[str, int]]:
    """The rows ``--row all`` trains: the VampPrior row is the one-layer model only."""
    return [(row, k) for row, k in TABLE[protocol] if row != "vamp" or layers == 1]


def row_name(protocol: str, layers: int, row: str, k: int) -> str:
    """A row's short name in the paired differences: ``iwae50``, ``vae_2l``, ``fixed_vamp``."""
    return (
        ("fixed_" if protocol == "fixed" else "")
        + row
        + (f"{FAMILIES[row]['particles']}x" if "particles" in FAMILIES.get(row, {}) else "")
        + (str(k) if k > 1 else "")
        + ("_2l" if layers == 2 else "")
    )


def train_and_record(args: argparse.Namespace) -> dict[str, Any]:
    """Train and score one row, append it to ``args.out`` (written atomically) and print it."""
    row = run_row(args)
    table = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    write_json(args.out, {**table, "rows": [*table["rows"], row]})
    print(
        f"{args.row} k={row['k']}: test log p̂ (K = {row['eval_particles']}, "
        f"{row['test_images']} images) {row['test_log_px']:.2f} ± "
        f"{row['test_log_px_stderr']:.2f}, ELBO {row['test_elbo']:.2f}, {row['epochs']} "
        f"epochs in {row['train_seconds'] / 60:.1f} min; wrote {args.out}",
        flush=True,
    )
    return row


if __name__ == "__main__":
    sys.exit(main())
