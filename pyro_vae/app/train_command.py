"""The ``pyro-vae train`` command: a :class:`~pyro_vae.runs.config.TrainConfig` from its flags
(the built-in families, or the user's pair on the user's data), a new run or a resumed one, then
:func:`pyro_vae.fit`."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from pyro_vae.app.flags import given_flags
from pyro_vae.app.options import check_dist_timeout
from pyro_vae.runs.config import TrainConfig
from pyro_vae.train.config import RunOptions
from pyro_vae.util.errors import ConfigError

DEFAULT_RUN_ROOT = Path("runs")
RESUMABLE = {"epochs", "device", "data_dir"}

BUILTIN_MODEL_FLAGS = (
    "model",
    "latent_dim",
    "hidden",
    "likelihood",
    "obs_scale",
    "guide",
    "activation",
    "latent2_dim",
    "hidden2",
    "pseudo_inputs",
)


#: the options of how any pair is trained (TrainConfig's fields, as the parser names them)
TRAINING_OPTIONS = (
    "elbo",
    "elbo_options",
    "particles",
    "importance_samples",
    "beta",
    "warmup",
    "epochs",
    "batch_size",
    "lr",
    "seed",
    "device",
    "patience",
    "min_delta",
    "estimate_every",
    "optimizer",
    "optimizer_options",
    "clip_norm",
    "scheduler",
    "scheduler_options",
)


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The options ``names`` given on the command line (not ``None``), by name."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def _user_train_config(args: argparse.Namespace) -> TrainConfig:
    """The config of a run of the user's pair (``--model-factory``), on ``--data`` or on a
    built-in ``--dataset``."""
    from pyro_vae.data.specs import absolute_spec

    ignored = given_flags(args, BUILTIN_MODEL_FLAGS)
    if ignored:
        raise ConfigError(
            f"{ignored} describe(s) the built-in model, not the pair of "
            "--model-factory: size your pair in its factory"
        )
    given = {**_given(args, TRAINING_OPTIONS), "model_factory": absolute_spec(args.model_factory)}
    if args.data is None:
        builtin = {"dataset": args.dataset, "data_dir": args.data_dir, "binarize": args.binarize}
        return TrainConfig().replace(**given, **{k: v for k, v in builtin.items() if v})
    if args.dataset is not None or args.binarize is not None:
        raise ConfigError(
            f"{given_flags(args, ('dataset', 'binarize'))} appl(ies) to the built-in "
            "images: --data arrives as it is (transform it in its Dataset)"
        )
    return TrainConfig(
        dataset=None,
        model=None,
        binarize="none",
        data=absolute_spec(args.data),
        test_data=absolute_spec(args.test_data) if args.test_data else None,
        **given,
    )


def _train_config(args: argparse.Namespace) -> TrainConfig:
    if args.model_factory is not None:
        return _user_train_config(args)
    if args.data is not None or args.test_data is not None:
        raise ConfigError("--data and --test-data need --model-factory (the pair to train on them)")
    defaults = TrainConfig()
    chosen = {
        "family": args.model,
        "latent_dim": args.latent_dim,
        "hidden": args.hidden,
        "likelihood": args.likelihood,
        "obs_scale": args.obs_scale,
        "guide": args.guide,
        "activation": args.activation,
        "latent2_dim": args.latent2_dim,
        "hidden2": args.hidden2,
        "pseudo_inputs": args.pseudo_inputs,
    }
    family = args.model or defaults.model.family
    for flag, value in (("--latent2-dim", args.latent2_dim), ("--hidden2", args.hidden2)):
        if value is not None and family != "vae2":
            raise ConfigError(f"{flag} sizes the second stochastic layer: it needs --model vae2")
    if args.pseudo_inputs is not None and family != "vampprior":
        raise ConfigError("--pseudo-inputs sizes the VampPrior: it needs --model vampprior")
    model = dataclasses.replace(
        defaults.model, **{k: v for k, v in chosen.items() if v is not None}
    )
    if args.binarize is None and model.likelihood == "gaussian":
        args.binarize = "none"
    given = _given(args, ("dataset", "data_dir", "binarize", *TRAINING_OPTIONS))
    return defaults.replace(model=model, **given)


def _is_rank_0() -> bool:
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _default_out(config: TrainConfig) -> Path:
    if config.dataset is not None:
        return DEFAULT_RUN_ROOT / config.dataset
    return DEFAULT_RUN_ROOT / config.model_factory.rpartition(":")[2]


def cmd_train(args: argparse.Namespace) -> int:
    """Train a new run, or resume one (``--resume``); print its last epoch and estimate."""
    from pyro_vae.runs import (
        check_config_file,
        finished_epoch,
        read_history,
        read_run_config,
        refuse_python_only,
    )
    from pyro_vae.train import fit
    from pyro_vae.train.early_stopping import stopped_epoch
    from pyro_vae.util.distributed import current_context

    check_dist_timeout(args)
    if args.resume is not None:
        fixed = (
            "dataset",
            "data",
            "test_data",
            "model_factory",
            *BUILTIN_MODEL_FLAGS,
            "binarize",
            *(name for name in TRAINING_OPTIONS if name not in RESUMABLE),
            "out",
        )
        changed = given_flags(args, fixed)
        if changed:
            raise ConfigError(
                f"{changed} cannot change on --resume: only --epochs, --device "
                "and --data-dir may be given"
            )
        if args.force:
            raise ConfigError("--force is for a new run's --out, not for --resume")
        config, model_class = read_run_config(args.resume, prefer_checkpoint=True)
        refuse_python_only(args.resume, config, model_class)
        check_config_file(args.resume, config)
        updates = _given(args, tuple(RESUMABLE))
        config = config.replace(**updates)
        run_dir = args.resume
        done = finished_epoch(run_dir)  # its final estimate and plots are written
        stopped = stopped_epoch(read_history(run_dir)) if done is not None else None
        if done is not None and done in (config.epochs, stopped):
            if _is_rank_0():
                how = f"stopped early at epoch {done}" if done == stopped else f"at epoch {done}"
                print(f"{run_dir} is already {how}; nothing to do")
            return 0
    else:
        config = _train_config(args)
        run_dir = args.out or _default_out(config)
        if config.patience is not None and config.patience >= config.epochs:
            raise ConfigError(
                f"--patience {config.patience} can never stop a run of {config.epochs} "
                "epoch(s) early (it stops after that many epochs without an improvement): "
                "give a --patience below --epochs"
            )
    unused = ", ".join(
        flag
        for flag, given in (("--download", args.download), ("--data-dir", args.data_dir))
        if given
    )
    if unused and config.dataset != "mnist":
        raise ConfigError(
            f"{unused} locate(s) the MNIST files; "
            + (
                f"the {config.dataset} images ship with the package"
                if config.dataset
                else "--data is read as it is"
            )
        )
    result = fit(
        config=config,
        options=RunOptions(
            run_dir=run_dir,
            resume=args.resume is not None,
            force=args.force,
            progress=not args.quiet,
            fused=not args.traced,
            compile=args.compile,
            download=args.download,
            dist_timeout=args.dist_timeout,
            log=args.log,
            log_uri=args.log_uri,
        ),
    )
    if not current_context().is_main:
        return 0
    history = result.history
    if history.epoch:
        held_out = (
            f", test ELBO {history.test_elbo[-1]:.3f}"
            if len(history.test_elbo) == len(history.epoch)
            else ""
        )
        print(
            f"epoch {history.epoch[-1]}: train loss {history.train_loss[-1]:.3f}{held_out} "
            "nats per datapoint"
        )
    stopping = history.extra.get("early_stopping")
    if stopping and stopping.get("stopped_epoch"):
        print(
            f"stopped early at epoch {stopping['stopped_epoch']}: no improvement in "
            f"{stopping['patience']} epoch(s) since the best, epoch {stopping['best_epoch']} "
            f"(test ELBO {stopping['best_test_elbo']:.3f}; its weights: best.safetensors)"
        )
    final = history.extra.get("final")
    if final:
        joint = "x, y" if getattr(result.model, "conditional", False) else "x"
        print(
            f"test log p_K({joint}), K = {final['particles']}: {final['test_log_px']:.3f} "
            f"± {final['test_log_px_stderr']:.3f} nats (gap to the ELBO {final['test_gap']:.3f})"
        )
    compiled = result.compiled
    if compiled is not None and compiled.disabled is None:
        print(
            f"compiled steps: {len(compiled.graphs)} graph(s) compiled in "
            f"{compiled.compile_seconds:.1f} s; {compiled.compiled_steps} compiled and "
            f"{compiled.eager_steps} eager steps"
        )
    print(f"run written to {run_dir}")
    return 0
