"""The run folder: one package owns its files and the rules for writing and reading them
(:mod:`~pyro_vae.runs.checkpoint`, :mod:`~pyro_vae.runs.loading`, :mod:`~pyro_vae.runs.folder`).

A run folder holds ``config.json``, ``history.json``, ``checkpoint.pt`` (model, optimizer, random
states, history and config; loadable with ``torch.load(weights_only=True)``), ``model.safetensors``
(the weights alone) and the PNG plots. Every file is written atomically, and each epoch's
checkpoint, weights, history and config are renamed into place together
(:func:`~pyro_vae.util.io.atomic_files`): a failed write (a full disk, say) leaves the last complete
set. The checkpoint is the source of truth: ``config.json`` mirrors its config (and is rebuilt
from it when missing), and every field of both is checked by type and range before use.

A process writing a run (:func:`open_run_folder`, which :func:`~pyro_vae.fit` enters) holds an
exclusive :func:`fcntl.flock` lock on the folder's ``.lock`` file for its lifetime
(:mod:`~pyro_vae.runs.lock`): a second writer is refused in one line, and a lock left by a
process that died is released by the operating system with the process, so it never goes
stale. The lock file names its writer; one of another content is never touched.

A run of a pair that is not one of the package's families records the pair's class under
``"model_class"`` (the config's ``model`` entry does not describe it). When the command line
trained it, the config also records the ``model_factory`` and the data specs, which rebuild the
pair and its data; a run trained from Python with in-memory data is rebuilt by passing a fresh
pair (``load_run(run_dir, model=...)``) and, to evaluate it, the data.
"""

from pyro_vae.runs.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_KEYS,
    CONFIG_FILE,
    HISTORY_FILE,
    LOCK_FILE,
    TRAINING_FILES,
    WEIGHTS_FILE,
    History,
    finished_epoch,
    load_checkpoint,
    load_weights,
    read_history,
    rng_state,
    save_checkpoint,
    set_generator_state,
    set_rng_state,
    user_model_class,
    write_history,
)
from pyro_vae.runs.checkpoint_checks import MODEL_CLASS_KEY, check_checkpoint
from pyro_vae.runs.config import ELBOS, TrainConfig
from pyro_vae.runs.evaluation import KEEP_LOG_WEIGHTS_MAX, SPLITS, EvalConfig, evaluate_run
from pyro_vae.runs.folder import (
    RunFolder,
    check_run_folder_path,
    open_run_folder,
    sweep_temporary_files,
)
from pyro_vae.runs.loading import (
    LoadedRun,
    build_factory_model,
    check_config_file,
    check_resumable,
    load_run,
    read_config,
    read_run_config,
    refuse_python_only,
)
from pyro_vae.runs.lock import RunFolderLock

__all__ = [
    "ELBOS",
    "TrainConfig",
    "KEEP_LOG_WEIGHTS_MAX",
    "SPLITS",
    "EvalConfig",
    "evaluate_run",
    "CHECKPOINT_FILE",
    "CHECKPOINT_KEYS",
    "CONFIG_FILE",
    "HISTORY_FILE",
    "LOCK_FILE",
    "MODEL_CLASS_KEY",
    "TRAINING_FILES",
    "WEIGHTS_FILE",
    "History",
    "LoadedRun",
    "RunFolder",
    "RunFolderLock",
    "build_factory_model",
    "check_checkpoint",
    "check_resumable",
    "check_run_folder_path",
    "finished_epoch",
    "load_checkpoint",
    "load_run",
    "load_weights",
    "open_run_folder",
    "read_config",
    "read_history",
    "read_run_config",
    "check_config_file",
    "refuse_python_only",
    "rng_state",
    "save_checkpoint",
    "set_generator_state",
    "set_rng_state",
    "sweep_temporary_files",
    "user_model_class",
    "write_history",
]
