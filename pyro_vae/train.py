"""The SVI training loop, checkpoints and run folders.

A run folder holds ``config.json``, ``history.json``, ``checkpoint.pt`` (model, optimizer, random
states and history; loadable with ``torch.load(weights_only=True)``), ``model.safetensors`` (the
weights alone) and the PNG plots. Every file is written atomically. A run of a user's own
model/guide pair (``train(config, run_dir, model=pair)``) also records the pair's class under
``"model_class"`` in ``config.json`` and the checkpoint: the config's ``model`` entry does not
describe that pair, so only Python, given the class, can rebuild it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import safetensors.torch
import torch
from pyro.infer import ELBO
from tqdm.auto import tqdm

from . import data as data_lib
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, TrainingDiverged, shorten
from .fused import training_loss
from .io import atomic_path, write_json
from .cvae import CVAE
from .distributed import (SHARED_ORDER_STREAM, SINGLE, DistributedContext, all_gather_objects,
                          all_reduce_sum, average_gradients, barrier, broadcast_tensors,
                          check_in_sync, derive_seed, init_distributed, main_first,
                          rank_seed, shard_indices)
from .models import VAE, forget_params
from .protocol import check_model
from .vae2 import VAE2
from .objectives import ELBOEstimator, LinearWarmup, make_estimator

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
MAX_PLATE_NESTING = 1
MODEL_CLASS_KEY = "model_class"
TEST_BINARIZATION_OFFSET = 1


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA GPU is available")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def make_elbo(name: str, num_particles: int = 1, importance_samples: int = 1,
              beta: float = 1.0) -> ELBOEstimator:
    """The named estimator (see :mod:`pyro_vae.objectives`) for the package's models."""
    return make_estimator(name, num_particles, importance_samples, beta,
                          max_plate_nesting=MAX_PLATE_NESTING)


def build_model(dataset: data_lib.Dataset, config: TrainConfig) -> VAE:
    """The model family named by ``config.model.family``, sized for ``dataset``."""
    spec = config.model
    common = dict(latent_dim=spec.latent_dim, hidden=spec.hidden, scale_fn=spec.scale_fn,
                  likelihood=spec.likelihood, obs_scale=spec.obs_scale,
                  activation=spec.activation)
    if spec.family == "cvae":
        model = CVAE(dataset.input_dim, dataset.num_classes, guide=spec.guide, **common)
        model.set_class_probs(dataset.train.labels)
    elif spec.family == "vae2":
        model = VAE2(dataset.input_dim, latent2_dim=spec.latent2_dim, hidden2=spec.hidden2,
                     **common)
    else:
        model = VAE(dataset.input_dim, guide=spec.guide, **common)
    return model


def _user_model_class(model: torch.nn.Module) -> str | None:
    """``"module.QualName"`` of a model that is not one of the package's families (which
    ``config.model`` describes and :func:`build_model` rebuilds), else ``None``."""
    cls = type(model)
    if cls in (VAE, CVAE, VAE2):
        return None
    return f"{cls.__module__}.{cls.__qualname__}"


def _user_model_refusal(run_dir: Path, model_class: str) -> CheckpointError:
    pair, where = f"{model_class.rpartition('.')[2]}(...)", repr(str(run_dir))
    return CheckpointError(
        f"{run_dir} holds a user-defined model ({model_class}), which only Python can rebuild: "
        f"load it with load_run({where}, model={pair}) or resume it with "
        f"train(read_config({where}), {where}, resume=True, model={pair}), all three from "
        "pyro_vae.train")


