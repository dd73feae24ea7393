"""``fit``: one engine for any model/guide pair on any data, the built-in families and images
being one more model and data source (:mod:`pyro_vae.train.sources`)."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae.core.pairs import as_pair, is_pair_module
from pyro_vae.core.protocol import data_plate_name
from pyro_vae.data import builtin
from pyro_vae.data.batches import resolve_device
from pyro_vae.infer import LinearWarmup, make_estimator
from pyro_vae.models.vae import forget_params
from pyro_vae.runs import (
    History,
    build_factory_model,
    check_resumable,
    finished_epoch,
    load_checkpoint,
    load_weights,
    open_run_folder,
    read_history,
)
from pyro_vae.runs.config import TrainConfig
from pyro_vae.train.compiled import CompiledStep, CompileReport
from pyro_vae.train.config import FIT_KEYWORDS, RunOptions
from pyro_vae.train.early_stopping import stopped_epoch
from pyro_vae.train.fused import training_loss
from pyro_vae.train.hooks import run_callbacks
from pyro_vae.train.loggers import check_log_options
from pyro_vae.train.loop import Batches, HeldOut, Loop, Step, run_epochs
from pyro_vae.train.parallel import Replicas
from pyro_vae.train.sources import BuiltinData, UserData
from pyro_vae.train.step import BUILTIN_PLATE_NESTING
from pyro_vae.util.distributed import (
    SHARED_ORDER_STREAM,
    barrier,
    current_context,
    derive_seed,
    init_distributed,
    rank_seed,
)
from pyro_vae.util.errors import CheckpointError, ConfigError, TrainingDiverged
from pyro_vae.util.optimizers import make_optimizer, make_scheduler

USER_DATA = dict(dataset=None, model=None, binarize="none")


@dataclass
class TrainResult:
    """What :func:`fit` returns: the trained model, its history and the run folder (if any)."""

    model: torch.nn.Module
    history: History
    run_dir: Path | None
    #: with ``compile=True``: the :class:`~pyro_vae.train.compiled.CompiledStep` (its
    #: ``compile_seconds``, ``graphs``, ``compiled_steps``, ``eager_steps`` and ``disabled``)
    compiled: CompiledStep | None = None


def _settings(
    config: TrainConfig | None, options: RunOptions | None, data: Any, keywords: dict[str, Any]
) -> tuple[TrainConfig, RunOptions]:
    """The config and the run options, with ``keywords`` replacing their fields."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(keywords) - fields - set(FIT_KEYWORDS))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown}: fit takes the fields of TrainConfig "
            f"({', '.join(sorted(fields))}) and {', '.join(FIT_KEYWORDS)}; "
            "the others of RunOptions as options=RunOptions(...)"
        )
    if config is None:
        config = TrainConfig(**USER_DATA) if data is not None else TrainConfig()
    elif data is not None and config.dataset is not None:
        raise ConfigError(
            f"both data and the built-in dataset {config.dataset!r} were given: "
            "use TrainConfig(dataset=None, model=None, binarize='none') with data"
        )
    changes = {k: v for k, v in keywords.items() if k in fields}
    config = config.replace(**changes) if changes else config
    run = {k: v for k, v in keywords.items() if k not in fields}
    options = options if options is not None else RunOptions()
    return config, options.replace(**run) if run else options


