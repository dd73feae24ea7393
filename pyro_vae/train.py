"""The SVI training loop, checkpoints and run folders.

A run folder holds ``config.json``, ``history.json``, ``checkpoint.pt`` (model, optimizer, random
states and history; loadable with ``torch.load(weights_only=True)``), ``model.safetensors`` (the
weights alone) and the PNG plots. Every file is written atomically.
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
from .errors import CheckpointError, ConfigError, TrainingDiverged
from .io import atomic_path, write_json
from .cvae import CVAE
from .models import VAE, forget_params
from .objectives import ELBOEstimator, LinearWarmup, make_estimator

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
MAX_PLATE_NESTING = 1
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
    common = dict(latent_dim=spec.latent_dim, hidden=spec.hidden, scale_fn=spec.scale_fn)
    if spec.family == "cvae":
        model = CVAE(dataset.input_dim, dataset.num_classes, **common)
        model.set_class_probs(dataset.train.labels)
    else:
        model = VAE(dataset.input_dim, **common)
    return model


def model_args(model: VAE, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The positional arguments of ``model.model`` / ``model.guide`` for a batch."""
    return (images, labels) if model.conditional else (images,)


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
              batch_size: int) -> float:
    """Estimate of the mean per-datapoint ELBO over ``images`` (nats)."""
    total = 0.0
    for start in range(0, images.shape[0], batch_size):
        chunk = slice(start, start + batch_size)
        total -= elbo.loss(model.model, model.guide, *model_args(model, images[chunk],
                                                                 labels[chunk]))
    return total / images.shape[0]


def final_estimate(model: VAE, images: torch.Tensor, labels: torch.Tensor,
                   config: TrainConfig) -> dict[str, float]:
    """Importance-weighted test log p̂_K(x) and ELBO (K = ``config.final_particles``) with their
    standard errors, computed on a fork of the random state so training is not disturbed."""
    from .evaluate import evaluate_dataset

    devices = [images.device] if images.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), pyro.validation_enabled(False):
        torch.manual_seed(config.seed)
        summary = evaluate_dataset(model.model, model.guide, model_args(model, images, labels),
                                   num_particles=config.final_particles,
                                   batch_size=config.batch_size, khat=False).summary()
    return {"particles": config.final_particles,
            "test_log_px": summary["log_px"]["mean"], "test_log_px_stderr": summary["log_px"]["stderr"],
            "test_elbo": summary["elbo"]["mean"], "test_gap": summary["gap"]["mean"]}


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], generator.device)


def save_checkpoint(run_dir: Path, model: VAE, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, history: History, config: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_state(generator),
        "history": history.to_dict(),
        "config": config.to_dict(),
    }
    with atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(tmp))
    write_json(run_dir / HISTORY_FILE, history.to_dict())


