"""Trace the rate–distortion plane with β: one VAE per β, each scored for its rate and
distortion (Alemi et al. 2018, *Fixing a broken ELBO*).

For each β of ``--beta`` (comma-separated, > 0) the built-in VAE is trained on the built-in
images (``--dataset digits``, the default, or ``mnist`` with ``--data-dir``, the folder of the
MNIST IDX files) by :func:`pyro_vae.fit` on the loss D + β R (the ``meanfield`` estimator:
the rate in closed form), every run with the same ``--seed``, so the same initial weights and
the same data order, for ``--epochs`` epochs, into the run folder ``--out``/beta-<β>. Each run
is then evaluated by :func:`pyro_vae.runs.evaluate_run` on the first ``--limit`` test images
(the run's fixed binarization) with ``--particles`` K for log p̂_K and its rate–distortion
diagnostics (``--rd-particles`` draws per image, no surgery): the mean rate
R = KL(q(z|x) ‖ p(z)) and distortion D = −E_q log p(x|z), with their standard errors, and the
active units; beside them the evaluator's ELBO (the mean log-weight of the K particles, other
draws than those of R and D) and its paired difference from −(R + D) over the same images,
whose standard error is the Monte Carlo error of the check R + D = −ELBO.

Outputs in ``--out`` (written atomically): ``results.json`` (the command, and per β the rate,
distortion, ELBO = −(R + D), the evaluator's ELBO and the difference, log p̂_K and active
units), ``rd_plane.png`` (each β a point at (D, R) with its standard errors, and through each
point the line R + D = −ELBO on which every model with the same ELBO lies: β < 1 buys lower
distortion with a higher rate, β > 1 the reverse), beside the run folders.

    python benchmarks/beta_sweep.py --beta 0.1,0.3,1,3 --epochs 30 --out sweep
    python benchmarks/beta_sweep.py --beta 0.5,2 --epochs 2 --limit 100 --out /tmp/quick
    python benchmarks/beta_sweep.py --data-dir ~/mnist --epochs 10 --limit 1000 --out mnist

Bad options give one error line and exit status 2 before anything is written, as does a run
folder of the sweep that exists already.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pyro_vae.app.options import EXIT_USER_ERROR, OneLineParser, layer_sizes
from pyro_vae.models.config import DATASETS
from pyro_vae.util.errors import PyroVAEError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import at_least, set_threads, write_json

positive_int = at_least(1)


def _beta(part: str) -> float:
    try:
        value = float(part)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"every beta must be a number > 0, got {part!r}")
    return value


def betas(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated β values, each a number > 0, no two the same."""
    values = tuple(_beta(part) for part in text.split(","))
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a beta is given twice in {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="beta_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--beta", type=betas, default=(0.1, 0.3, 1.0, 3.0), help="(0.1,0.3,1,3)")
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="built-in images: mnist if --data-dir is given, else digits",
    )
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--epochs", type=positive_int, default=30, help="epochs per run (30)")
    p.add_argument("--latent-dim", type=positive_int, default=8, help="latent dimensions (8)")
    p.add_argument("--hidden", type=layer_sizes, default=(64,), help="hidden layers (64)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch (64)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's learning rate (3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of every run (0)")
    p.add_argument("--limit", type=positive_int, default=300, help="test images scored (300)")
    p.add_argument("--particles", type=positive_int, default=100, help="K of log p_K (100)")
    p.add_argument("--rd-particles", type=positive_int, default=20, help="draws per image (20)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (1)")
    p.add_argument("--out", type=Path, required=True, help="folder of the runs and results")
    return p


def run_folder(out: Path, beta: float) -> Path:
    return out / f"beta-{beta:g}"


def dataset_of(args: argparse.Namespace) -> str:
    return args.dataset or ("mnist" if args.data_dir else "digits")


def elbo_check(result: Any) -> dict[str, Any]:
    """The evaluator's ELBO and its paired difference from −(R + D) on the same datapoints."""
    from pyro_vae.evaluate.surgery import mean_and_stderr

    difference = result.elbo - result.rate_distortion.elbo
    return {
        "elbo_evaluator": mean_and_stderr(result.elbo),
        "elbo_difference": mean_and_stderr(difference),
    }


def sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train and score one run per β; the rows of ``results.json``."""
    from pyro_vae import TrainConfig, fit
    from pyro_vae.evaluate.rate_distortion import RateDistortionOptions
    from pyro_vae.models.config import ModelConfig
    from pyro_vae.runs import evaluate_run

    options = RateDistortionOptions(num_particles=args.rd_particles, surgery_points=None)
    rows = []
    for beta in args.beta:
        folder = run_folder(args.out, beta)
        shared = {name: getattr(args, name) for name in ("epochs", "batch_size", "lr", "seed")}
        network = ModelConfig(latent_dim=args.latent_dim, hidden=args.hidden)
        config = TrainConfig(
            dataset=dataset_of(args),
            data_dir=args.data_dir,
            model=network,
            beta=beta,
            final_particles=0,
            device="cpu",
            **shared,
        )
        fit(config=config, run_dir=folder, progress=False)
        result = evaluate_run(
            folder,
            particles=args.particles,
            limit=args.limit,
            seed=args.seed,
            device="cpu",
            data_dir=args.data_dir,
            rate_distortion=options,
        )
        summary = result.rate_distortion.summary()
        rows.append(
            {
                "beta": beta,
                "run_dir": str(folder),
                "rate": summary["rate"],
                "distortion": summary["distortion"],
                "elbo": summary["elbo"],
                **elbo_check(result),
                "log_px": result.summary()["log_px"],
                "active_units": summary["sites"]["z"]["active_units"],
            }
        )
        check = rows[-1]["elbo_difference"]
        print(
            f"beta {beta:g}: R {summary['rate']['mean']:.3f}, D "
            f"{summary['distortion']['mean']:.3f}, ELBO {summary['elbo']['mean']:.3f} nats "
            f"(evaluator's {rows[-1]['elbo_evaluator']['mean']:.3f}, difference "
            f"{check['mean']:.3f} ± {check['stderr']:.3f}), "
            f"{rows[-1]['active_units']} active units",
            file=sys.stderr,
        )
    return rows


def plot_plane(rows: list[dict[str, Any]], path: Path) -> None:
    """The runs at (D, R) with their standard errors and the lines R + D = −ELBO."""
    from matplotlib.figure import Figure

    from pyro_vae.util.io import atomic_path

    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.add_subplot()
    distortion = [row["distortion"]["mean"] for row in rows]
    rate = [row["rate"]["mean"] for row in rows]

    def reach(name: str, sign: int) -> float:  # the furthest error bar on one side
        bars = [row[name]["mean"] + sign * (row[name]["stderr"] or 0.0) for row in rows]
        return max(bars) if sign > 0 else min(bars)

    low, high = reach("distortion", -1), reach("distortion", 1)
    bottom, top = reach("rate", -1), reach("rate", 1)
    span = max(high - low, top - bottom, 1.0)
    xs = [low - 0.1 * span, high + 0.1 * span]
    for row, d, r in zip(rows, distortion, rate):
        total = d + r
        ax.plot(xs, [total - x for x in xs], color="0.75", linestyle="--", linewidth=0.8)
        ax.errorbar(
            d, r, xerr=row["distortion"]["stderr"], yerr=row["rate"]["stderr"], fmt="o", capsize=2
        )
        ax.annotate(f"β = {row['beta']:g}", (d, r), textcoords="offset points", xytext=(5, 5))
    ax.set(
        xlabel="distortion D = −E_q log p(x|z) (nats)",
        ylabel="rate R = KL(q(z|x) ‖ p(z)) (nats)",
        title="rate–distortion plane (dashed: R + D = −ELBO)",
        xlim=xs,
        ylim=(max(0.0, bottom - 0.1 * span), top + 0.1 * span),
    )
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; bad options give one error line and exit status 2, before anything is
    written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if dataset_of(args) == "mnist" and args.data_dir is None:
        parser.error("--dataset mnist needs --data-dir DIR, the folder of the MNIST IDX files")
    if dataset_of(args) == "digits" and args.data_dir is not None:
        parser.error("--data-dir is MNIST's folder: the digits are built in")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    taken = [str(run_folder(args.out, beta)) for beta in args.beta]
    taken = [folder for folder in taken if Path(folder).exists()]
    if taken:
        parser.error(f"run folders of this sweep exist already: {', '.join(taken)}")
    set_threads(args.threads)
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        rows = sweep(args)
    except PyroVAEError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    command = shlex.join(["python", "benchmarks/beta_sweep.py", *argv])
    write_json(args.out / "results.json", {"command": command, "runs": rows})
    plot_plane(rows, args.out / "rd_plane.png")
    print(f"results in {args.out}: results.json, rd_plane.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
