"""Defaults, in one place: frozen dataclasses for the model and for a training run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyro_vae.infer import ALL_ESTIMATORS as ELBOS
from pyro_vae.infer import LinearWarmup, make_estimator
from pyro_vae.util.errors import ConfigError

DATASETS = ("digits", "mnist")
BINARIZATIONS = ("dynamic", "fixed", "none")
DEVICES = ("auto", "cpu", "cuda")
SCALE_FNS = ("softplus", "exp")
MODEL_FAMILIES = ("vae", "cvae", "vae2", "vampprior")
LIKELIHOODS = ("bernoulli", "gaussian")
GUIDES = ("diagonal", "full")
ACTIVATION_NAMES = ("softplus", "tanh", "relu")
SEED_LIMIT = 2 ** 32


def check_seed(seed: int) -> int:
    """``seed`` if torch, numpy and Python's ``random`` all accept it (0 ≤ seed < 2³²)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be a whole number in 0..{SEED_LIMIT - 1}, got {seed!r}")
    return seed


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model family (:func:`pyro_vae.train.build_model`).

    ``family``: ``"vae"``, ``"cvae"`` (conditioned on the label), ``"vae2"`` (two stochastic
    layers) or ``"vampprior"`` (the prior a mixture of the guide at ``pseudo_inputs`` learned
    inputs). ``hidden`` lists the widths of the encoder's hidden layers; the decoder mirrors them.
    ``likelihood``: ``"bernoulli"`` (binary pixels) or ``"gaussian"`` with a fixed standard
    deviation ``obs_scale`` or, with ``obs_scale=None``, a learned one shared by all pixels.
    ``guide``: ``"diagonal"`` or ``"full"`` covariance. ``scale_fn`` maps raw encoder outputs to
    standard deviations. ``latent2_dim`` and ``hidden2`` size the second stochastic layer of
    ``vae2`` (z1 → z2).
    """

    family: str = "vae"
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    scale_fn: str = "softplus"
    likelihood: str = "bernoulli"
    obs_scale: float | None = None
    guide: str = "diagonal"
    activation: str = "softplus"
    latent2_dim: int = 4
    hidden2: tuple[int, ...] = (64,)
    pseudo_inputs: int = 500

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "hidden2", tuple(int(h) for h in self.hidden2))
        checks = [
            (self.family in MODEL_FAMILIES,
             f"model must be one of {MODEL_FAMILIES}, got {self.family!r}"),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (self.latent2_dim >= 1, f"latent2_dim must be >= 1, got {self.latent2_dim}"),
            (all(h >= 1 for h in self.hidden + self.hidden2),
             f"hidden layer sizes must be >= 1, got {list(self.hidden)} and {list(self.hidden2)}"),
            (self.scale_fn in SCALE_FNS,
             f"scale_fn must be one of {SCALE_FNS}, got {self.scale_fn!r}"),
            (self.likelihood in LIKELIHOODS,
             f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}"),
            (self.guide in GUIDES, f"guide must be one of {GUIDES}, got {self.guide!r}"),
            (self.activation in ACTIVATION_NAMES,
             f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}"),
            (self.obs_scale is None or self.obs_scale > 0,
             f"obs_scale must be > 0 (or None to learn it), got {self.obs_scale}"),
            (self.obs_scale is None or self.likelihood == "gaussian",
             "obs_scale is the Gaussian likelihood's standard deviation: it needs "
             "--likelihood gaussian"),
            (self.family != "vae2" or self.guide == "diagonal",
             "the two-layer vae2 has diagonal Gaussian layers only: use --guide diagonal"),
            (self.family != "vampprior" or self.guide == "diagonal",
             "the vampprior's prior mixes diagonal Gaussians: use --guide diagonal"),
            (isinstance(self.pseudo_inputs, int) and not isinstance(self.pseudo_inputs, bool)
             and self.pseudo_inputs >= 1,
             f"pseudo_inputs must be an integer >= 1, got {self.pseudo_inputs!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so must be saved with it).

    ``elbo`` names the estimator (:data:`pyro_vae.infer.ALL_ESTIMATORS`); ``particles`` is the
    number of draws averaged per datapoint outside the log (variance), ``importance_samples`` the
    number inside it (the bound: ``iwae`` and ``dreg`` only). ``beta`` weights the rate (KL) term;
    with ``warmup`` > 0 it rises linearly from ``warmup_start`` to ``beta`` over that many steps.
    ``eval_particles`` is the number of particles of the per-epoch test ELBO (closed-form KL);
    ``final_particles`` the K of the importance-weighted test log p̂_K(x) reported at the end
    (0: none).

    ``dataset`` names a built-in dataset (``"digits"``, ``"mnist"``) or is ``None`` for data the
    user gives (:func:`pyro_vae.fit`); such a run has no ``model`` family (its pair is the
    user's) and no ``binarize`` step (``"none"``: the data arrive as they are). ``data``,
    ``test_data`` and ``model_factory`` record the command line's ``--data``, ``--test-data`` and
    ``--model-factory`` specs, so that a run can be resumed and evaluated without retyping them.
    """

    dataset: str | None = "digits"
    data_dir: str | None = None
    binarize: str = "dynamic"
    model: ModelConfig | None = field(default_factory=ModelConfig)
    data: str | None = None
    test_data: str | None = None
    model_factory: str | None = None
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
            (self.dataset is None or self.dataset in DATASETS,
             f"dataset must be one of {DATASETS} (or None for data given to fit), got "
             f"{self.dataset!r}"),
            (self.dataset is not None or (self.model is None and self.binarize == "none"),
             "a run on the user's own data has no model family and no binarization: "
             "model=None, binarize='none' (transform the data in its Dataset)"),
            (self.dataset is None or not (self.data or self.test_data),
             "data and test_data are for the user's own data: they need dataset=None"),
            (self.binarize in BINARIZATIONS,
             f"binarize must be one of {BINARIZATIONS}, got {self.binarize!r}"),
            (self.elbo in ELBOS, f"elbo must be one of {ELBOS}, got {self.elbo!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.eval_particles >= 1, f"eval_particles must be >= 1, got {self.eval_particles}"),
            (self.final_particles >= 0,
             f"final_particles must be >= 0, got {self.final_particles}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_seed(self.seed)
        if self.model is not None and (
                (self.model.likelihood == "bernoulli") == (self.binarize == "none")):
            raise ConfigError(
                "a Bernoulli likelihood needs binary data (--binarize dynamic or fixed) and a "
                "Gaussian one needs the intensities (--binarize none)")
        make_estimator(self.elbo, self.particles, self.importance_samples, self.beta)
        LinearWarmup(self.warmup, self.warmup_start, self.beta)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.model is not None:
            out["model"]["hidden"] = list(self.model.hidden)
            out["model"]["hidden2"] = list(self.model.hidden2)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """The config of a saved ``to_dict`` (a run's config.json or checkpoint): every field
        is checked by type (a :class:`~pyro_vae.util.errors.ConfigError` naming it) before the
        ranges the dataclasses check."""
        import json
        import math

        def shown(value: Any) -> str:
            try:
                text = json.dumps(value)
            except (TypeError, ValueError):
                return f"a {type(value).__name__}"
            return text if len(text) <= 40 else f"a {type(value).__name__}"

        def typed(name: str, value: Any, annotation: str) -> Any:
            optional = annotation.endswith(" | None")
            kind = annotation.removesuffix(" | None")
            if value is None and optional:
                return None
            whole = isinstance(value, int) and not isinstance(value, bool)
            number = (whole or isinstance(value, float)) and math.isfinite(value)
            if kind == "int":
                ok, wanted = whole, "a whole number"
            elif kind == "float":
                ok, wanted = number, "a finite number"
            elif kind == "str":
                ok, wanted = isinstance(value, str), "a string"
            elif kind == "tuple[int, ...]":
                ok = isinstance(value, (list, tuple)) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value)
                wanted = "a list of whole numbers"
                value = tuple(value) if ok else value
            else:
                return value
            if not ok:
                raise ConfigError(f"config field {name} must be {wanted}"
                                  f"{' or null' if optional else ''}, got {shown(value)}")
            return value

        def checked(raw: Any, fields: tuple, prefix: str = "") -> dict[str, Any]:
            names = {f.name: f for f in fields}
            unknown = set(raw) - set(names)
            if unknown:
                raise ConfigError(f"unknown {prefix and 'model '}config keys: {sorted(unknown)}")
            return {key: typed(prefix + key, value, str(names[key].type))
                    for key, value in raw.items()}

        raw = dict(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}")
        model = raw.pop("model", {})
        raw = checked(raw, tuple(f for f in dataclasses.fields(cls) if f.name != "model"))
        if model is None:
            return cls(model=None, **raw)
        if not isinstance(model, dict):
            raise ConfigError(f"config field model must be a mapping or null, got {shown(model)}")
        model = checked(model, dataclasses.fields(ModelConfig), "model.")
        return cls(model=ModelConfig(**model), **raw)


def data_dir_path(config: TrainConfig) -> Path | None:
    return Path(config.data_dir) if config.data_dir else None
