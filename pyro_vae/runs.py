"""The run folder: one module owns its files and the rules for writing and reading them.

A run folder holds ``config.json``, ``history.json``, ``checkpoint.pt`` (model, optimizer, random
states, history and config; loadable with ``torch.load(weights_only=True)``), ``model.safetensors``
(the weights alone) and the PNG plots. Every file is written atomically.

A run of a pair that is not one of the package's families records the pair's class under
``"model_class"`` (the config's ``model`` entry does not describe it). When the command line
trained it, the config also records the ``model_factory`` and the data specs, which rebuild the
pair and its data; a run trained from Python with in-memory data is rebuilt by passing a fresh
pair (``load_run(run_dir, model=...)``) and, to evaluate it, the data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from . import data as data_lib
from .batches import Source, as_source, resolve_device
from .builtin import build_model, eval_source, is_builtin, prepare_data
from .config import TrainConfig
from .errors import CheckpointError, ConfigError, shorten
from .io import atomic_path, write_json
from .specs import load_data, load_factory

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
MODEL_CLASS_KEY = "model_class"
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "history", "config")


@dataclass
class History:
    """Per-epoch record: mean training loss (−ELBO per datapoint, nats), held-out ELBO per
    datapoint (nats; absent without held-out data) and wall-clock seconds of the epoch."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_elbo: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def append(self, epoch: int, train_loss: float, test_elbo: float | None,
               seconds: float) -> None:
        self.epoch.append(epoch)
        self.train_loss.append(train_loss)
        if test_elbo is not None:
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


def user_model_class(model: torch.nn.Module, config: TrainConfig) -> str | None:
    """``"module.QualName"`` of a pair that the config's ``model`` entry does not describe."""
    if config.model is not None and is_builtin(model):
        return None
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _user_model_refusal(run_dir: Path, model_class: str) -> CheckpointError:
    pair, where = f"{model_class.rpartition('.')[2]}(...)", repr(str(run_dir))
    return CheckpointError(
        f"{run_dir} holds a model defined in Python ({model_class}), which only Python can "
        f"rebuild: load it with load_run({where}, model={pair}) or resume it with "
        f"fit({pair}, data, run_dir={where}, resume=True), both from pyro_vae (or train it "
        "from the command line with --model-factory, which records how to rebuild it)")


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """torch's global state and the data generator's (and the GPU's, on CUDA)."""
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["data"].cpu())
    if "cuda" in state and generator.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), generator.device)


def save_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, history: History, config: TrainConfig,
                    ranks: dict[str, Any] | None = None) -> None:
    """Write the checkpoint, weights, history and config; ``ranks`` (a distributed run's world
    size, every rank's random states and the shared order generator's) is stored under
    ``"distributed"``."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "rng": rng_state(generator), "history": history.to_dict(),
             "config": config.to_dict()}
    if ranks is not None:
        state["distributed"] = ranks
    model_class = user_model_class(model, config)
    recorded = {} if model_class is None else {MODEL_CLASS_KEY: model_class}
    state.update(recorded)
    with atomic_path(run_dir / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    with atomic_path(run_dir / WEIGHTS_FILE) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                    str(tmp))
    write_json(run_dir / HISTORY_FILE, history.to_dict())
    write_json(run_dir / CONFIG_FILE, {**config.to_dict(), **recorded})


def write_history(run_dir: Path, history: History) -> None:
    write_json(run_dir / HISTORY_FILE, history.to_dict())


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


def load_weights(module: torch.nn.Module | torch.optim.Optimizer, weights: dict[str, Any],
                 run_dir: Path, model_class: str | None = None) -> None:
    """Load ``weights`` into ``module``; ``model_class`` is the user's class the run recorded."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        fits = "its config" if model_class is None else f"the given model (it holds {model_class})"
        raise CheckpointError(f"the checkpoint in {run_dir} does not fit {fits}: "
                              f"{_one_line(exc)}") from None


