"""The command line's arguments: ``pyro-vae train | sample | evaluate | classify | transfer |
bdmc``, each option checked as it is parsed (its types in :mod:`pyro_vae.app.options`), its
defaults those of the library's configs."""

from __future__ import annotations

import argparse

from pyro_vae.app.options import (
    DEVICE_HELP,
    OneLineParser,
    add_dist_timeout,
    add_max_memory,
    add_max_seconds,
    add_output,
    add_rate_distortion_options,
    parse_seed,
    path_arg,
    positive_int,
)
from pyro_vae.app.train_parser import add_train
from pyro_vae.models.config import (
    DEVICES,
)


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="write a grid of new images from a saved run",
        description="Decode draws from the prior of a saved run's model into a "
        "grid of images, written as a PNG file (CVAE runs: one row "
        "per label, or the labels given by --label).",
    )
    p.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    p.add_argument(
        "--num",
        type=positive_int,
        default=64,
        help="number of images (default 64); CVAE runs: split evenly over the labels, "
        "at least one each",
    )
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the draws (default 0)")
    p.add_argument(
        "--binary",
        action="store_true",
        help="draw x ~ p(x | z) (Bernoulli pixels, or Gaussian noise for a Gaussian "
        "run) instead of showing the decoder mean",
    )
    p.add_argument(
        "--label",
        type=int,
        action="append",
        help="CVAE runs: generate this label (repeatable; default one row per label)",
    )
    add_output(p, "RUN_DIR/samples-<seed>.png")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    add_max_memory(p)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from pyro_vae.evaluate import MIN_KHAT_PARTICLES
    from pyro_vae.runs import EvalConfig

    defaults = EvalConfig()
    p = sub.add_parser(
        "evaluate",
        help="per-datapoint log p_K(x), ELBO, gap, ESS and k-hat",
        description="Importance-weighted evaluation of a saved run: writes "
        "eval-<split>.json, eval-<split>.nc, gap-<split>.png and, "
        f"with K >= {MIN_KHAT_PARTICLES}, khat-<split>.png into the "
        "run folder (with --data, data-<file stem> in place of "
        "<split>).",
    )
    _add_scored_split(
        p, defaults, "datapoint", "evaluate only the first N datapoints", particles=None
    )
    p.set_defaults(split=None)  # the default split, unless --data is given
    p.add_argument(
        "--data",
        metavar="DATA",
        help="evaluate on these data instead of the run's split (the forms of train --data)",
    )
    p.add_argument(
        "--particle-chunk",
        type=positive_int,
        help=f"particles per call; bounds memory (default {defaults.particle_chunk})",
    )
    _add_seeded_calls(p, defaults, "datapoints per call")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--ais",
        action="store_true",
        help="annealed importance sampling instead: HMC chains from the guide to the "
        "posterior, a lower bound on log p(x) that does not depend on the "
        "guide's quality; writes ais-<split>.json",
    )
    p.add_argument("--ais-steps", type=positive_int, help="annealing steps of --ais (default 500)")
    p.add_argument(
        "--ais-start",
        choices=("guide", "prior"),
        help="density the --ais chains start from: the guide q(z|x) (default) or "
        "the prior p(z), which needs more steps",
    )
    p.add_argument("--chains", type=positive_int, help="AIS chains per datapoint (default 16)")
    add_rate_distortion_options(p)
    add_max_memory(p)
    add_max_seconds(p)
    add_dist_timeout(p)


def _add_scored_split(
    p: argparse.ArgumentParser, defaults: object, per: str, limit_help: str, particles: int | None
) -> None:
    """RUN_DIR, the importance samples K (``particles``: the default, ``None`` for the
    config's), the split and a limit: what evaluate and classify score."""
    p.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    shown = defaults.particles if particles is None else particles
    p.add_argument(
        "--particles",
        type=positive_int,
        default=particles,
        help=f"importance samples K per {per} (default {shown})",
    )
    p.add_argument(
        "--split",
        choices=("train", "test"),
        default=defaults.split,
        help=f"which split of the run's dataset (default {defaults.split})",
    )
    p.add_argument("--limit", type=positive_int, help=limit_help)


def _add_seeded_calls(p: argparse.ArgumentParser, defaults: object, batch_help: str) -> None:
    """The batch size, seed, MNIST folder and device of a scoring command."""
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=defaults.batch_size,
        help=f"{batch_help} (default {defaults.batch_size})",
    )
    p.add_argument(
        "--seed",
        type=parse_seed,
        default=defaults.seed,
        help=f"seed of the importance samples (default {defaults.seed})",
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files, if it moved")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def _add_cvae_commands(sub: argparse._SubParsersAction) -> None:
    from pyro_vae.runs import EvalConfig

    defaults = EvalConfig()
    p = sub.add_parser(
        "classify",
        help="generative classification with a CVAE run",
        description="Classify by argmax_y log p_K(x | y) + log p(y); writes "
        "classify-<split>.json (with p(y | x) per image) and "
        "confusion-<split>.png into the run folder.",
    )
    _add_scored_split(
        p, defaults, "image and label", "classify only the first N images", particles=100
    )
    add_max_memory(p)
    add_max_seconds(p)
    _add_seeded_calls(p, defaults, "image-label pairs per call")

    p = sub.add_parser(
        "transfer",
        help="style transfer with a CVAE run",
        description="Encode test images with their true label and decode the "
        "same z with every label: a grid, one row per image.",
    )
    p.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    p.add_argument("--num", type=positive_int, default=8, help="source images (default 8)")
    add_output(p, "RUN_DIR/transfer.png")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files, if it moved")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)


def _add_bdmc(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bdmc",
        help="bidirectional Monte Carlo: AIS bounds below and above "
        "log p(x) on data simulated from a run's model",
        description="Simulate datapoints from a run's model (their latents are "
        "exact posterior draws), then run forward AIS (a lower bound "
        "on log p(x)) and reverse AIS (an upper bound); writes "
        "bdmc.json into the run folder.",
    )
    p.add_argument("run_dir", type=path_arg, metavar="RUN_DIR")
    p.add_argument(
        "--num", type=positive_int, default=100, help="simulated datapoints (default 100)"
    )
    p.add_argument(
        "--ais-steps",
        type=positive_int,
        default=500,
        help="annealing steps each way (default 500)",
    )
    p.add_argument(
        "--chains", type=positive_int, default=16, help="chains per datapoint (default 16)"
    )
    p.add_argument("--seed", type=parse_seed, default=0, help="seed (default 0)")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files, if it moved")
    p.add_argument("--device", choices=DEVICES, default="auto", help=DEVICE_HELP)
    add_max_memory(p)
    add_max_seconds(p)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="pyro-vae",
        description="Train variational autoencoders and your own Pyro model/guide pairs, then "
        "sample from, evaluate and classify with the run folders they write. "
        "'pyro-vae COMMAND --help' lists a command's options with their defaults.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train(sub)
    _add_sample(sub)
    _add_evaluate(sub)
    _add_cvae_commands(sub)
    _add_bdmc(sub)
    return parser
