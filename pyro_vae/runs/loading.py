"""Reading a run back: its config, its pair (rebuilt from the config, a recorded factory or a
given module) and its data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_vae.core.pairs import PyroPair, as_pair, is_pair_module
from pyro_vae.data import images as data_lib
from pyro_vae.data.batches import Source, as_source, resolve_device
from pyro_vae.data.builtin import build_model, eval_source, prepare_data
from pyro_vae.data.specs import call_factory, load_data
from pyro_vae.runs.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_CLASS_KEY,
    History,
    load_checkpoint,
    load_weights,
    user_model_refusal,
)
from pyro_vae.runs.config import TrainConfig
from pyro_vae.util.errors import CheckpointError, ConfigError
from pyro_vae.util.files import read_json
from pyro_vae.util.io import reason


def run_folder(run_dir: str | Path) -> Path:
    """``run_dir`` as a path, refused in one line unless it is a folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} is a file, not a run folder"
            if run_dir.exists()
            else f"run folder {run_dir} does not exist"
        )
    return run_dir


def check_same_config(run_dir: Path, saved: TrainConfig, config: TrainConfig) -> None:
    """Refuse to resume the run in ``run_dir``, whose config is ``saved``, with a ``config``
    that differs in more than what may change on resume (epochs, device, data_dir)."""
    if (
        saved.replace(epochs=config.epochs, device=config.device, data_dir=config.data_dir)
        != config
    ):
        raise CheckpointError(
            f"the config of {run_dir} differs from the one given: only "
            "epochs, device and data_dir may change on resume"
        )


def check_resumable(
    state: dict[str, Any], config: TrainConfig, run_dir: Path, given_model: bool
) -> None:
    """Refuse to resume ``state`` with a different ``config`` (only epochs, device and
    data_dir may change) or a user's pair without the pair."""
    saved = TrainConfig.from_dict(state["config"])
    check_same_config(run_dir, saved, config)
    saved_class = state.get(MODEL_CLASS_KEY)
    if saved_class is not None and not given_model:
        raise user_model_refusal(run_dir, saved_class)


def read_config(run_dir: str | Path) -> TrainConfig:
    """The :class:`~pyro_vae.train.TrainConfig` saved in a run folder's ``config.json``."""
    return read_run_config(run_dir)[0]


