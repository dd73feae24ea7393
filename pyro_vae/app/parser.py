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
    add_optimizer_options,
    add_output,
    add_rate_distortion_options,
    json_object,
    layer_sizes,
    parse_seed,
    path_arg,
    positive_int,
)
from pyro_vae.models.config import (
    ACTIVATION_NAMES,
    BINARIZATIONS,
    DATASETS,
    DEVICES,
    GUIDES,
    LIKELIHOODS,
    MODEL_FAMILIES,
)
from pyro_vae.runs.config import ELBOS, TrainConfig
from pyro_vae.train.loggers import LOGGERS


def _add_train(sub: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a VAE with SVI",
        description="Train a VAE with SVI and write a run folder "
        "(config, history, checkpoint, weights, plots).",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"a built-in dataset (default {defaults.dataset} unless --data is given)",
    )
    p.add_argument(
        "--data",
        metavar="DATA",
        help="train on your own data: a .npz or .pt file of arrays (named after the "
        "model's arguments, or unnamed for positional ones) or FILE.py:FUNCTION "
        "returning a tensor, tuple, dict, Dataset or DataLoader, or a "
        "(train, test) pair of Datasets/DataLoaders; needs --model-factory",
    )
    p.add_argument(
        "--test-data",
        metavar="DATA",
        help="held-out data in the same forms, scored after every epoch and at the end",
    )
    p.add_argument(
        "--model-factory",
        metavar="FILE.py:FUNCTION",
        help="train your own model/guide pair: FUNCTION() returns the torch.nn.Module "
        "(also MODULE:FUNCTION); recorded in the run folder",
    )
    p.add_argument(
        "--data-dir", help="folder with the MNIST IDX files (default: $PYRO_VAE_DATA_DIR)"
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="download missing MNIST files into --data-dir (checksums verified)",
    )
    p.add_argument(
        "--model",
        choices=MODEL_FAMILIES,
        help="vae, cvae (conditioned on the label), vae2 (two stochastic layers) or "
        "vampprior (the prior a mixture of the guide at learned pseudo-inputs); "
        f"default {defaults.model.family}",
    )
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        help="bernoulli (binarized pixels) or gaussian (intensities); default "
        f"{defaults.model.likelihood}",
    )
    p.add_argument(
        "--obs-scale",
        type=float,
        metavar="SIGMA",
        help="fixed standard deviation of the Gaussian likelihood "
        "(default: learned, shared by all pixels)",
    )
    p.add_argument(
        "--guide",
        choices=GUIDES,
        help=f"diagonal or full covariance; default {defaults.model.guide}",
    )
    p.add_argument(
        "--activation", choices=ACTIVATION_NAMES, help=f"default {defaults.model.activation}"
    )
    p.add_argument(
        "--latent2-dim",
        type=positive_int,
        help=f"vae2: size of the top latent z2 (default {defaults.model.latent2_dim})",
    )
    p.add_argument(
        "--hidden2",
        type=layer_sizes,
        help="vae2: hidden sizes between z1 and z2 (default "
        f"{','.join(map(str, defaults.model.hidden2))})",
    )
    p.add_argument(
        "--pseudo-inputs",
        type=positive_int,
        metavar="M",
        help=f"vampprior: number of learned pseudo-inputs (default {defaults.model.pseudo_inputs})",
    )
    p.add_argument(
        "--binarize",
        choices=BINARIZATIONS,
        help=f"default {defaults.binarize} (none for a Gaussian likelihood)",
    )
    p.add_argument(
        "--elbo",
        choices=ELBOS,
        help="estimator: trace (Monte Carlo KL), meanfield (closed-form KL), iwae, "
        "stl (sticking the landing), dreg (doubly reparameterized IWAE), "
        "vimco (IWAE with leave-one-out baselines for discrete guide sites "
        "that are sampled), renyi (the Renyi bound of order alpha), ciwae (ELBO and IWAE "
        "combined), miwae (IWAE of K averaged over P), piwae (IWAE of all P*K draws "
        "for the model, miwae for the guide), rws (reweighted wake-sleep; sampled discrete "
        "guide sites); guide sites marked for enumeration are summed out; "
        f"default {defaults.elbo}",
    )
    p.add_argument(
        "--elbo-options",
        type=json_object,
        metavar="JSON",
        help="the estimator's own options as a JSON object: renyi takes alpha (a number, or "
        '"-inf" for the largest weight; default 0.5) and gradient (reparameterized or dreg), '
        'e.g. \'{"alpha": 0, "gradient": "dreg"}\'; ciwae elbo_weight in [0, 1] (default 0.5)',
    )
    p.add_argument(
        "--particles",
        type=positive_int,
        help="draws averaged per datapoint outside the log: lower variance "
        f"(default {defaults.particles})",
    )
    p.add_argument(
        "--importance-samples",
        type=positive_int,
        help="draws inside the log, a tighter bound (iwae, dreg, vimco, renyi, ciwae, miwae, "
        "piwae and rws only; "
        f"default {defaults.importance_samples})",
    )
    p.add_argument(
        "--beta", type=float, help=f"weight of the KL (rate) term (default {defaults.beta})"
    )
    p.add_argument(
        "--warmup",
        type=int,
        metavar="STEPS",
        help=f"KL warm-up: beta rises linearly from {defaults.warmup_start} over STEPS "
        "optimizer steps (default 0: none)",
    )
    p.add_argument("--latent-dim", type=positive_int, help=f"default {defaults.model.latent_dim}")
    p.add_argument(
        "--hidden",
        type=layer_sizes,
        help="hidden layer sizes, comma-separated (default "
        f"{','.join(map(str, defaults.model.hidden))})",
    )
    p.add_argument("--epochs", type=positive_int, help=f"default {defaults.epochs}")
    p.add_argument(
        "--patience",
        type=positive_int,
        metavar="EPOCHS",
        help="stop early after EPOCHS epochs without an improvement of the held-out ELBO "
        "(default: every epoch runs); the best epoch's weights are kept in best.safetensors",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        metavar="NATS",
        help="with --patience: the improvement, in nats per datapoint, that counts (default: "
        "one paired standard error of the held-out ELBO's change)",
    )
    p.add_argument(
        "--log",
        choices=LOGGERS,
        help="write the run's curves for a dashboard: tensorboard (event files in "
        "RUN_DIR/tensorboard), mlflow (an MLflow run), wandb (a W&B run, offline in "
        "RUN_DIR/wandb unless $WANDB_MODE says otherwise); each needs its package",
    )
    p.add_argument(
        "--log-uri",
        metavar="URI",
        help="with --log mlflow: the tracking store (default: the resumed run's, else "
        "$MLFLOW_TRACKING_URI, else the file store mlruns beside the run folder)",
    )
    p.add_argument("--batch-size", type=positive_int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"learning rate (default {defaults.lr})")
    add_optimizer_options(p, defaults.optimizer)
    p.add_argument("--seed", type=parse_seed, help=f"default {defaults.seed}")
    p.add_argument("--device", choices=DEVICES, help=f"default {defaults.device}")
    p.add_argument(
        "--out",
        type=path_arg,
        help="run folder (default runs/<dataset>); it may not hold another run",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write the run into an --out folder that holds other files (never over another run)",
    )
    p.add_argument(
        "--resume",
        type=path_arg,
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR (only --epochs, --device and --data-dir may change)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--traced",
        action="store_true",
        help="run every step through Pyro's traces, not the fused loss of the "
        "built-in VAE (the same numbers, slower: for checking; not saved)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="capture each training step (loss, gradients, Adam) as a graph per "
        "batch shape and compile it: faster steps after a compile of seconds; "
        "a pair that cannot be captured trains eagerly (not saved; may be "
        "given with --resume)",
    )
    add_max_memory(p)
    add_max_seconds(p, default=None)
    add_dist_timeout(p)


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
    _add_train(sub)
    _add_sample(sub)
    _add_evaluate(sub)
    _add_cvae_commands(sub)
    _add_bdmc(sub)
    return parser
