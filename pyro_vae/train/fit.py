"""``fit``: one engine for any model/guide pair on any data, and for the built-in runs."""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch

from pyro_vae.core.pairs import PyroPair, as_pair, is_pair_module
from pyro_vae.core.protocol import (
    check_data,
    check_finite_data,
    check_model,
    data_plate_name,
    pair_activation_bytes,
)
from pyro_vae.core.traces import guess_max_plate_nesting
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.data import builtin
from pyro_vae.data.batches import Source, as_source, resolve_device
from pyro_vae.data.specs import load_data
from pyro_vae.evaluate.weights import eval_mode
from pyro_vae.infer import LinearWarmup
from pyro_vae.models.config import TrainConfig
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
from pyro_vae.train.callbacks import (
    Checkpoint,
    EpochFunction,
    FinalEstimate,
    ProgressBar,
    RunFolderPlots,
)
from pyro_vae.train.compiled import CompiledStep
from pyro_vae.train.fused import training_loss
from pyro_vae.train.loop import Callback, Loop, run_epochs
from pyro_vae.train.parallel import Replicas
from pyro_vae.train.step import BUILTIN_PLATE_NESTING, make_elbo, make_optimizer
from pyro_vae.util import memory
from pyro_vae.util.distributed import (
    SHARED_ORDER_STREAM,
    barrier,
    current_context,
    derive_seed,
    init_distributed,
    main_first,
    rank_seed,
)
from pyro_vae.util.errors import ConfigError, PyroVAEError, TrainingDiverged

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


def _config(config: TrainConfig | None, data: Any, options: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}: fit takes the fields of TrainConfig "
                          f"({', '.join(sorted(known))})")
    if config is None:
        config = TrainConfig(**USER_DATA) if data is not None else TrainConfig()
    elif data is not None and config.dataset is not None:
        raise ConfigError(f"both data and the built-in dataset {config.dataset!r} were given: "
                          "use TrainConfig(dataset=None, model=None, binarize='none') with data")
    return config.replace(**options) if options else config


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()),
                torch.get_default_dtype())


def _user_sources(model: torch.nn.Module, data: Any, test_data: Any, config: TrainConfig,
                  collate_fn: Callable | None, device: torch.device
                  ) -> tuple[Source, Source | None]:
    if data is None:
        if config.data is None:
            raise ConfigError("no data to train on: give data (or a config with a dataset)")
        data, paired = load_data(config.data)
        test_data = load_data(config.test_data)[0] if config.test_data else paired
    dtype = _param_dtype(model)
    train = as_source(data, collate_fn).to(device, dtype)
    test = None if test_data is None else as_source(test_data, collate_fn).to(device, dtype)
    return train, test


def _check_pair(model: torch.nn.Module, source: Source, config: TrainConfig,
                device: torch.device) -> bool:
    """Run the pair once on the first batch as training will see it (a guide may have one
    parameter per datapoint of a batch), in a forked state: its data (unless the source
    transforms each epoch's batches) against its likelihood,
    its memory per particle measured and extrapolated to the particles of a step; return
    whether its networks take a particle dimension (:mod:`pyro_vae.core.vectorization`)."""
    first = next(iter(source.ordered(config.batch_size)))
    check_finite_data(*first.args, **first.kwargs)
    if isinstance(model, PyroPair):
        model.discover(*first.args, **first.kwargs)
    check_model(model, *first.args, **first.kwargs)
    if getattr(source, "transform", None) is None:  # a transform (binarization) acts per epoch
        check_data(model, *first.args, **first.kwargs)
    per_particle = pair_activation_bytes(model, *first.args, **first.kwargs)
    draws = config.particles * config.importance_samples
    params = sum(p.numel() for p in model.parameters())
    memory.require(params * memory.TRAIN_BYTES_PER_PARAM + per_particle * draws
                   * memory.TRAIN_ACTIVATION_COPIES // 2,
                   f"training {draws:,} particle(s) per step on batches of {first.size:,} "
                   f"({memory.format_bytes(per_particle)} per particle, measured on the first "
                   "batch)", device)
    nesting = guess_max_plate_nesting(model.model, model.guide, first.args, first.kwargs)
    with eval_mode(model.model), torch.random.fork_rng(devices=_devices(model)), \
            pyro.validation_enabled(False):
        return particle_mismatch(model.model, model.guide, first.args, first.kwargs,
                                 max_plate_nesting=nesting,
                                 data_plate=data_plate_name(model)) is None


def _devices(model: torch.nn.Module) -> list[torch.device]:
    return [p.device for p in model.parameters() if p.device.type == "cuda"][:1]


