"""The checkpoint and the files mirrored from it: what is saved each epoch, read back and
checked field by field before use."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from pyro_vae.data.builtin import is_builtin
from pyro_vae.runs.checkpoint_checks import MODEL_CLASS_KEY, check_checkpoint
from pyro_vae.runs.config import TrainConfig
from pyro_vae.util import memory
from pyro_vae.util.errors import CheckpointError, PyroVAEError, shorten
from pyro_vae.util.files import COPIES, read_json, regular_file
from pyro_vae.util.io import atomic_files, write_json

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_FILE = "checkpoint.pt"
WEIGHTS_FILE = "model.safetensors"
#: the best epoch's weights, where early stopping keeps them
BEST_WEIGHTS_FILE = "best.safetensors"
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "history", "config")
LOCK_FILE = ".lock"
#: The files a training run writes (their temporary files are swept by the run's writer).
TRAINING_FILES = (
    CONFIG_FILE,
    HISTORY_FILE,
    CHECKPOINT_FILE,
    WEIGHTS_FILE,
    BEST_WEIGHTS_FILE,
    "samples.png",
    "reconstructions.png",
    "latent.png",
    "curves.png",
)


@dataclass
class History:
    """Per-epoch record: mean training loss (−ELBO per datapoint, nats), held-out ELBO per
    datapoint (nats; absent without held-out data) and wall-clock seconds of the epoch."""

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_elbo: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def append(
        self, epoch: int, train_loss: float, test_elbo: float | None, seconds: float
    ) -> None:
        self.epoch.append(epoch)
        self.train_loss.append(train_loss)
        if test_elbo is not None:
            self.test_elbo.append(test_elbo)
        self.seconds.append(seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "test_elbo": self.test_elbo,
            "seconds": self.seconds,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> History:
        raw = dict(raw)
        core = {
            key: list(raw.pop(key, [])) for key in ("epoch", "train_loss", "test_elbo", "seconds")
        }
        return cls(**core, extra=raw)


def user_model_class(model: torch.nn.Module, config: TrainConfig) -> str | None:
    """``"module.QualName"`` of a pair that the config's ``model`` entry does not describe."""
    if config.model is not None and is_builtin(model):
        return None
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def user_model_refusal(run_dir: Path, model_class: str) -> CheckpointError:
    pair, where = f"{model_class.rpartition('.')[2]}(...)", repr(str(run_dir))
    return CheckpointError(
        f"{run_dir} holds a model defined in Python ({model_class}), which only Python can "
        f"rebuild: load it with load_run({where}, model={pair}) or resume it with "
        f"fit({pair}, data, run_dir={where}, resume=True), both from pyro_vae (or train it "
        'with model_factory="FILE.py:FUNCTION", which records how to rebuild it)'
    )


def rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """torch's global state and the data generator's (and the GPU's, on CUDA)."""
    state = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if generator.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(generator.device)
    return state


def _check_rng_size(name: str, saved: torch.Tensor, expected: torch.Tensor) -> None:
    if saved.numel() != expected.numel():
        raise CheckpointError(
            f"the checkpoint's random state rng.{name} holds {saved.numel()} bytes where this "
            f"{name} generator takes {expected.numel()}: the checkpoint is damaged, or its "
            "random states come from another kind of device"
        )


def set_generator_state(name: str, generator: torch.Generator, saved: torch.Tensor) -> None:
    """``generator.set_state(saved)``, a state of the wrong size refused naming ``name``."""
    _check_rng_size(name, saved, generator.get_state())
    generator.set_state(saved.cpu())


def set_rng_state(state: dict[str, torch.Tensor], generator: torch.Generator) -> None:
    """Restore :func:`rng_state`'s states; a state of the wrong size is a
    :class:`~pyro_vae.util.errors.CheckpointError` naming it (torch would raise its own error)."""
    _check_rng_size("torch", state["torch"], torch.get_rng_state())
    _check_rng_size("data", state["data"], generator.get_state())
    torch.set_rng_state(state["torch"].cpu())
    generator.set_state(state["data"].cpu())
    if "cuda" in state and generator.device.type == "cuda":
        _check_rng_size("cuda", state["cuda"], torch.cuda.get_rng_state(generator.device))
        torch.cuda.set_rng_state(state["cuda"].cpu(), generator.device)


