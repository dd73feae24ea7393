"""pyro_vae: variational inference for latent-variable models as first-class Pyro model/guide
pairs: one training engine (:func:`fit`) for any pair on any data, six ELBO estimators, and a
per-datapoint evaluator.

The names below are imported on first use (PEP 562), so ``import pyro_vae`` is instant and the
command line can answer Ctrl-C during its own start-up with one line."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # name: the module it comes from, bottom layer first
    **dict.fromkeys(
        ("CheckpointError", "ConfigError", "DataError", "PyroVAEError", "TrainingDiverged"),
        "util.errors",
    ),
    **dict.fromkeys(("ParticleLogProbs", "vectorized_log_probs"), "core.log_probs"),
    "check_model": "core.protocol",
    "make_estimator": "infer",
    "VAE": "models.vae",
    "ModelConfig": "models.config",
    "TrainConfig": "runs",
    **dict.fromkeys(
        ("Dataset", "Split", "as_source", "load_dataset", "load_digits", "load_mnist"), "data"
    ),
    "evaluate_dataset": "evaluate",
    **dict.fromkeys(("History", "LoadedRun", "load_run", "read_config"), "runs"),
    **dict.fromkeys(("Callback", "TrainResult", "fit", "RunOptions"), "train"),
}

#: modules re-exported under a short name: ``pyro_vae.lightning.PairModule``
_MODULES = {"lightning": "lightning"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        value = importlib.import_module(f".{_MODULES[name]}", __name__)
        globals()[name] = value
        return value
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pyro_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS, *_MODULES])