def fit(model: Any = None, data: Any = None, *more: Any, guide: Callable | None = None,
        test_data: Any = None,
        config: TrainConfig | None = None, run_dir: str | Path | None = None,
        resume: bool = False, collate_fn: Callable | None = None,
        callbacks: Sequence[Callback] = (), on_epoch: Callable[[int, History], None] | None = None,
        progress: bool = True, download: bool = False, fused: bool = True,
        compile: bool = False, dist_timeout: float | None = None, force: bool = False,
        **options: Any) -> TrainResult:
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

    Options are the fields of :class:`~pyro_vae.models.config.TrainConfig` (``elbo``, ``particles``,
    ``importance_samples``, ``beta``, ``warmup``, ``epochs``, ``batch_size``, ``lr``, ``seed``,
    ``device``, ...), given as ``config`` or as keywords that replace its fields.

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
    elif guide is None and data is not None and not is_pair_module(model) and callable(data) \
            and not isinstance(data, (torch.Tensor, torch.utils.data.Dataset,
                                      torch.utils.data.DataLoader)):
        guide, data = data, None  # fit(model, guide) on config.data
    model = as_pair(model, guide)
    config = _config(config, data, options)
    if resume and run_dir is None:
        raise ConfigError("resume needs a run folder")
    train = functools.partial(_fit, model, data, test_data, config, collate_fn=collate_fn,
                              callbacks=callbacks, on_epoch=on_epoch, progress=progress,
                              download=download, fused=fused, compile=compile,
                              dist_timeout=dist_timeout)
    if run_dir is None:
        return train(None, False)
    with open_run_folder(run_dir, config, resume=resume, force=force, model=model,
                         writer=_writes_run_folder()) as folder:
        return train(folder.path, folder.resume)


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


def _fit(model: torch.nn.Module | None, data: Any, test_data: Any, config: TrainConfig,
         run_dir: Path | None, resume: bool, *, collate_fn: Callable | None,
         callbacks: Sequence[Callback], on_epoch: Callable[[int, History], None] | None,
         progress: bool, download: bool, fused: bool, compile: bool,
         dist_timeout: float | None) -> TrainResult:
    """:func:`fit`'s training, into the run folder :func:`~pyro_vae.runs.open_run_folder`
    prepared (``resume``: continue from its checkpoint), or into none."""
    device = resolve_device(config.device)
    dist = init_distributed(device, dist_timeout)
    replicas = Replicas(dist)
    user_model = model is not None or config.model_factory is not None
    dataset, vectorizable = None, True
    if config.dataset is not None:
        with main_first(dist, "waiting for rank 0 to download the data", enabled=download):
            dataset = builtin.prepare_data(config, device, download=download)

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
    if model is None:
        if dataset is None:
            raise ConfigError("no model to train: give a model/guide pair")
        rows = config.batch_size * config.particles * config.importance_samples
        model = builtin.build_model(dataset, config, rows=rows, training=True, device=device)
        model.initialize_from_data(dataset.train.images)
    model = model.to(device)
    if dataset is not None:
        source = builtin.train_source(dataset, config, model)
        held_out = builtin.eval_source(dataset, "test", config, model)
        if user_model:
            example = builtin.model_args(
                model, builtin.evaluation_images(dataset, "train", config)[:2],
                dataset.train.labels[:2])
            if isinstance(model, PyroPair):
                model.discover(*example)
            check_model(model, *example)
    else:
        source, held_out = _user_sources(model, data, test_data, config, collate_fn, device)
        vectorizable = _check_pair(model, source, config, device)
        if held_out is not None:  # scored after every epoch: checked before the first
            with torch.random.fork_rng(devices=_devices(model)):  # a loader draws its seed
                first = next(iter(held_out.ordered(config.batch_size)))
            try:
                check_finite_data(*first.args, **first.kwargs)
                check_model(model, *first.args, **first.kwargs)
                check_data(model, *first.args, **first.kwargs)
            except PyroVAEError as exc:
                raise type(exc)(f"the test data: {exc}") from None
    if dist.enabled:
        replicas.check_same_data(source, held_out)
        replicas.start(model)
        if dist.rank:
            pyro.set_rng_seed(rank_seed(config.seed, dist.rank))
    # a compiled step performs Adam's single-tensor update; eager steps must do the same
    optimizer = (torch.optim.Adam(model.parameters(), lr=config.lr) if compile
                 else make_optimizer(model.parameters(), config.lr))
    history = History()

    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        check_resumable(state, config, run_dir, user_model)
        saved_class = state.get("model_class")
        load_weights(model, state["model"], run_dir, saved_class)
        load_weights(optimizer, state["optimizer"], run_dir, saved_class)
        replicas.restore_rng_states(state, generator, order_generator, run_dir)
        history = History.from_dict(state["history"])
        if config.epochs < len(history.epoch):
            raise ConfigError(f"{run_dir} has already trained {len(history.epoch)} epochs: "
                              f"--epochs {config.epochs} would go back (give at least "
                              f"{len(history.epoch)})")
        if len(history.epoch) == config.epochs and finished_epoch(run_dir) == config.epochs:
            # its final estimate and plots exist: the history with them, nothing trained
            return TrainResult(model, History.from_dict(read_history(run_dir)), run_dir)

    nesting = BUILTIN_PLATE_NESTING if builtin.is_builtin(model) else None
    plate = data_plate_name(model)
    estimator = make_elbo(config.elbo, config.particles, config.importance_samples, config.beta,
                          max_plate_nesting=nesting, data_plate=plate)
    loop = Loop(model=model, optimizer=optimizer,
                step_loss=training_loss(model, estimator, fused), estimator=estimator,
                warmup=LinearWarmup(config.warmup, config.warmup_start, config.beta),
                source=source, batch_size=config.batch_size, generator=generator,
                order_generator=order_generator,
                eval_elbo=make_elbo("meanfield", config.eval_particles if vectorizable else 1,
                                    max_plate_nesting=nesting, data_plate=plate),
                eval_repeats=1 if vectorizable else config.eval_particles,
                held_out=held_out, replicas=replicas, history=history,
                epoch=len(history.epoch))
    if compile:
        loop.compiled = _compiled_step(loop, dist)
    if hasattr(model, "name"):
        forget_params(model.name)

    hooks: list[Callback] = [ProgressBar(loop.epoch + 1, config.epochs,
                                         progress and dist.is_main)]
    if run_dir is not None:
        hooks.append(Checkpoint(run_dir, config, dist.is_main))
    if on_epoch is not None:
        hooks.append(EpochFunction(on_epoch))
    hooks.extend(callbacks)
    if config.final_particles and held_out is not None:
        hooks.append(FinalEstimate(held_out, config.final_particles, config.batch_size,
                                   config.seed, dist))
    if run_dir is not None and dist.is_main:
        hooks.append(RunFolderPlots(run_dir, lambda loop: _plots(run_dir, loop, dataset,
                                                                 config)))
    try:
        run_epochs(loop, config.epochs, hooks)
    except TrainingDiverged as exc:
        kept = (f"; the last good checkpoint (epoch {len(history.epoch)}) is kept in {run_dir}"
                if run_dir is not None and history.epoch else "")
        raise TrainingDiverged(f"{exc}{kept}. {_divergence_hint(config)}") from None
    barrier(dist, "waiting for rank 0 to write the run folder")
    return TrainResult(model, history, run_dir, loop.compiled)