def model_args(model: VAE, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The positional arguments of ``model.model`` / ``model.guide`` for a batch."""
    return (images, labels) if getattr(model, "conditional", False) else (images,)


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the device has one, plain Adam otherwise (the same
    update up to float rounding)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


@dataclass
class History:
    """Per-epoch record: mean training loss (−ELBO per datapoint, nats), test ELBO per datapoint
    (nats) and wall-clock seconds of the epoch."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_elbo: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def append(self, epoch: int, train_loss: float, test_elbo: float, seconds: float) -> None:
        self.epoch.append(epoch)
        self.train_loss.append(train_loss)
        self.test_elbo.append(test_elbo)
        self.seconds.append(seconds)

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "test_elbo": self.test_elbo,
                "seconds": self.seconds, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "History":
        raw = dict(raw)
        core = {key: list(raw.pop(key, [])) for key in ("epoch", "train_loss", "test_elbo",
                                                        "seconds")}
        return cls(**core, extra=raw)


def evaluation_images(dataset: data_lib.Dataset, split: str, config: TrainConfig) -> torch.Tensor:
    """The images a run is evaluated on: a fixed seeded binarization (or the raw intensities)."""
    images = getattr(dataset, split).images
    if config.binarize == "none":
        return images
    offset = 0 if split == "train" else TEST_BINARIZATION_OFFSET
    return data_lib.fixed_binarization(images, config.seed + offset)


@torch.no_grad()
def test_elbo(model: VAE, images: torch.Tensor, labels: torch.Tensor, elbo: ELBO,
              batch_size: int, dist: DistributedContext = SINGLE) -> float:
    """Estimate of the mean per-datapoint ELBO over ``images`` (nats). Under ``dist`` the batches
    are dealt round-robin to the ranks and the sum is all-reduced: every rank gets the value."""
    total = 0.0
    for start in range(0, images.shape[0], batch_size)[dist.rank::dist.world_size]:
        chunk = slice(start, start + batch_size)
        total -= elbo.loss(model.model, model.guide, *model_args(model, images[chunk],
                                                                 labels[chunk]))
    if dist.enabled:
        summed = torch.tensor(total, dtype=torch.float64, device=images.device)
        total = all_reduce_sum(summed, dist, "summing the test ELBO").item()
    return total / images.shape[0]


def final_estimate(model: VAE, images: torch.Tensor, labels: torch.Tensor,
                   config: TrainConfig, dist: DistributedContext = SINGLE) -> dict[str, float]:
    """Importance-weighted test log p̂_K(x) and ELBO (K = ``config.final_particles``) with their
    standard errors, computed on a fork of the random state so training is not disturbed.
    Under ``dist`` the batches are shared out among the ranks, each seeded from
    ``config.seed`` and its index (see :func:`~pyro_vae.evaluate.evaluate_dataset`)."""
    from .evaluate import evaluate_dataset

    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        torch.manual_seed(config.seed)
        summary = evaluate_dataset(model.model, model.guide, model_args(model, images, labels),
                                   num_particles=config.final_particles,
                                   batch_size=config.batch_size, khat=False,
                                   batch_seed=config.seed if dist.enabled else None,
                                   dist=dist).summary()
    return {"particles": config.final_particles,
            "test_log_px": summary["log_px"]["mean"], "test_log_px_stderr": summary["log_px"]["stderr"],
            "test_elbo": summary["elbo"]["mean"], "test_gap": summary["gap"]["mean"]}


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["data"].cpu())
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), generator.device)


def save_checkpoint(run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, history: History, config: TrainConfig,
                    ranks: dict[str, Any] | None = None) -> None:
    """Write the checkpoint, weights, history and config; ``ranks`` (a distributed run's world size,
    every rank's random states and the shared order generator's) is stored under
    ``"distributed"``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(generator),
        "history": history.to_dict(),
        "config": config.to_dict(),
    }
    if ranks is not None:
        state["distributed"] = ranks
    model_class = _user_model_class(model)
    recorded = {} if model_class is None else {MODEL_CLASS_KEY: model_class}
    state.update(recorded)
    with atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(tmp))
    write_json(run_dir / HISTORY_FILE, history.to_dict())
    write_json(run_dir / CONFIG_FILE, {**config.to_dict(), **recorded})


CHECKPOINT_KEYS = ("model", "optimizer", "rng", "history", "config")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (torch's run long)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return shorten(text or type(exc).__name__, limit)


def load_checkpoint(run_dir: str | Path, map_location: torch.device | str = "cpu"
                    ) -> dict[str, Any]:
    """Read ``checkpoint.pt`` with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no {CHECKPOINT_FILE}: is it a pyro-vae run folder?")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged or not a "
                              f"pyro-vae checkpoint ({type(exc).__name__})") from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint: it lacks {missing}")
    return state


def _load_weights(module: torch.nn.Module | torch.optim.Optimizer, weights: dict[str, Any],
                  run_dir: Path, model_class: str | None = None) -> None:
    """Load ``weights`` into ``module``; ``model_class`` is the user's class the run recorded."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        fits = "its config" if model_class is None else f"the given model (it holds {model_class})"
        raise CheckpointError(f"the checkpoint in {run_dir} does not fit {fits}: "
                              f"{_one_line(exc)}") from None


def read_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`~pyro_vae.config.TrainConfig` saved in a run folder's ``config.json``."""
    return _read_run_config(run_dir)[0]


