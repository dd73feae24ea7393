"""pyro_vae: variational inference for latent-variable models as first-class Pyro model/guide
pairs: one training engine (:func:`fit`) for any pair on any data, five ELBO estimators, and a
per-datapoint evaluator."""

from .batches import as_source
from .config import ModelConfig, TrainConfig
from .data import Dataset, Split, load_dataset, load_digits, load_mnist
from .errors import (CheckpointError, ConfigError, DataError, PyroVAEError,
                     TrainingDiverged)
from .evaluate import evaluate_dataset
from .models import VAE
from .protocol import check_model
from .runs import History, LoadedRun, load_run, read_config
from .traces import ParticleLogProbs, vectorized_log_probs
from .train import Callback, TrainResult, fit, make_elbo

__version__ = "0.1.0"

__all__ = [
    "Callback", "CheckpointError", "ConfigError", "DataError", "Dataset", "History",
    "LoadedRun", "ModelConfig", "ParticleLogProbs", "PyroVAEError", "Split", "TrainConfig",
    "TrainResult", "TrainingDiverged", "VAE", "as_source", "check_model",
    "evaluate_dataset", "fit", "load_dataset", "load_digits", "load_mnist", "load_run",
    "make_elbo", "read_config", "vectorized_log_probs",
]