def fit(
    model: Any = None,
    data: Any = None,
    *more: Any,
    guide: Any = None,
    test_data: Any = None,
    collate_fn: Any = None,
    config: TrainConfig | None = None,
    options: RunOptions | None = None,
    **keywords: Any,
) -> TrainResult:
    """Train a model/guide pair with SVI on data in any form; return the model and history.

    ``model`` is any :class:`torch.nn.Module` with ``model`` and ``guide`` methods meeting
    :mod:`pyro_vae.core.protocol` (checked on the first batch before training), or a model and its
    guide in any form Pyro takes, ``fit(model, guide, data)`` (or ``guide=``): plain functions
    whose parameters are ``pyro.param`` entries, a ``PyroModule``, an AutoGuide; they are held
    by a :class:`~pyro_vae.core.pairs.PyroPair`, which owns and checkpoints every entry they read
    (``TrainResult.model``). ``data`` is a tensor
    or array, a tuple/list or dict of them, a map-style Dataset (collated by ``collate_fn``) or
    a DataLoader (see :mod:`pyro_vae.data.batches`), each batch becoming the pair's arguments;
    ``test_data`` (same forms) is scored after each epoch (the ELBO with the closed-form-KL
    estimator, ``eval_particles`` particles, β = 1) and at the end (log p̂_K with
    K = ``final_particles``). Floating-point data are cast to the parameters' dtype and moved
    to the device. Without ``data`` the run trains ``config.model`` (or the given pair) on the
    built-in ``config.dataset`` (digits or MNIST images, binarized as ``config.binarize`` says).

    ``config`` (:class:`~pyro_vae.train.TrainConfig`: ``elbo``, ``particles``,
    ``importance_samples``, ``beta``, ``warmup``, ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``device``, ...) determines the run; ``options`` (:class:`~pyro_vae.train.RunOptions`) say
    how it runs. Keywords replace the fields of ``config``, and of ``options`` for
    ``run_dir``, ``resume``, ``force``, ``callbacks``, ``progress``, ``fused``, ``compile``,
    ``log`` and ``log_uri``.

    With ``run_dir`` the config, history, checkpoint and weights are written there after every
    epoch (atomically, as one set); ``resume=True`` continues that run up to ``config.epochs``
    and reaches the same parameters as an uninterrupted run (give the same pair and data
    again). The folder is checked and locked before anything is trained
    (:func:`~pyro_vae.runs.open_run_folder`): it may not be a file, hold another run, be
    locked by another process, or (unless ``force``) hold other files.
    ``callbacks`` (:class:`~pyro_vae.train.Callback`) and ``on_epoch(epoch, history)`` run after
    each epoch's checkpoint. Raises :class:`~pyro_vae.util.errors.TrainingDiverged` if the loss
    becomes NaN or infinite; the last good checkpoint stays on disk.

    The built-in :class:`~pyro_vae.models.vae.VAE` with a diagonal guide and the ``trace`` or
    ``meanfield`` estimator with one particle computes its loss with
    :class:`~pyro_vae.train.fused.FusedLoss` (the same numbers bit for bit, faster); ``fused=False``
    runs every step through Pyro's traces, as any other pair does.

    ``compile=True`` captures each training step (loss, gradients and Adam's update) as a graph
    per batch signature and compiles it (:mod:`pyro_vae.train.compiled`): the same estimator,
    faster where per-operation overhead dominates. A pair that cannot be captured trains
    eagerly, with one line saying why; ``TrainResult.compiled`` reports compile time and steps.

    Under torchrun (``WORLD_SIZE`` > 1; see :doc:`distributed`) every rank calls this function:
    each trains on its share of every epoch with ``batch_size`` datapoints per step and per
    rank, the gradients are averaged over the ranks, and rank 0 alone writes the run folder.
    """
    if more:
        if len(more) > 1 or guide is not None:
            raise ConfigError("fit takes (model, data) or (model, guide, data) positionally")
        guide, data = data, more[0]
    elif (
        guide is None
        and data is not None
        and not is_pair_module(model)
        and callable(data)
        and not isinstance(
            data, (torch.Tensor, torch.utils.data.Dataset, torch.utils.data.DataLoader)
        )
    ):
        guide, data = data, None  # fit(model, guide) on config.data
    model = as_pair(model, guide)
    config, options = _settings(config, options, data, keywords)
    if options.resume and options.run_dir is None:
        raise ConfigError("resume needs a run folder")
    check_log_options(options.log, options.log_uri, options.run_dir)  # before the run folder
    held_out_given = config.dataset is not None or test_data is not None or config.test_data
    if config.patience is not None and not held_out_given:
        raise ConfigError(
            f"patience={config.patience} stops on the held-out ELBO: give test_data "
            "(early stopping needs held-out data)"
        )
    if config.estimate_every is not None and not held_out_given:
        raise ConfigError(
            f"estimate_every={config.estimate_every} estimates log p(x) on held-out data: "
            "give test_data"
        )
    if options.run_dir is None:
        return _train(model, (data, test_data, collate_fn), config, options, None, False)
    with open_run_folder(
        options.run_dir,
        config,
        resume=options.resume,
        force=options.force,
        model=model,
        writer=_writes_run_folder(),
    ) as folder:
        return _train(
            model, (data, test_data, collate_fn), config, options, folder.path, folder.resume
        )