def _read_run_config(run_dir: str | Path) -> tuple[TrainConfig, str | None]:
    """The saved config and the user's model class the run recorded (``None``: a package
    family, which the config describes)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no {CONFIG_FILE}: is it a pyro-vae run folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"cannot read {path}: expected a JSON object")
    model_class = raw.pop(MODEL_CLASS_KEY, None)
    if model_class is not None and not isinstance(model_class, str):
        raise CheckpointError(f"cannot read {path}: {MODEL_CLASS_KEY!r} must be a string")
    try:
        return TrainConfig.from_dict(raw), model_class
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def prepare_data(config: TrainConfig, device: torch.device, download: bool = False
                 ) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, download=download)
    for split in ("train", "test"):
        part = getattr(dataset, split)
        data_lib.validate_images(part.images, labels=part.labels,
                                 num_classes=dataset.num_classes, what=f"{dataset.name} {split}")
    return dataset.to(device)


def _train_images_for_epoch(images: torch.Tensor, config: TrainConfig,
                            generator: torch.Generator, fixed: torch.Tensor | None) -> torch.Tensor:
    if config.binarize == "dynamic":
        return data_lib.binarize(images, generator)
    return fixed if fixed is not None else images


def svi_step(loss_fn: Callable[[], torch.Tensor], num_data: int,
             optimizer: torch.optim.Optimizer, dist: DistributedContext = SINGLE) -> torch.Tensor:
    """One optimizer step on ``loss_fn() / num_data``, the per-datapoint mean of a loss summed
    over a batch of ``num_data``; returns the summed loss, detached.

    Under ``dist`` the gradients are averaged over the ranks before the step (the reduction of
    DistributedDataParallel, :func:`~pyro_vae.distributed.average_gradients`): with batches of
    equal size on every rank, that is the gradient of the mean loss over the combined batch of
    ``world_size * num_data`` datapoints, and every rank takes the same step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    (loss / num_data).backward()
    # a generator: a single process (nothing to average) never walks the parameter list
    average_gradients((p for group in optimizer.param_groups for p in group["params"]), dist)
    optimizer.step()
    return loss.detach()


def _restore_rng_states(state: dict[str, Any], generator: torch.Generator,
                        order_generator: torch.Generator, dist: DistributedContext,
                        run_dir: Path) -> None:
    ranks = state.get("distributed")
    saved_world = ranks["world_size"] if ranks is not None else 1
    if saved_world != dist.world_size:
        raise CheckpointError(f"{run_dir} was trained by {saved_world} process(es) and this is "
                              f"{dist.world_size}: resume it with the same number (torchrun "
                              f"--nproc-per-node={saved_world} ...), which the data shards and "
                              "random streams need to continue exactly")
    if ranks is None:
        _set_rng_state(state["rng"], generator)
        return
    _set_rng_state(ranks["rng"][dist.rank], generator)
    order_generator.set_state(ranks["order"].cpu())


def _rank_states(generator: torch.Generator, order_generator: torch.Generator,
                 dist: DistributedContext) -> dict[str, Any] | None:
    """Every rank's random states, gathered on every rank (``None`` in a single process)."""
    if not dist.enabled:
        return None
    states = all_gather_objects(_rng_state(generator), dist, "gathering the random states")
    return {"world_size": dist.world_size, "rng": states, "order": order_generator.get_state()}


