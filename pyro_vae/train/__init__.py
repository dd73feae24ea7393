"""The training engine: :func:`fit` trains any model/guide pair on any data.

- :mod:`~pyro_vae.train.config`: :class:`TrainConfig`, what determines a run;
- :mod:`~pyro_vae.train.step`: the estimator, the optimizer and one SVI step;
- :mod:`~pyro_vae.train.loop`: the epochs, knowing nothing of files or ranks, and the
  :class:`Callback` interface;
- :mod:`~pyro_vae.train.callbacks`: progress bar, run-folder checkpoint, final estimate, plots;
- :mod:`~pyro_vae.train.parallel`: data parallelism around the step and the data;
- :mod:`~pyro_vae.train.sources`: the built-in images or the user's data, each with its
  default model;
- :mod:`~pyro_vae.train.engine`: :func:`fit`, which puts them together.

The run folder's files are :mod:`pyro_vae.runs`'s. The names below are imported on first use
(PEP 562), so that the run folders' code can import :mod:`~pyro_vae.train.config` without the
engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Batches": "loop", "Callback": "loop", "HeldOut": "loop", "Loop": "loop", "Step": "loop",
    "run_epochs": "loop", "RunOptions": "config",
    "TrainConfig": "config", "TrainResult": "engine", "fit": "engine", "make_elbo": "step",
    "make_optimizer": "step", "svi_step": "step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