def _writes_run_folder() -> bool:
    """Whether this process writes the run folder: the only process, or rank 0 of torchrun's
    group (read from the environment, as the group is joined after the folder is prepared)."""
    context = current_context()
    if context.enabled:
        return context.is_main
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) <= 1 or int(os.environ.get("RANK") or 0) == 0
    except ValueError:
        return True  # init_distributed reports the bad variable


def _train(
    model: torch.nn.Module | None,
    user_data: tuple,
    config: TrainConfig,
    options: RunOptions,
    run_dir: Path | None,
    resume: bool,
) -> TrainResult:
    """:func:`fit`'s training, into the run folder :func:`~pyro_vae.runs.open_run_folder`
    prepared (``resume``: continue from its checkpoint), or into none: the data source and its
    default model, the loop, then its epochs."""
    device = resolve_device(config.device)
    dist = init_distributed(device, options.dist_timeout)
    replicas = Replicas(dist)
    given = model is not None or config.model_factory is not None
    feed = (
        BuiltinData(config, device, dist, options.download)
        if config.dataset is not None
        else UserData(config, device, *user_data)
    )

    pyro.set_rng_seed(config.seed)
    if model is None and config.model_factory is not None:
        # its initial weights follow the seed; training then draws what it would draw for a
        # pair built by the caller after pyro.set_rng_seed(seed)
        model = build_factory_model(config.model_factory)
        pyro.set_rng_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(rank_seed(config.seed, dist.rank))
    order_generator = generator if not dist.enabled else torch.Generator(device=device)
    if dist.enabled:
        order_generator.manual_seed(derive_seed(config.seed, SHARED_ORDER_STREAM))
    model = (model if model is not None else feed.default_model()).to(device)
    source, held_out, vectorizable = feed.sources(model, given)
    if dist.enabled:
        replicas.check_same_data(source, held_out)
        replicas.start(model)
        if dist.rank:
            pyro.set_rng_seed(rank_seed(config.seed, dist.rank))
    # a compiled step performs Adam's single-tensor update; eager steps must do the same
    optimizer = make_optimizer(
        model.parameters(),
        config.lr,
        config.optimizer,
        {
            **config.optimizer_options,
            **({"fused": False} if options.compile and config.optimizer == "adam" else {}),
        },
    )
    scheduler = (
        None
        if config.scheduler is None
        else make_scheduler(optimizer, config.scheduler, config.scheduler_options)
    )
    history = History()
    last = config.epochs  # the epoch training ends at (earlier, for a run that stopped early)

    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        check_resumable(state, config, run_dir, given)
        saved_class = state.get("model_class")
        load_weights(model, state["model"], run_dir, saved_class)
        load_weights(optimizer, state["optimizer"], run_dir, saved_class)
        if scheduler is not None:
            if "scheduler" not in state:
                raise CheckpointError(f"{run_dir}'s checkpoint holds no scheduler state")
            scheduler.load_state_dict(state["scheduler"])
        replicas.restore_rng_states(state, generator, order_generator, run_dir)
        history = History.from_dict(state["history"])
        if config.epochs < len(history.epoch):
            raise ConfigError(
                f"{run_dir} has already trained {len(history.epoch)} epochs: "
                f"epochs={config.epochs} would go back (give at least "
                f"{len(history.epoch)})"
            )
        last = stopped_epoch(history.extra) or config.epochs
        if len(history.epoch) == last and finished_epoch(run_dir) == last:
            # its final estimate and plots exist: the history with them, nothing trained
            return TrainResult(model, History.from_dict(read_history(run_dir)), run_dir)

    nesting = BUILTIN_PLATE_NESTING if builtin.is_builtin(model) else None
    plate = data_plate_name(model)
    estimator = make_estimator(
        config.elbo,
        config.particles,
        config.importance_samples,
        config.beta,
        max_plate_nesting=nesting,
        data_plate=plate,
        options=config.elbo_options,
    )
    step = Step(
        model,
        optimizer,
        training_loss(model, estimator, options.fused),
        estimator,
        LinearWarmup(config.warmup, config.warmup_start, config.beta),
        clip_norm=config.clip_norm,
        scheduler=scheduler,
    )
    scored = (
        None
        if held_out is None
        else HeldOut(
            held_out,
            make_estimator(
                "meanfield",
                config.eval_particles if vectorizable else 1,
                max_plate_nesting=nesting,
                data_plate=plate,
            ),
            1 if vectorizable else config.eval_particles,
            per_datapoint=config.patience is not None,
        )
    )
    loop = Loop(
        step,
        Batches(source, config.batch_size, generator, order_generator),
        scored,
        replicas,
        history,
        epoch=len(history.epoch),
    )
    if options.compile:
        step.compiled = _compiled_step(loop, dist)
    if hasattr(model, "name"):
        forget_params(model.name)

    callbacks = run_callbacks(loop, feed, config, options, run_dir, dist)
    if step.compiled is not None and dist.is_main:
        callbacks.insert(0, CompileReport(step.compiled, _note))
    try:
        run_epochs(loop, last, callbacks)
    except TrainingDiverged as exc:
        kept = (
            f"; the last good checkpoint (epoch {len(history.epoch)}) is kept in {run_dir}"
            if run_dir is not None and history.epoch
            else ""
        )
        raise TrainingDiverged(f"{exc}{kept}. {_divergence_hint(config)}") from None
    barrier(dist, "waiting for rank 0 to write the run folder")
    return TrainResult(model, history, run_dir, step.compiled)