def load_checkpoint(run_dir: str | Path, map_location: torch.device | str = "cpu"
                    ) -> dict[str, Any]:
    """Read ``checkpoint.pt`` with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no {CHECKPOINT_FILE}: is it a pyro-vae run folder?")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None


def read_config(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no {CONFIG_FILE}: is it a pyro-vae run folder?")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def prepare_data(config: TrainConfig, device: torch.device, download: bool = False
                 ) -> data_lib.Dataset:
    dataset = data_lib.load_dataset(config.dataset, config.data_dir, download=download)
    if config.binarize == "none":
        raise ConfigError("the VAE's Bernoulli likelihood needs binary data: "
                          "use --binarize dynamic or fixed")
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


def train(config: TrainConfig, run_dir: str | Path | None = None, *, resume: bool = False,
          progress: bool = True, download: bool = False, model: VAE | None = None,
          on_epoch: Callable[[int, History], None] | None = None) -> TrainResult:
    """Train a :class:`~pyro_vae.models.VAE` with SVI; return the model and its :class:`History`.

    Each step minimizes the chosen estimator's loss (:mod:`pyro_vae.objectives`) averaged per
    datapoint with Adam; the test ELBO after each epoch uses the closed-form-KL estimator with
    ``config.eval_particles`` particles and β = 1, whatever the training estimator.
    With ``run_dir`` the config, history, checkpoint and weights are written there after every
    epoch (atomically); ``resume=True`` continues the run saved in ``run_dir`` up to
    ``config.epochs`` and reaches the same parameters as an uninterrupted run.
    ``model`` may be given (built for the dataset's input size); by default it is built from
    ``config.model``. ``on_epoch(epoch, history)`` is called after each epoch's checkpoint.
    Entries of Pyro's param store under the model's name are replaced by the model's parameters;
    other entries are left alone.
    Raises :class:`~pyro_vae.errors.TrainingDiverged` if the loss becomes NaN or infinite; the
    last good checkpoint stays on disk.
    """
    run_dir = Path(run_dir) if run_dir is not None else None
    if resume and run_dir is None:
        raise ConfigError("resume needs a run folder")
    if run_dir is not None and not resume and (run_dir / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{run_dir} already holds a run: resume it with --resume {run_dir} "
                          "or choose another --out")
    device = resolve_device(config.device)
    dataset = prepare_data(config, device, download=download)

    pyro.set_rng_seed(config.seed)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    if model is None:
        model = build_model(dataset, config)
        model.set_output_bias(dataset.train.images.mean(0))
    elif model.input_dim != dataset.input_dim:
        raise ConfigError(f"the model takes {model.input_dim} inputs, {config.dataset} has "
                          f"{dataset.input_dim}")
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    history = History()

    if resume:
        state = load_checkpoint(run_dir, map_location=device)
        saved = TrainConfig.from_dict(state["config"])
        if saved.replace(epochs=config.epochs, device=config.device,
                         data_dir=config.data_dir) != config:
            raise CheckpointError(f"the config of {run_dir} differs from the one given: only "
                                  "epochs, device and data_dir may change on resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], generator)
        history = History.from_dict(state["history"])

    train_elbo = make_elbo(config.elbo, config.particles, config.importance_samples, config.beta)
    warmup = LinearWarmup(config.warmup, config.warmup_start, config.beta)
    eval_elbo = make_elbo("meanfield", config.eval_particles)
    train_images, train_labels = dataset.train.images, dataset.train.labels
    fixed = (data_lib.fixed_binarization(train_images, config.seed)
             if config.binarize == "fixed" else None)
    test_images = evaluation_images(dataset, "test", config)
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_FILE, config.to_dict())

    forget_params(model.name)
    num_train = train_images.shape[0]
    steps_per_epoch = -(-num_train // config.batch_size)
    first_epoch = len(history.epoch) + 1
    bar = tqdm(range(first_epoch, config.epochs + 1), desc="train", unit="epoch",
               disable=not progress, initial=first_epoch - 1, total=config.epochs)
    for epoch in bar:
        start = time.perf_counter()
        model.train()
        epoch_images = _train_images_for_epoch(train_images, config, generator, fixed)
        order = torch.randperm(num_train, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            for step, begin in enumerate(range(0, num_train, config.batch_size),
                                         start=(epoch - 1) * steps_per_epoch):
                train_elbo.beta = warmup(step)
                index = order[begin:begin + config.batch_size]
                args = model_args(model, epoch_images[index], train_labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss = train_elbo.differentiable_loss(model.model, model.guide, *args)
                (loss / index.shape[0]).backward()
                optimizer.step()
                loss_sum += loss.detach()
        mean_loss = loss_sum.item() / num_train
        if not math.isfinite(mean_loss):
            kept = f"; the last good checkpoint (epoch {len(history.epoch)}) is kept in {run_dir}" \
                if run_dir is not None and history.epoch else ""
            raise TrainingDiverged(f"the training loss became {mean_loss} in epoch {epoch}{kept}. "
                                   "Try a smaller --lr.")
        model.eval()
        with pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Encountered NaN")
            elbo_value = test_elbo(model, test_images, dataset.test.labels, eval_elbo,
                                   config.batch_size)
        history.append(epoch, mean_loss, elbo_value, time.perf_counter() - start)
        bar.set_postfix(loss=f"{mean_loss:.2f}", test_elbo=f"{elbo_value:.2f}")
        if run_dir is not None:
            save_checkpoint(run_dir, model, optimizer, generator, history, config)
        if on_epoch is not None:
            on_epoch(epoch, history)
    bar.close()
    if config.final_particles and history.epoch:
        history.extra["final"] = final_estimate(model, test_images, dataset.test.labels, config)
    if run_dir is not None:
        write_json(run_dir / HISTORY_FILE, history.to_dict())
        from .plots import write_run_plots

        write_run_plots(run_dir, model, dataset, history, test_images)
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


def load_run(run_dir: str | Path, device: str = "auto", data_dir: str | None = None) -> LoadedRun:
    """Load the config, weights and data of a run folder (``data_dir`` overrides the saved one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    config = read_config(run_dir)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    torch_device = resolve_device(device)
    state = load_checkpoint(run_dir, map_location=torch_device)
    dataset = prepare_data(config, torch_device)
    model = build_model(dataset, config).to(torch_device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"the weights in {run_dir} do not fit its config: {exc}") from None
    model.eval()
    return LoadedRun(run_dir, config, model, dataset, History.from_dict(state["history"]))
