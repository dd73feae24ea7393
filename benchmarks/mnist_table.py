"""Rows of the MNIST log-likelihood table (Burda et al. 2016, Table 1), trained by the package's
engine (:func:`pyro_vae.fit`) and measured by its evaluator.

One row: the IWAE paper's one-stochastic-layer network (784-200-200-50, tanh, Bernoulli decoder
whose bias starts at the data mean), dynamically binarized MNIST (a fresh Bernoulli draw of
the 60 000 training images every epoch), an estimator (``meanfield`` for the VAE row,
``iwae``/``dreg`` with k importance samples), Adam with the learning rate decaying
exponentially from ``--lr`` to ``--lr-final`` over the wall-clock budget (or over
``--epochs``), batch ``--batch-size``. Two callbacks of the engine do the budget and the curve:
the learning rate and the stop, and a probe of log p̂ (K = ``--probe-particles``) on the first
``--probe-images`` test images every ``--probe-every`` epochs (a curve only: nothing is
selected on it). At the end, log p̂_K with K = ``--eval-particles`` (5000 in the paper) on the
test images (all 10 000 unless ``--eval-limit``), their fixed seeded binarization, with its
standard error and the test ELBO; the row is appended to ``--out`` (JSON, written atomically
after every row) with the command that produced it.

    python benchmarks/mnist_table.py --data-dir DIR --row vae --minutes 40 --threads 1
    python benchmarks/mnist_table.py --data-dir DIR --row iwae --k 50 --epochs 30
    python benchmarks/mnist_table.py --data-dir DIR --row vae --epochs 1 --limit 512 \\
        --eval-particles 10 --eval-limit 100 --out /tmp/smoke.json          # a smoke run

``--row vamp`` trains the one-layer model with the VampPrior (``--pseudo-inputs`` learned
pseudo-inputs, 500 by default; :mod:`pyro_vae.models.vampprior`) with ``meanfield``.
``--layers 2`` trains the paper's two-stochastic-layer model (latents 100 and 50, hidden 200-200
and 100-100); ``--protocol fixed`` the fixed binarized MNIST (``binarized_mnist.npz``, 50 000
training images, probe on the validation images, test on its 10 000) through the user-data
path of :func:`pyro_vae.fit`. ``--per-image`` saves every test image's log p̂ and ELBO, and
``--pairs A.pt B.pt ...`` prints the paired differences between saved rows.
``--row all`` trains the whole table of a protocol and depth at the same budget, one row after
the other (dynamic: VAE, IWAE k=5 and k=50, DReG k=50; fixed: VAE, IWAE k=50 and, one layer,
the VampPrior), saves each row's per-image scores in ``--per-image-dir`` and records the paired
difference of every two rows in ``--out``:

    python benchmarks/mnist_table.py --data-dir DIR --row all --epochs 30 --threads 1

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
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pyro_vae import ModelConfig, PyroVAEError, TrainConfig, fit
from pyro_vae.data.builtin import evaluation_images
from pyro_vae.data.images import load_binarized_mnist, load_mnist
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.models.vae import VAE
from pyro_vae.models.vae2 import VAE2
from pyro_vae.models.vampprior import VampPriorVAE
from pyro_vae.train import Callback
from pyro_vae.util.io import write_json
from pyro_vae.util.rng import forked_rng

ROWS = {"vae": "meanfield", "iwae": "iwae", "dreg": "dreg", "vamp": "meanfield"}
TABLE = {  # --row all: (row, k) in the order trained
    "dynamic": [("vae", 1), ("iwae", 5), ("iwae", 50), ("dreg", 50)],
    "fixed": [("vae", 1), ("iwae", 50), ("vamp", 1)],
}
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
EXIT_USER_ERROR = 2


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
            result = evaluate_dataset(
                loop.model.model,
                loop.model.guide,
                self.images,
                num_particles=self.particles,
                khat=False,
            )
        self.curve.append(
            {
                "epoch": loop.epoch,
                "seconds": time.perf_counter() - self.start,
                "log_px": result.log_px.mean().item(),
            }
        )
        print(f"epoch {loop.epoch}: probe log p̂ {self.curve[-1]['log_px']:.2f}", flush=True)


def run_row(args: argparse.Namespace) -> dict[str, Any]:
    k = 1 if ROWS[args.row] == "meanfield" else (50 if args.k is None else args.k)
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
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_particles=1,
        final_particles=0,
        device="cpu",
    )
    schedule = Schedule(args.lr, args.lr_final, args.minutes, args.epochs)
    start = time.perf_counter()
    if args.protocol == "dynamic":
        test_count = len(load_mnist(args.data_dir).test)
        probe_images = evaluation_images(load_mnist(args.data_dir), "test", config)[
            : args.probe_images
        ]
        probe = Probe(probe_images, args.probe_particles, args.probe_every)
        if args.limit is not None:  # a smoke run: the first training images only
            import pyro_vae.data.builtin as builtin

            load = builtin.prepare_data
            builtin.prepare_data = lambda *a, **kw: _limited(load(*a, **kw), args.limit)
        result = fit(config=config, callbacks=[schedule, probe], progress=not args.quiet)
        images = evaluation_images(load_mnist(args.data_dir), "test", config)
    else:  # the fixed binarization: the package's network as a pair on the user-data path
        data = load_binarized_mnist(args.data_dir, verify=args.limit is None)
        train = data.train if args.limit is None else data.train[: args.limit]
        probe = Probe(data.valid[: args.probe_images], args.probe_particles, args.probe_every)
        model = build_network(network, train)
        result = fit(
            model,
            train,
            config=config.replace(dataset=None, model=None, binarize="none"),
            callbacks=[schedule, probe],
            progress=not args.quiet,
        )
        images, test_count = data.test, len(data.test)
    train_seconds = time.perf_counter() - start
    images = images[: args.eval_limit] if args.eval_limit else images
    start = time.perf_counter()
    with forked_rng():
        torch.manual_seed(args.seed)
        scored = evaluate_dataset(
            result.model.model,
            result.model.guide,
            images,
            num_particles=args.eval_particles,
            batch_size=100,
            particle_chunk=min(args.eval_particles, 500),
            khat=False,
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
        "budget_minutes": args.minutes,
        "epochs": len(history.epoch),
        "steps": len(history.epoch) * steps_per_epoch if args.limit is None else None,
        "batch_size": args.batch_size,
        "lr": [args.lr, args.lr_final],
        "device": "cpu",
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


def build_network(network: ModelConfig, train: torch.Tensor) -> torch.nn.Module:
    """The package's VAE (two-layer VAE, VampPrior VAE) sized for 784 pixels, its decoder
    bias at the logit of the mean training image."""
    common = dict(
        latent_dim=network.latent_dim, hidden=network.hidden, activation=network.activation
    )
    if network.family == "vae2":
        model = VAE2(784, latent2_dim=network.latent2_dim, hidden2=network.hidden2, **common)
    elif network.family == "vampprior":
        model = VampPriorVAE(784, pseudo_inputs=network.pseudo_inputs, **common)
    else:
        model = VAE(784, **common)
    model.initialize_from_data(train)
    return model


def _limited(dataset, limit: int):
    from pyro_vae.data.images import Dataset, Split

    train = Split(dataset.train.images[:limit], dataset.train.labels[:limit])
    return Dataset(dataset.name, train, dataset.test, dataset.image_shape, dataset.num_classes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data-dir",
        help="folder with the MNIST IDX files, or with "
        "binarized_mnist.npz for --protocol fixed ($PYRO_VAE_DATA_DIR)",
    )
    p.add_argument(
        "--row",
        choices=[*sorted(ROWS), "all"],
        default="vae",
        help="the row to train, or all: every row of --protocol and --layers at "
        "the same budget, with their paired differences",
    )
    p.add_argument(
        "--layers",
        type=int,
        choices=(1, 2),
        default=1,
        help="stochastic layers: 1 (784-200-200-50) or 2 (100 and 50 latents)",
    )
    p.add_argument(
        "--protocol",
        choices=("dynamic", "fixed"),
        default="dynamic",
        help="dynamic: a fresh binarization of MNIST's IDX files every epoch, "
        "test on a fixed one; fixed: binarized_mnist.npz (50k/10k/10k), "
        "probe on validation images",
    )
    p.add_argument("--k", type=int, help="importance samples of iwae/dreg (default 50)")
    p.add_argument(
        "--pseudo-inputs",
        type=int,
        default=500,
        help="pseudo-inputs of the VampPrior row (--row vamp)",
    )
    p.add_argument("--minutes", type=float, help="wall-clock training budget")
    p.add_argument(
        "--epochs", type=int, default=100_000, help="epoch cap (the budget usually stops first)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lr-final", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--probe-images", type=int, default=1000)
    p.add_argument("--probe-particles", type=int, default=100)
    p.add_argument("--probe-every", type=int, default=10)
    p.add_argument("--eval-particles", type=int, default=5000)
    p.add_argument("--eval-limit", type=int, help="evaluate the first N test images only")
    p.add_argument("--limit", type=int, help="train on the first N training images only")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist_table.json"))
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
    p.add_argument("--quiet", action="store_true")
    return p


def plot_curves(table: Path, png: Path) -> None:
    """The probe curves of every row of ``table`` against epochs and training minutes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    args = build_parser().parse_args(argv)
    if args.plot:
        plot_curves(args.out, args.plot)
        print(f"wrote {args.plot}")
        return 0
    if args.pairs:
        try:
            for d in paired_differences(args.pairs):
                print(f"{d['a']} − {d['b']}: {d['mean']:+.3f} ± {d['stderr']:.3f} nats")
        except (OSError, PyroVAEError) as exc:
            print(f"mnist_table: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    if args.minutes is None and args.epochs == build_parser().get_default("epochs"):
        print("mnist_table: give --minutes or --epochs", file=sys.stderr)
        return EXIT_USER_ERROR
    torch.set_num_threads(args.threads)
    try:
        if args.row != "all":
            train_and_record(args)
            return 0
        if args.k is not None or args.per_image is not None:
            raise PyroVAEError(
                "--row all trains k = 5 and 50 and names its per-image files: "
                "drop --k and --per-image (see --per-image-dir)"
            )
        folder = args.per_image_dir or args.out.with_name(args.out.stem + "-per-image")
        saved = {}
        for row, k in table_rows(args.protocol, args.layers):
            name = row_name(args.protocol, args.layers, row, k)
            saved[name] = folder / f"{name}.pt"
            train_and_record(
                argparse.Namespace(**{**vars(args), "row": row, "k": k, "per_image": saved[name]})
            )
        pairs = paired_differences(list(saved.values()), names=list(saved))
    except PyroVAEError as exc:
        print(f"mnist_table: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    table = json.loads(args.out.read_text())
    for pair in pairs:
        pair.update(
            protocol=args.protocol,
            images=table["rows"][-1]["test_images"],
            epochs=args.epochs if args.minutes is None else f"{args.minutes:g}min",
        )
        print(f"{pair['a']} − {pair['b']}: {pair['mean']:+.3f} ± {pair['stderr']:.3f} nats")
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
        + (str(k) if row in ("iwae", "dreg") else "")
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
