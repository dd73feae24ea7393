"""The options of ``pyro-vae train``: what the run is (data, model, estimator, training) and
how it runs (run folder, device, compile, limits); each checked as it is parsed (its types in
:mod:`pyro_vae.app.options`), its defaults those of :class:`~pyro_vae.runs.config.TrainConfig`."""

from __future__ import annotations

import argparse

from pyro_vae.app.options import (
    add_dist_timeout,
    add_max_memory,
    add_max_seconds,
    add_optimizer_options,
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


def add_train(sub: argparse._SubParsersAction) -> None:
    """``pyro-vae train``'s options, their defaults those of :class:`TrainConfig`."""
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
        "guide sites), tvo (the thermodynamic variational objective); guide sites marked "
        "for enumeration are summed out; "
        f"default {defaults.elbo}",
    )
    p.add_argument(
        "--elbo-options",
        type=json_object,
        metavar="JSON",
        help="the estimator's own options as a JSON object: renyi takes alpha (a number, or "
        '"-inf" for the largest weight; default 0.5) and gradient (reparameterized or dreg), '
        'e.g. \'{"alpha": 0, "gradient": "dreg"}\'; ciwae elbo_weight in [0, 1] (default 0.5); '
        "tvo partitions (default 5) and first_point in (0, 1) (default 0.1)",
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
        "piwae, rws and tvo only; "
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
        "--estimate-every",
        type=positive_int,
        metavar="EPOCHS",
        help=f"before the first epoch and every EPOCHS epochs, estimate the held-out log p̂_K "
        f"(K = {defaults.final_particles}, as at the end), its gap, ESS and k-hat, and the rate "
        "and distortion: in history.json, the progress bar and --log's curves (default: at the "
        "end only)",
    )
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