def _compiled_step(loop: Loop, dist: Any) -> CompiledStep:
    """The loop's compiled step; under torchrun, steps stay eager (the gradients must be
    averaged between the backward pass and the update)."""

    def eager(args: tuple, kwargs: dict, num_data: int) -> torch.Tensor:
        return loop.replicas.step(lambda: loop.step_loss(*args, **kwargs), num_data,
                                  loop.optimizer)

    def log(message: str) -> None:
        if dist.is_main:
            print(f"pyro-vae: {message}", file=sys.stderr, flush=True)

    step = CompiledStep(loop.model, loop.estimator, loop.optimizer, loop.step_loss, eager,
                        log=log)
    if dist.enabled and not step.disabled:
        step.disabled = "under torchrun the gradients are averaged between backward and update"
        log(f"compiled steps off: {step.disabled}; training eagerly")
    return step


#: A fixed Gaussian scale below this makes log p(x|z) ~ −(x − μ)²/(2σ²) overflow or dominate.
SMALL_OBS_SCALE = 1e-3


def _divergence_hint(config: TrainConfig) -> str:
    """What to change after a divergence: a tiny fixed Gaussian scale first, else the step size."""
    spec = config.model
    if (spec is not None and spec.likelihood == "gaussian" and spec.obs_scale is not None
            and spec.obs_scale < SMALL_OBS_SCALE):
        return (f"The Gaussian likelihood's fixed obs_scale {spec.obs_scale:g} is tiny: "
                "log p(x|z) grows like 1/obs_scale² and overflows; try a larger obs_scale "
                "(--obs-scale), or leave it out to learn it")
    return f"Try a smaller learning rate than {config.lr:g} (--lr)"


def _plots(run_dir: Path, loop: Loop, dataset: Any, config: TrainConfig) -> None:
    from pyro_vae.app.plots import write_run_plots

    images = (builtin.evaluation_images(dataset, "test", config)
              if dataset is not None else None)
    write_run_plots(run_dir, loop.model, dataset, loop.history, images)