def train(config: TrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
          progress: bool = True, download: bool = False, model: VAE | None = None,
          on_epoch: Callable[[int, History], None] | None = None,
          dist_timeout: float | None = None, fused: bool = True) -> TrainResult:
    """Train a :class:`~pyro_vae.models.VAE` with SVI; return the model and its :class:`History`.

    Each step minimizes the chosen estimator's loss (:mod:`pyro_vae.objectives`) averaged per
    datapoint with Adam; the test ELBO after each epoch uses the closed-form-KL estimator with
    ``config.eval_particles`` particles and β = 1, whatever the training estimator.
    With ``run_dir`` the config, history, checkpoint and weights are written there after every
    epoch (atomically); ``resume=True`` continues the run saved in ``run_dir`` up to
    ``config.epochs`` and reaches the same parameters as an uninterrupted run.
    ``model`` may be given (built for the dataset's input size); by default it is built from
    ``config.model``. A user's own pair (any class but the package's families; checked by
    :func:`~pyro_vae.protocol.check_model`) is recorded in the run folder by its class name, and
    the run is resumed by passing a fresh pair of that class again with ``resume=True``; without
    it, resuming such a run raises :class:`~pyro_vae.errors.CheckpointError`.
    ``on_epoch(epoch, history)`` is called after each epoch's checkpoint.
    Entries of Pyro's param store under the model's name are replaced by the model's parameters;
    other entries are left alone.
    Raises :class:`~pyro_vae.errors.TrainingDiverged` if the loss becomes NaN or infinite; the
    last good checkpoint stays on disk.

    For the built-in :class:`~pyro_vae.models.VAE` with a diagonal guide and the ``trace`` or
    ``meanfield`` estimator with one particle, the step's loss is computed by
    :class:`~pyro_vae.fused.FusedLoss` straight from the networks, without Pyro's effect
    handlers: the same random draws, losses and gradients bit for bit, so the same history and
    parameters. ``fused=False`` runs every step through the traced estimator, as any other
    model or estimator does; the choice is not saved and a run may be resumed either way.

    Under torchrun (``WORLD_SIZE`` > 1; see :doc:`distributed`) every rank calls this function:
    each trains on its :class:`~torch.utils.data.DistributedSampler` share of every epoch with
    ``config.batch_size`` datapoints per step and per rank, the gradients are averaged over the
    ranks (:func:`svi_step`), and rank 0 alone writes the run folder. Collectives wait at most
    ``dist_timeout`` seconds (default ``$PYRO_VAE_DIST_TIMEOUT`` or 300) and then raise
    :class:`~pyro_vae.distributed.DistributedError`.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is None:
        raise ConfigError("resume needs a run folder")
    if run_dir is not None and not resume and (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run: resume it with --resume {run_dir} "
                          "or choose another --out")
    device = resolve_device(config.device)
    dist = init_distributed(device, dist_timeout)
    with main_first(dist, "waiting for rank 0 to download the data", enabled=download):
        dataset = prepare_data(config, device, download=download)

    pyro.set_rng_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(rank_seed(config.seed, dist.rank))
    order_generator = generator if not dist.enabled else torch.Generator(device=device)
    if dist.enabled:
        order_generator.manual_seed(derive_seed(config.seed, SHARED_ORDER_STREAM))
    user_model = model is not None
    if not user_model:
        model = build_model(dataset, config)
        model.initialize_from_data(dataset.train.images)
    model = model.to(device)
    if user_model:
        probe = slice(0, min(2, len(dataset.train)))
        check_model(model, *model_args(model, evaluation_images(dataset, "train", config)[probe],
                                       dataset.train.labels[probe]))
    if dist.enabled:
        broadcast_tensors(model.state_dict().values(), dist)
        if dist.rank:
            pyro.set_rng_seed(rank_seed(config.seed, dist.rank))
    optimizer = make_optimizer(model.parameters(), config.lr)
    history = History()

    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        saved = TrainConfig.from_dict(state["config"])
        if saved.replace(epochs=config.epochs, device=config.device,
                         data_dir=config.data_dir) != config:
            raise CheckpointError(f"the config of {run_dir} differs from the one given: only "
                                  "epochs, device and data_dir may change on resume")
        saved_class = state.get(MODEL_CLASS_KEY)
        if saved_class is not None and not user_model:
            raise _user_model_refusal(run_dir, saved_class)
        _load_weights(model, state["model"], run_dir, saved_class)
        _load_weights(optimizer, state["optimizer"], run_dir, saved_class)
        _restore_rng_states(state, generator, order_generator, dist, run_dir)
        history = History.from_dict(state["history"])
        if config.epochs < len(history.epoch):
            raise ConfigError(f"{run_dir} has already trained {len(history.epoch)} epochs: "
                              f"--epochs {config.epochs} would go back (give at least "
                              f"{len(history.epoch)})")

    train_elbo = make_elbo(config.elbo, config.particles, config.importance_samples, config.beta)
    step_loss = training_loss(model, train_elbo, fused)
    warmup = LinearWarmup(config.warmup, config.warmup_start, config.beta)
    eval_elbo = make_elbo("meanfield", config.eval_particles)
    train_images, train_labels = dataset.train.images, dataset.train.labels
    fixed = (data_lib.fixed_binarization(train_images, config.seed)
             if config.binarize == "fixed" else None)
    test_images = evaluation_images(dataset, "test", config)
    if hasattr(model, "name"):
        forget_params(model.name)
    num_train = train_images.shape[0]
    per_rank = -(-num_train // dist.world_size)
    steps_per_epoch = -(-per_rank // config.batch_size)
    first_epoch = len(history.epoch) + 1
    bar = tqdm(range(first_epoch, config.epochs + 1), desc="train", unit="epoch",
               disable=not progress or not dist.is_main, initial=first_epoch - 1,
               total=config.epochs)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        if dist.enabled:  # this rank's share alone is binarized; the order has its own generator
            shard = shard_indices(torch.randperm(num_train, device=device,
                                                 generator=order_generator), dist)
            epoch_images = _train_images_for_epoch(train_images[shard], config, generator,
                                                   None if fixed is None else fixed[shard])
            epoch_labels = train_labels[shard]
            order = torch.arange(shard.shape[0], device=device)
        else:
            epoch_images = _train_images_for_epoch(train_images, config, generator, fixed)
            epoch_labels = train_labels
            order = torch.randperm(num_train, device=device, generator=order_generator)
        loss_sum = torch.zeros((), device=device)
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            for step, begin in enumerate(range(0, order.shape[0], config.batch_size),
                                         start=(epoch - 1) * steps_per_epoch):
                train_elbo.beta = warmup(step)
                index = order[begin:begin + config.batch_size]
                args = model_args(model, epoch_images[index], epoch_labels[index])
                loss_sum += svi_step(lambda: step_loss(*args), index.shape[0], optimizer, dist)
        all_reduce_sum(loss_sum, dist, "summing the training loss")
        mean_loss = loss_sum.item() / (dist.world_size * order.shape[0])
        if not math.isfinite(mean_loss):
            kept = f"; the last good checkpoint (epoch {len(history.epoch)}) is kept in {run_dir}" \
                if run_dir is not None and history.epoch else ""
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch}{kept}. "
                                   "Try a smaller --lr.")
        model.eval()
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            elbo_value = test_elbo(model, test_images, dataset.test.labels, eval_elbo,
                                   config.batch_size, dist)
        check_in_sync(model.parameters(), dist)
        history.append(epoch, mean_loss, elbo_value, time.perf_counter() - start)
        bar.set_postfix(loss=f"{mean_loss:.2f}", test_elbo=f"{elbo_value:.2f}")
        if run_dir is not None:
            ranks = _rank_states(generator, order_generator, dist)
            if dist.is_main:
                save_checkpoint(run_dir, model, optimizer, generator, history, config, ranks)
        if on_epoch is not None:
            on_epoch(epoch, history)
    bar.close()
    if config.final_particles and history.epoch:
        history.extra["final"] = final_estimate(model, test_images, dataset.test.labels, config,
                                                dist)
    if run_dir is not None and dist.is_main:
        write_json(run_dir / HISTORY_FILE, history.to_dict())
        from .plots import write_run_plots

        write_run_plots(run_dir, model, dataset, history, test_images)
    barrier(dist, "waiting for rank 0 to write the run folder")
    return TrainResult(model, history, run_dir)


@dataclass
class TrainResult:
    """What :func:`train` returns: the trained model, its history and the run folder (if any)."""

    model: VAE
    history: History
    run_dir: Path | None


@dataclass
class LoadedRun:
    """A trained run read back from its folder."""

    run_dir: Path
    config: TrainConfig
    model: VAE
    dataset: data_lib.Dataset
    history: History

    def eval_images(self, split: str = "test") -> torch.Tensor:
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
        return evaluation_images(self.dataset, split, self.config)


def load_run(run_dir: str | Path, device: str = "auto", data_dir: str | None = None, *,
             model: torch.nn.Module | None = None) -> LoadedRun:
    """Load the config, weights and data of a run folder (``data_dir`` overrides the saved one).

    The package's families are rebuilt from the config. A run of a user's own pair needs
    ``model``, a fresh instance of that class built as for training, into which the weights are
    loaded; without it such a run raises :class:`~pyro_vae.errors.CheckpointError` (the command
    line's one-line refusal)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    config, model_class = _read_run_config(run_dir)
    if model_class is not None and model is None:
        raise _user_model_refusal(run_dir, model_class)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    torch_device = resolve_device(device)
    state = load_checkpoint(run_dir, map_location=torch_device)
    dataset = prepare_data(config, torch_device)
    if model is None:
        model = build_model(dataset, config)
    model = model.to(torch_device)
    _load_weights(model, state["model"], run_dir, model_class)
    model.eval()
    return LoadedRun(run_dir, config, model, dataset, History.from_dict(state["history"]))
