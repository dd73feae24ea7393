"""Defaults, in one place: frozen dataclasses for the model and for a training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .objectives import ESTIMATORS as ELBOS
from .objectives import LinearWarmup, make_estimator

DATASETS = ("digits", "mnist")
BINARIZATIONS = ("dynamic", "fixed", "none")
DEVICES = ("auto", "cpu", "cuda")
SCALE_FNS = ("softplus", "exp")
MODEL_FAMILIES = ("vae", "cvae")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`~pyro_vae.models.VAE`.

    ``hidden`` lists the widths of the encoder's hidden layers; the decoder mirrors them.
    ``scale_fn`` maps the encoder's raw output to the guide's standard deviation.
    ``family`` is ``"vae"`` or ``"cvae"`` (conditioned on the label).
    """

    family: str = "vae"
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    scale_fn: str = "softplus"

    def __post_init__(self) -> None:
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden layer sizes must be >= 1, got {list(self.hidden)}")
        if self.family not in MODEL_FAMILIES:
            raise ConfigError(f"model must be one of {MODEL_FAMILIES}, got {self.family!r}")
        if self.scale_fn not in SCALE_FNS:
            raise ConfigError(f"scale_fn must be one of {SCALE_FNS}, got {self.scale_fn!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so must be saved with it).

    ``elbo`` names the estimator (:data:`pyro_vae.objectives.ESTIMATORS`); ``particles`` is the
    number of draws averaged per datapoint outside the log (variance), ``importance_samples`` the
    number inside it (the bound: ``iwae`` and ``dreg`` only). ``beta`` weights the rate (KL) term;
    with ``warmup`` > 0 it rises linearly from ``warmup_start`` to ``beta`` over that many steps.
    ``eval_particles`` is the number of particles of the per-epoch test ELBO (closed-form KL);
    ``final_particles`` the K of the importance-weighted test log p̂_K(x) reported at the end
    (0: none).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    binarize: str = "dynamic"
    model: ModelConfig = field(default_factory=ModelConfig)
    elbo: str = "meanfield"
    particles: int = 1
    importance_samples: int = 1
    beta: float = 1.0
    warmup: int = 0
    warmup_start: float = 0.01
    eval_particles: int = 10
    final_particles: int = 100
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        checks = [
            (self.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {self.dataset!r}"),
            (self.binarize in BINARIZATIONS,
             f"binarize must be one of {BINARIZATIONS}, got {self.binarize!r}"),
            (self.elbo in ELBOS, f"elbo must be one of {ELBOS}, got {self.elbo!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.eval_particles >= 1, f"eval_particles must be >= 1, got {self.eval_particles}"),
            (self.final_particles >= 0,
             f"final_particles must be >= 0, got {self.final_particles}"),
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        make_estimator(self.elbo, self.particles, self.importance_samples, self.beta)
        LinearWarmup(self.warmup, self.warmup_start, self.beta)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model"]["hidden"] = list(self.model.hidden)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainConfig":
        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        model = raw.pop("model", {})
        if not isinstance(model, dict):
            raise ConfigError("config key 'model' must be a mapping")
        model_known = {f.name for f in dataclasses.fields(ModelConfig)}
        if set(model) - model_known:
            raise ConfigError(f"unknown model config keys: {sorted(set(model) - model_known)}")
        if "hidden" in model:
            model["hidden"] = tuple(model["hidden"])
        return cls(model=ModelConfig(**model), **raw)


def data_dir_path(config: TrainConfig) -> Path | None:
    return Path(config.data_dir) if config.data_dir else None