def _torch_save(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a Python file, so that a failed write chains the
    :class:`OSError` (its errno) to torch's ``RuntimeError``."""
    with open(path, "wb") as stream:
        torch.save(state, stream)


def _save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    safetensors.torch.save_file(tensors, str(path))


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: History,
    config: TrainConfig,
    ranks: dict[str, Any] | None = None,
    best: dict[str, torch.Tensor] | None = None,
    scheduler: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint, weights, history and config as one set (all renamed into place
    at the end, the checkpoint last; a failed write leaves the previous set and raises
    :class:`~pyro_vae.util.io.WriteError`); ``ranks`` (a distributed run's world size, every rank's
    random states and the shared order generator's) is stored under ``"distributed"``; ``best``
    weights (early stopping's best epoch) are written to ``best.safetensors`` in the same set;
    a learning-rate ``scheduler``'s state is stored under ``"scheduler"``."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(generator),
        "history": history.to_dict(),
        "config": config.to_dict(),
    }
    if ranks is not None:
        state["distributed"] = ranks
    if scheduler is not None:
        state["scheduler"] = scheduler
    model_class = user_model_class(model, config)
    recorded = {} if model_class is None else {MODEL_CLASS_KEY: model_class}
    state.update(recorded)
    run_dir = Path(run_dir)
    with atomic_files() as files:
        files.write_json(run_dir / CONFIG_FILE, {**config.to_dict(), **recorded})
        files.write_json(run_dir / HISTORY_FILE, history.to_dict())
        with files.path(run_dir / WEIGHTS_FILE) as tmp:
            _save_weights({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
        if best is not None:
            with files.path(run_dir / BEST_WEIGHTS_FILE) as tmp:
                _save_weights({k: v.contiguous() for k, v in best.items()}, tmp)
        with files.path(run_dir / CHECKPOINT_FILE) as tmp:
            _torch_save(state, tmp)


#: history.json's mark of a run whose training ended normally (its final estimate and plots
#: written): the epoch it ended at.
FINISHED_KEY = "finished_at_epoch"


def write_history(run_dir: Path, history: History, finished: bool = False) -> None:
    """Write ``history.json``; ``finished`` marks the run's end (after its last files)."""
    mark = {FINISHED_KEY: history.epoch[-1]} if finished and history.epoch else {}
    write_json(run_dir / HISTORY_FILE, {**history.to_dict(), **mark})


def read_history(run_dir: str | Path) -> dict[str, Any]:
    """``history.json`` as written (with the final estimate and the end mark, if any)."""
    return read_json(Path(run_dir) / HISTORY_FILE, error=CheckpointError)


def finished_epoch(run_dir: str | Path) -> int | None:
    """The epoch a run folder's training ended at, written and complete (its final estimate
    and plots too); ``None`` when it did not end so (a checkpoint without that mark, or none)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT_FILE).is_file():
        return None
    try:
        raw = read_json(run_dir / HISTORY_FILE)
        epochs, mark = raw["epoch"], raw.get(FINISHED_KEY)
    except (PyroVAEError, OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(mark, int) and isinstance(epochs, list) and epochs and epochs[-1] == mark:
        return mark
    return None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, at most ``limit`` characters (torch's run long)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return shorten(text or type(exc).__name__, limit)


def load_checkpoint(
    run_dir: str | Path, map_location: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Read ``checkpoint.pt`` with ``weights_only=True`` (no arbitrary unpickling) and check
    every field by type and range (:class:`~pyro_vae.util.errors.CheckpointError` naming it)."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no {CHECKPOINT_FILE}: is it a pyro-vae run folder?")
    size = regular_file(path, error=CheckpointError)
    memory.require(size * COPIES, f"reading {path}")
    try:  # torch's warnings about a foreign pickle precede an error that says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is damaged or not a "
            f"pyro-vae checkpoint ({type(exc).__name__})"
        ) from None
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pyro-vae checkpoint: it lacks {missing}")
    try:
        check_checkpoint(state)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    return state


def load_weights(
    module: torch.nn.Module | torch.optim.Optimizer,
    weights: dict[str, Any],
    run_dir: Path,
    model_class: str | None = None,
) -> None:
    """Load ``weights`` into ``module``; ``model_class`` is the user's class the run recorded.
    A model's weights that are NaN or infinite are refused (a run that diverged is never saved,
    so such a checkpoint was damaged or written by something else)."""
    if isinstance(module, torch.nn.Module):
        bad = [
            name
            for name, value in weights.items()
            if torch.is_tensor(value)
            and value.is_floating_point()
            and not torch.isfinite(value).all()
        ]
        if bad:
            raise CheckpointError(
                f"the checkpoint in {run_dir} holds NaN or infinite weights "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                "it cannot be resumed, evaluated or sampled"
            )
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as exc:
        fits = "its config" if model_class is None else f"the given model (it holds {model_class})"
        raise CheckpointError(
            f"the checkpoint in {run_dir} does not fit {fits}: {_one_line(exc)}"
        ) from None