def read_run_config(
    run_dir: str | Path, prefer_checkpoint: bool = False
) -> tuple[TrainConfig, str | None]:
    """The saved config and the user's model class the run recorded (``None``: a package
    family, which the config describes).

    Read from ``config.json``; from the checkpoint when ``config.json`` is missing (a
    checkpoint holds the config too) or, with ``prefer_checkpoint``, whenever there is one (the
    source of truth, as resuming wants). Every field is checked by type and range."""
    run_dir = run_folder(run_dir)
    path = run_dir / CONFIG_FILE
    if (run_dir / CHECKPOINT_FILE).exists() and (prefer_checkpoint or not path.exists()):
        state = load_checkpoint(run_dir)
        return TrainConfig.from_dict(state["config"]), state.get(MODEL_CLASS_KEY)
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} holds no {CONFIG_FILE} (nor {CHECKPOINT_FILE}): is it "
            "a pyro-vae run folder?"
        )
    try:
        raw = read_json(path, error=CheckpointError)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {reason(exc.errno, str(exc))}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"cannot read {path}: expected a JSON object")
    model_class = raw.pop(MODEL_CLASS_KEY, None)
    if model_class is not None and not isinstance(model_class, str):
        raise CheckpointError(f"cannot read {path}: {MODEL_CLASS_KEY!r} must be a string")
    try:
        return TrainConfig.from_dict(raw), model_class
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def check_config_file(run_dir: str | Path, config: TrainConfig) -> None:
    """Refuse to resume the run in ``run_dir`` from its checkpoint's ``config`` while its
    ``config.json`` is damaged or says otherwise (beyond epochs, device and data_dir, which
    resuming may change): resuming would replace the file without a word."""
    run_dir = run_folder(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.exists() and not path.is_symlink():
        return
    advice = "restore it, or move it aside to resume with the config the checkpoint holds"
    try:
        written, _ = read_run_config(run_dir)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; {advice}") from None
    keep = {"epochs": config.epochs, "device": config.device, "data_dir": config.data_dir}
    if written.replace(**keep) != config:
        fields = [
            name
            for name, value in config.to_dict().items()
            if name not in keep and written.to_dict().get(name) != value
        ]
        raise CheckpointError(
            f"{path} differs from the config its checkpoint holds ({', '.join(fields)}): "
            f"only epochs, device and data_dir may change on resume; {advice}"
        )


def refuse_python_only(run_dir: str | Path, config: TrainConfig, model_class: str | None) -> None:
    """Refuse a run whose pair only Python can rebuild (trained from Python, no factory)."""
    if model_class is not None and config.model_factory is None:
        raise user_model_refusal(Path(run_dir), model_class)


def build_factory_model(spec: str) -> torch.nn.Module:
    """The pair a ``--model-factory`` spec returns when called with no arguments."""
    model = call_factory(spec)
    if isinstance(model, tuple) and len(model) == 2 and all(map(callable, model)):
        return as_pair(model)
    if not is_pair_module(model):
        raise ConfigError(
            f"{spec} returned an object of type {type(model).__name__}, not a model/guide pair "
            "(a torch.nn.Module with model and guide methods, or a (model, "
            "guide) tuple)"
        )
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
        from pyro_vae.data.builtin import evaluation_images

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
        spec = self.config.data if split == "train" else (self.config.test_data or self.config.data)
        if spec is None or (
            split == "test" and not self.config.test_data and load_data(spec)[1] is None
        ):
            given = "data=SPEC" if split == "train" else "test_data=SPEC"
            raise ConfigError(
                f"{self.run_dir} records no {given} for its {split} split (its "
                "data were given in Python): pass the data to evaluate"
            )
        train, test = load_data(spec)
        source = as_source(train if split == "train" or self.config.test_data else test)
        param = next(self.model.parameters())
        return source.head(limit).to(param.device, param.dtype)


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")


def _discover(
    pair: PyroPair, config: TrainConfig, dataset: data_lib.Dataset | None, device: torch.device
) -> None:
    """Run a :class:`~pyro_vae.core.pairs.PyroPair` once on two datapoints of the run's training
    data (where the run records them), so that the parameters it creates lazily exist before
    its weights are loaded; without data its ``pyro.param`` entries are loaded when first
    read."""
    from pyro_vae.data.builtin import evaluation_images, model_args

    if dataset is not None:
        pair.discover(
            *model_args(
                pair, evaluation_images(dataset, "train", config)[:2], dataset.train.labels[:2]
            )
        )
        return
    if config.data is None:
        return
    first = next(iter(as_source(load_data(config.data)[0]).to(device).ordered(2)))
    pair.discover(*first.args, **first.kwargs)


def load_run(
    run_dir: str | Path, device: str = "auto", data_dir: str | None = None, *, model: Any = None
) -> LoadedRun:
    """Load the config, weights and data of a run folder (``data_dir`` overrides the saved one).

    The package's families are rebuilt from the config, a pair trained from the command line
    from its recorded ``--model-factory``. A run of a pair trained from Python needs ``model``,
    a fresh instance of that class built as for training, into which the weights are loaded;
    without it such a run raises :class:`~pyro_vae.util.errors.CheckpointError` (the command
    line's one-line refusal). ``model`` may also be a ``(model, guide)`` pair in any form
    :func:`~pyro_vae.fit` takes; a :class:`~pyro_vae.core.pairs.PyroPair` is first run on two
    datapoints of the run's training data (its parameters exist only after a run). The model
    is returned in eval mode."""
    model = as_pair(model)
    run_dir = run_folder(run_dir)
    config, model_class = read_run_config(run_dir)
    if model is None and model_class is not None:
        refuse_python_only(run_dir, config, model_class)
    torch_device = resolve_device(device)
    state = load_checkpoint(run_dir, map_location=torch_device)
    config = TrainConfig.from_dict(state["config"])  # the source of truth; checked on loading
    if model is None and model_class is not None:
        model = build_factory_model(config.model_factory)
    if data_dir is not None:
        config = config.replace(data_dir=data_dir)
    dataset = prepare_data(config, torch_device) if config.dataset is not None else None
    if model is None:
        model = build_model(dataset, config, device=torch_device)
    model = model.to(torch_device)
    if isinstance(model, PyroPair):
        _discover(model, config, dataset, torch_device)
    load_weights(model, state["model"], run_dir, model_class)
    model.eval()
    return LoadedRun(run_dir, config, model, History.from_dict(state["history"]), dataset)


# --- the writer of a run folder -------------------------------------------------------------
