"""The folder a run is written to: one writer at a time (a lock), a path checked before any
training, temporary files swept, and the folder left clean when a run ends before its first
checkpoint."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from pyro_vae.runs.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    MODEL_CLASS_KEY,
    TRAINING_FILES,
    load_checkpoint,
    user_model_class,
)
from pyro_vae.runs.config import TrainConfig
from pyro_vae.runs.loading import check_same_config, read_run_config, refuse_python_only
from pyro_vae.runs.lock import RunFolderLock
from pyro_vae.util import child_report, tempnames
from pyro_vae.util.errors import CheckpointError, ConfigError
from pyro_vae.util.files import read_json
from pyro_vae.util.io import DISK_FULL, WriteError, reason, write_json


def sweep_temporary_files(run_dir: Path) -> list[str]:
    """Remove the temporary files that an interrupted writer left in ``run_dir`` (those of
    :mod:`pyro_vae.util.tempnames`' format whose process is gone; no file of another name); return
    their names."""
    return tempnames.sweep(run_dir)


#: The files of a run folder that are its run's: those training writes, and the lock.
RUN_FILES = (*TRAINING_FILES, LOCK_FILE)


def is_run_file(path: str | Path) -> bool:
    """Whether ``path`` is one of :data:`RUN_FILES` in a folder that holds a run (a checkpoint
    or a config.json; a folder without them holds the user's files only)."""
    path = Path(path)
    folder = path.parent
    holds_run = (folder / CHECKPOINT_FILE).exists() or (folder / CONFIG_FILE).exists()
    return holds_run and path.name in RUN_FILES


def _is_own_entry(entry: str) -> bool:
    """The lock this process holds, and temporary files of pyro-vae's format."""
    return entry == LOCK_FILE or tempnames.writer_of(entry) is not None


#: What a file of the folder that the run is about to write is renamed to (a number is added
#: when that name is taken too).
KEPT_SUFFIX = ".orig"


def _keep_aside(path: Path) -> list[tuple[Path, Path]]:
    """Rename the files of a new run's folder that bear the names of the run's files (the
    user's: a folder without a config.json holds no run) out of the run's way; return the
    (original, kept) pairs after saying so in one line."""
    present = [name for name in TRAINING_FILES if os.path.lexists(path / name)]
    moved = []
    for name in present:
        kept = path / f"{name}{KEPT_SUFFIX}"
        number = 2
        while os.path.lexists(kept):
            kept, number = path / f"{name}{KEPT_SUFFIX}-{number}", number + 1
        try:
            os.rename(path / name, kept)
        except OSError as exc:
            _put_back(moved)
            raise CheckpointError(
                f"cannot keep {path / name} aside: {reason(exc.errno, str(exc))}"
            ) from None
        moved.append((path / name, kept))
    if moved:
        print(
            f"pyro-vae: {path} holds {', '.join(name for name in present)}, which the run "
            f"writes: kept as {', '.join(kept.name for _, kept in moved)}",
            file=sys.stderr,
            flush=True,
        )
    return moved


def _put_back(moved: list[tuple[Path, Path]]) -> None:
    for original, kept in moved:
        try:
            os.replace(kept, original)
        except OSError:
            pass


def _create_folder(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and its missing parents; return the folders created, deepest first."""
    missing = []
    current = run_dir
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno == errno.EEXIST:
            raise CheckpointError(
                f"the run folder {run_dir} is a file, not a folder: choose a folder for the run"
            ) from None
        raise CheckpointError(
            f"cannot create the run folder {run_dir}: {reason(exc.errno, str(exc))}"
        ) from None
    return missing


def check_run_folder_path(run_dir: str | Path | None) -> Path:
    """``run_dir`` as a :class:`~pathlib.Path`, refusing an empty one (an unset shell variable
    would otherwise make it the current folder) and an existing file."""
    if run_dir is None or str(run_dir).strip() == "":
        raise CheckpointError(
            "the run folder is an empty path (an unset shell variable?): name a folder for the run"
        )
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise CheckpointError(
            f"the run folder {path} is a file, not a folder: choose a folder for the run"
        )
    return path


@dataclass
class RunFolder:
    """A run folder this process writes: :func:`open_run_folder`'s answer. ``resume`` says
    whether training continues from the folder's checkpoint (a folder whose config.json was
    written but whose first epoch never finished restarts from epoch 1)."""

    path: Path
    resume: bool


def _last_epoch(run_dir: Path) -> int | None:
    try:
        epochs = read_json(run_dir / HISTORY_FILE)["epoch"]
        return int(epochs[-1]) if epochs else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _check_restart(run_dir: Path, config: TrainConfig, model: torch.nn.Module | None) -> None:
    """A folder stopped before its first checkpoint restarts with its own config only."""
    saved, saved_class = read_run_config(run_dir)
    check_same_config(run_dir, saved, config)
    if model is None and saved_class is not None:
        refuse_python_only(run_dir, config, saved_class)


@contextmanager
def open_run_folder(
    run_dir: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    force: bool = False,
    model: torch.nn.Module | None = None,
    writer: bool = True,
) -> Iterator[RunFolder]:
    """Check, lock and prepare a run folder for the training that runs inside the block.

    Before anything is trained: the path may not be empty or a file; a new run's folder is
    created, and may not hold a run (a checkpoint, or the config.json of a run stopped before
    its first checkpoint: resume those) nor, unless ``force``, other files; a resumed one must
    hold a checkpoint or a config.json. The writer (``writer``: rank 0, or the only process)
    holds :class:`RunFolderLock` for the whole block, removes the temporary files of an
    interrupted writer on entry and its own on every exit, rebuilds a missing config.json from
    the checkpoint, and writes a new run's config.json before training starts. If the block
    ends, by an error or an interruption, before the first checkpoint, that config.json and the
    folders created are removed again (a start that trained nothing leaves no trace); a process
    killed outright leaves it (unless the program watching it removes it, told of the lock and
    the folders created: :mod:`pyro_vae.util.child_report`), and then the folder is a run
    stopped before its first checkpoint, which ``resume`` trains from epoch 1. Other ranks only
    check."""
    path = check_run_folder_path(run_dir)
    checkpoint, config_file = path / CHECKPOINT_FILE, path / CONFIG_FILE
    if not writer:
        if not resume and checkpoint.exists():
            raise ConfigError(
                f"{path} already holds a run: resume it with resume=True or "
                "choose another run_dir=DIR"
            )
        yield RunFolder(path, resume and checkpoint.exists())
        return
    if resume and not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a run folder"
            if path.exists()
            else f"run folder {path} does not exist"
        )
    created = [] if resume else _create_folder(path)
    try:
        lock = RunFolderLock(path).acquire()
    except BaseException:
        _remove_created(created)
        raise
    wrote_config, kept_aside = False, []
    try:
        sweep_temporary_files(path)
        if resume:
            if checkpoint.exists():
                if not config_file.exists():
                    state = load_checkpoint(path)
                    recorded = (
                        {MODEL_CLASS_KEY: state[MODEL_CLASS_KEY]}
                        if MODEL_CLASS_KEY in state
                        else {}
                    )
                    write_json(config_file, {**state["config"], **recorded})
                folder = RunFolder(path, True)
            elif config_file.exists():
                _check_restart(path, config, model)
                folder = RunFolder(path, False)
            else:
                raise CheckpointError(
                    f"{path} holds no {CONFIG_FILE} (nor {CHECKPOINT_FILE}): "
                    "is it a pyro-vae run folder?"
                )
        else:
            if checkpoint.exists():
                raise ConfigError(
                    f"{path} already holds a run: resume it with resume=True "
                    "or choose another run_dir=DIR"
                )
            if config_file.exists():
                raise ConfigError(
                    f"{path} already holds a run that stopped before its first "
                    f"checkpoint ({CONFIG_FILE}, no {CHECKPOINT_FILE}): resume "
                    "it with resume=True, which trains it from epoch 1, or "
                    "choose another run_dir=DIR"
                )
            others = sorted(entry for entry in os.listdir(path) if not _is_own_entry(entry))
            if others and not force:
                shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
                raise ConfigError(
                    f"{path} holds {len(others)} other file(s) ({shown}) and no "
                    "pyro-vae run: choose a new or empty run_dir=DIR, or give "
                    "force=True to write the run among them"
                )
            kept_aside = _keep_aside(path)
            child_report.kept_aside(kept_aside, checkpoint, [config_file])
            model_class = None if model is None else user_model_class(model, config)
            recorded = {} if model_class is None else {MODEL_CLASS_KEY: model_class}
            write_json(config_file, {**config.to_dict(), **recorded})
            wrote_config = True
            child_report.created_run_folder(created, [config_file])
            folder = RunFolder(path, False)
        try:
            yield folder
        except WriteError as exc:
            if exc.errno not in DISK_FULL:
                raise
            epoch = _last_epoch(path) if checkpoint.exists() else None
            kept = (
                f"the run folder keeps its last complete epoch ({epoch}): free some space "
                "and resume it"
                if epoch is not None
                else "no epoch was saved"
            )
            raise WriteError(f"{exc}; {kept}", exc.errno) from exc
    except BaseException:  # an error or an interruption before the first checkpoint
        if not checkpoint.exists():
            if wrote_config:
                config_file.unlink(missing_ok=True)
            _put_back(kept_aside)
        raise
    finally:
        sweep_temporary_files(path)
        lock.release()
        _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    for folder_path in created:
        try:
            folder_path.rmdir()  # only if empty: a failed start leaves no trace
        except OSError:
            break
