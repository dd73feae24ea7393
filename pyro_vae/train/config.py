"""How :func:`~pyro_vae.train.fit` runs a configuration: :class:`RunOptions` (saved nowhere;
what the run computes is the :class:`~pyro_vae.runs.config.TrainConfig`'s)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunOptions:
    """How :func:`~pyro_vae.train.fit` runs a :class:`~pyro_vae.runs.config.TrainConfig`: none
    of it changes what the run computes (``compile`` up to float rounding), and none of it is
    saved with the run.

    The run folder: ``run_dir`` receives the config, history, checkpoint and weights after
    every epoch; ``resume`` continues the run saved there; ``force`` lets a new run take a
    folder that holds other files. The hooks: ``callbacks``
    (:class:`~pyro_vae.train.Callback`) and ``on_epoch(epoch, history)`` run after each epoch's
    checkpoint; ``progress`` shows a bar over the epochs. The engine: ``fused`` computes the
    built-in VAE's loss with :class:`~pyro_vae.train.fused.FusedLoss` where it can (``False``: every
    step through Pyro's traces); ``compile`` captures and compiles each step
    (:mod:`pyro_vae.train.compiled`); ``download`` fetches the MNIST files if they are missing;
    ``dist_timeout`` bounds, in seconds, the wait for torchrun's other ranks. ``log`` names a
    logger of the run's curves (:data:`~pyro_vae.train.loggers.LOGGERS`: ``"tensorboard"``,
    event files in the run folder's ``tensorboard/``; ``"mlflow"``, an MLflow run in the
    tracking store ``log_uri``, by default :mod:`pyro_vae.train.mlflow_logger`'s; ``"wandb"``,
    a W&B run, offline in the run folder's ``wandb/`` unless ``WANDB_MODE`` says otherwise:
    :mod:`pyro_vae.train.wandb_logger`).
    """

    run_dir: str | Path | None = None
    resume: bool = False
    force: bool = False
    callbacks: Sequence[Any] = ()
    on_epoch: Callable[[int, Any], None] | None = None
    progress: bool = True
    fused: bool = True
    compile: bool = False
    download: bool = False
    dist_timeout: float | None = None
    log: str | None = None
    log_uri: str | None = None

    def replace(self, **changes: Any) -> RunOptions:
        return dataclasses.replace(self, **changes)


#: the :class:`RunOptions` fields :func:`~pyro_vae.train.fit` also takes as keywords
FIT_KEYWORDS = (
    "run_dir",
    "resume",
    "force",
    "callbacks",
    "progress",
    "fused",
    "compile",
    "log",
    "log_uri",
)
