"""pyro_vae: variational autoencoders as first-class Pyro model/guide pairs."""

from .config import ModelConfig, TrainConfig
from .data import Dataset, Split, load_dataset, load_digits, load_mnist
from .errors import (CheckpointError, ConfigError, DataError, PyroVAEError,
                     TrainingDiverged)
from .models import VAE
from .train import History, LoadedRun, TrainResult, load_run, make_elbo, train
from .traces import ParticleLogProbs, vectorized_log_probs

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Dataset", "History", "LoadedRun",
    "ModelConfig", "ParticleLogProbs", "PyroVAEError", "Split", "TrainConfig", "TrainResult",
    "TrainingDiverged", "VAE", "load_dataset", "load_digits", "load_mnist", "load_run",
    "make_elbo", "train", "vectorized_log_probs",
]