def check_resumable(state: dict[str, Any], config: TrainConfig, run_dir: Path,
                    given_model: bool) -> None:
    """Refuse to resume ``state`` with a different ``config`` (only epochs, device and
    data_dir may change) or a user's pair without the pair."""
    saved = TrainConfig.from_dict(state["config"])
    if saved.replace(epochs=config.epochs, device=config.device,
                     data_dir=config.data_dir) != config:
        raise CheckpointError(f"the config of {run_dir} differs from the one given: only "
                              "epochs, device and data_dir may change on resume")
    saved_class = state.get(MODEL_CLASS_KEY)
    if saved_class is not None and not given_model:
        raise _user_model_refusal(run_dir, saved_class)


def read_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`~pyro_vae.config.TrainConfig` saved in a run folder's ``config.json``."""
    return read_run_config(run_dir)[0]


def read_run_config(run_dir: str | Path) -> tuple[TrainConfig, str | None]:
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


def refuse_python_only(run_dir: str | Path, config: TrainConfig, model_class: str | None
                       ) -> None:
    """Refuse a run whose pair only Python can rebuild (trained from Python, no factory)."""
    if model_class is not None and config.model_factory is None:
        raise _user_model_refusal(Path(run_dir), model_class)


def build_factory_model(spec: str) -> torch.nn.Module:
    """The pair a ``--model-factory`` spec returns when called with no arguments."""
    model = load_factory(spec)()
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module "
                          "model/guide pair")
    return model


@dataclass
class LoadedRun:
    """A trained run read back from its folder: ``dataset`` is the built-in dataset (``None``
    for a run on the user's data, whose ``data(split)`` reloads the recorded data specs)."""

    run_dir: Path
    config: TrainConfig
    model: torch.nn.Module
    history: History
    dataset: data_lib.Dataset | None = None

    def eval_images(self, split: str = "test") -> torch.Tensor:
        """A built-in run's evaluation images of ``split``."""
        from .builtin import evaluation_images

        if self.dataset is None:
            raise ConfigError(f"{self.run_dir} was trained on the user's own data, not images")
        _check_split(split)
        return evaluation_images(self.dataset, split, self.config)

    def data(self, split: str = "test", limit: int | None = None) -> Source:
        """The data of ``split`` as a source of batches: a built-in run's fixed evaluation
        binarization, or the run's recorded ``--data`` / ``--test-data``."""
        _check_split(split)
        if self.dataset is not None:
            return eval_source(self.dataset, split, self.config, self.model, limit)
        spec = self.config.data if split == "train" else (self.config.test_data
                                                          or self.config.data)
        if spec is None or (split == "test" and not self.config.test_data
                            and load_data(spec)[1] is None):
            given = "--data" if split == "train" else "--test-data"
            raise ConfigError(f"{self.run_dir} records no {given} for its {split} split (its "
                              "data were given in Python): pass the data to evaluate")
        train, test = load_data(spec)
        source = as_source(train if split == "train" or self.config.test_data else test)
        param = next(self.model.parameters())
        return source.head(limit).to(param.device, param.dtype)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")


def load_run(run_dir: str | Path, device: str = "auto", data_dir: str | None = None, *,
             model: torch.nn.Module | None = None) -> LoadedRun:
    """Load the config, weights and data of a run folder (``data_dir`` overrides the saved one).

    The package's families are rebuilt from the config, a pair trained from the command line
    from its recorded ``--model-factory``. A run of a pair trained from Python needs ``model``,
    a fresh instance of that class built as for training, into which the weights are loaded;
    without it such a run raises :class:`~pyro_vae.errors.CheckpointError` (the command
    line's one-line refusal). The model is returned in eval mode."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} does not exist")
    config, model_class = read_run_config(run_dir)
    if model is None and model_class is not None:
        refuse_python_only(run_dir, config, model_class)
        model = build_factory_model(config.model_factory)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    torch_device = resolve_device(device)
    state = load_checkpoint(run_dir, map_location=torch_device)
    dataset = prepare_data(config, torch_device) if config.dataset is not None else None
    if model is None:
        model = build_model(dataset, config)
    model = model.to(torch_device)
    load_weights(model, state["model"], run_dir, model_class)
    model.eval()
    return LoadedRun(run_dir, config, model, History.from_dict(state["history"]), dataset)