def _compiled_step(loop: Loop, dist: Any) -> CompiledStep:
    """The loop's compiled step; under torchrun, steps stay eager (the gradients must be
    averaged between the backward pass and the update)."""

    def eager(args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        return loop.replicas.step(lambda: loop.step.loss(*args, **kwargs), num_data, loop.optimizer)

    def log(message: str) -> None:
        if dist.is_main:
            _note(message)

    step = CompiledStep(
        loop.model, loop.step.estimator, loop.optimizer, loop.step.loss, eager, log=log
    )
    if dist.enabled and not step.disabled:
        step.disabled = "under torchrun the gradients are averaged between backward and update"
        log(f"compiled steps off: {step.disabled}; training eagerly")
    elif loop.step.clip_norm is not None and not step.disabled:
        step.disabled = "the gradients are clipped by their norm between backward and update"
        log(f"compiled steps off: {step.disabled}; training eagerly")
    return step


def _note(message: str) -> None:
    print(f"pyro-vae: {message}", file=sys.stderr, flush=True)


#: A fixed Gaussian scale below this makes log p(x|z) ~ −(x − μ)²/(2σ²) overflow or dominate.
SMALL_OBS_SCALE = 1e-3


def _divergence_hint(config: TrainConfig) -> str:
    """What to change after a divergence: a tiny fixed Gaussian scale first, else the step size."""
    spec = config.model
    if (
        spec is not None
        and spec.likelihood == "gaussian"
        and spec.obs_scale is not None
        and spec.obs_scale < SMALL_OBS_SCALE
    ):
        return (
            f"The Gaussian likelihood's fixed scale obs_scale={spec.obs_scale:g} is tiny: "
            "log p(x|z) grows like 1/σ² and overflows; try a larger one, or leave it out "
            "to learn it"
        )
    return f"Try a smaller learning rate than lr={config.lr:g}"
