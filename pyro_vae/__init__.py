"""pyro_vae: variational inference for latent-variable models as first-class Pyro model/guide
pairs: one training engine (:func:`fit`) for any pair on any data, five ELBO estimators, and a
per-datapoint evaluator.

The names below are imported on first use (PEP 562), so ``import pyro_vae`` is instant and the
command line can answer Ctrl-C during its own start-up with one line."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "as_source": "data.batches", "ModelConfig": "models.config", "TrainConfig": "models.config",
    "Dataset": "data.images", "Split": "data.images", "load_dataset": "data.images", "load_digits": "data.images",
    "load_mnist": "data.images", "CheckpointError": "util.errors", "ConfigError": "util.errors",
    "DataError": "util.errors", "PyroVAEError": "util.errors", "TrainingDiverged": "util.errors",
    "evaluate_dataset": "evaluate", "VAE": "models.vae", "check_model": "core.protocol",
    "History": "runs", "LoadedRun": "runs", "load_run": "runs", "read_config": "runs",
    "ParticleLogProbs": "core.log_probs", "vectorized_log_probs": "core.log_probs", "Callback": "train",
    "TrainResult": "train", "fit": "train", "make_elbo": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
