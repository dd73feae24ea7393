"""A run's configuration: :class:`TrainConfig`, every field that determines a training run (and
so is saved with it, as the run folder's ``config.json``), checked on creation, its estimator
against :mod:`pyro_vae.infer`'s registry."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

import torch

from pyro_vae.infer import ESTIMATORS, LinearWarmup, make_estimator
from pyro_vae.models.config import BINARIZATIONS, DATASETS, DEVICES, ModelConfig, check_seed
from pyro_vae.util.errors import ConfigError, check_count
from pyro_vae.util.optimizers import OPTIMIZERS, SCHEDULERS, make_optimizer, make_scheduler

#: the estimators a run may name (:data:`pyro_vae.infer.ESTIMATORS`)
ELBOS = ESTIMATORS
#: the fields of a :class:`TrainConfig` that count something, with their least values
COUNTS = {
    "particles": 1,
    "importance_samples": 1,
    "warmup": 0,
    "eval_particles": 1,
    "final_particles": 0,
    "patience": 1,
    "estimate_every": 1,
    "epochs": 1,
    "batch_size": 1,
}
#: the counts that may be ``None``
OPTIONAL_COUNTS = ("patience", "estimate_every")
#: its fields that are real numbers (their ranges checked after their types)
NUMBERS = ("beta", "warmup_start", "min_delta", "lr", "clip_norm")


#: the most epochs of a scheduler :func:`check_optimizer` steps through
SCHEDULE_CHECKED = 1000


def _check_options(field_name: str, options: Any) -> None:
    scalar = (bool, int, float, str)
    if not isinstance(options, dict) or not all(
        isinstance(key, str)
        and (
            isinstance(value, scalar)
            or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
        )
        for key, value in options.items()
    ):
        raise ConfigError(
            f"{field_name} must map option names to numbers, booleans, strings or lists "
            f"of numbers, got {options!r}"
        )
    for key, value in options.items():
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(
                f"the option {key!r} of {field_name}={options!r} must be finite, got {value!r}"
            )


def _refused(what: str, exc: Exception) -> ConfigError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{what} is refused by torch: {reason}")


def check_optimizer(
    name: str,
    options: Any,
    lr: float,
    scheduler: str | None = None,
    scheduler_options: Any = None,
    epochs: int = 1,
) -> None:
    """Refuse, in one line, an optimizer or scheduler that torch does not have or would not
    build with these options (tried on one parameter), options that are not finite numbers,
    and a scheduler that would make the learning rate negative or not finite in the first
    ``epochs`` epochs (stepped that many times, at most :data:`SCHEDULE_CHECKED`; a
    ``reducelronplateau`` only lowers it to its ``min_lr``)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {name!r}")
    _check_options("optimizer_options", options)
    if "lr" in options or "params" in options:
        raise ConfigError("optimizer_options may not hold lr or params: give lr itself")
    try:
        optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], lr, name, options)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _refused(f"optimizer={name!r} with optimizer_options={options!r}", exc) from None
    if scheduler is None:
        if scheduler_options:
            raise ConfigError("scheduler_options are a scheduler's: give scheduler=NAME")
        return
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {scheduler!r}")
    _check_options("scheduler_options", scheduler_options)
    what = f"scheduler={scheduler!r} with scheduler_options={scheduler_options!r}"
    try:
        schedule = make_scheduler(optimizer, scheduler, scheduler_options)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise _refused(what, exc) from None
    if scheduler == "reducelronplateau":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepped without an optimizer step
        for epoch in range(1, min(epochs, SCHEDULE_CHECKED) + 1):
            try:
                schedule.step()
            except (TypeError, ValueError, RuntimeError, ZeroDivisionError, OverflowError) as exc:
                raise _refused(what, exc) from None
            rate = float(optimizer.param_groups[0]["lr"])
            if not 0 <= rate < math.inf:
                raise ConfigError(
                    f"{what} makes the learning rate {rate:g} after epoch {epoch}: it must "
                    "stay a finite number >= 0"
                )


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (and so must be saved with it).

    ``elbo`` names the estimator (:data:`pyro_vae.infer.ESTIMATORS`), ``elbo_options`` its own
    keyword options (``{"alpha": 0.5}`` for ``renyi``: :func:`~pyro_vae.infer.make_estimator`'s
    ``options``); ``particles`` is the number of draws averaged per datapoint outside the log
    (variance), ``importance_samples`` the number inside it (the bound: ``iwae``, ``dreg``,
    ``renyi``, ...). ``beta`` weights the rate (KL) term;
    with ``warmup`` > 0 it rises linearly from ``warmup_start`` to ``beta`` over that many steps.
    ``eval_particles`` is the number of particles of the per-epoch test ELBO (closed-form KL);
    ``final_particles`` the K of the importance-weighted test log p̂_K(x) reported at the end
    (0: none); with ``estimate_every`` N, the held-out log p̂_K(x), its gap, ESS and k-hat, and
    the rate and distortion are also estimated every N epochs and before the first
    (:mod:`pyro_vae.train.estimates`). ``patience`` stops the run early after that many epochs
    without an improvement of the held-out ELBO by more than ``min_delta`` nats per datapoint
    (``None``: by more than its paired standard error; :mod:`pyro_vae.train.early_stopping`);
    ``None``: every epoch runs.

    ``optimizer`` names a :mod:`torch.optim` optimizer in lower case (``"adam"``, ``"adamw"``,
    ``"sgd"``, ...: :data:`~pyro_vae.util.optimizers.OPTIMIZERS`) built with ``lr`` and its
    keyword ``optimizer_options`` (numbers, booleans, strings or lists of numbers: ``{"momentum":
    0.9}``); ``clip_norm`` scales each step's gradients down to that total norm when they exceed
    it (``None``: not clipped). ``scheduler`` names a :mod:`torch.optim.lr_scheduler` scheduler
    in lower case (``"steplr"``, ``"cosineannealinglr"``, ``"reducelronplateau"``, ...:
    :data:`~pyro_vae.util.optimizers.SCHEDULERS`) with its keyword ``scheduler_options``,
    stepped after every epoch (``reducelronplateau`` on the held-out ELBO, else the training
    loss); ``None``: the learning rate stays ``lr``.

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
    elbo_options: dict[str, Any] = field(default_factory=dict)
    particles: int = 1
    importance_samples: int = 1
    beta: float = 1.0
    warmup: int = 0
    warmup_start: float = 0.01
    eval_particles: int = 10
    final_particles: int = 100
    estimate_every: int | None = None
    patience: int | None = None
    min_delta: float | None = None
    epochs: int = 100
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    scheduler: str | None = None
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, minimum in COUNTS.items():  # whole numbers first: 2.5 or True is no count
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                check_count(name, value, minimum, optional=name in OPTIONAL_COUNTS)
        for name in NUMBERS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        checks = [
            (
                self.dataset is None or self.dataset in DATASETS,
                f"dataset must be one of {DATASETS} (or None for data given to fit), got "
                f"{self.dataset!r}",
            ),
            (
                self.dataset is not None or (self.model is None and self.binarize == "none"),
                "a run on the user's own data has no model family and no binarization: "
                "model=None, binarize='none' (transform the data in its Dataset)",
            ),
            (
                self.dataset is None or not (self.data or self.test_data),
                "data and test_data are for the user's own data: they need dataset=None",
            ),
            (
                self.binarize in BINARIZATIONS,
                f"binarize must be one of {BINARIZATIONS}, got {self.binarize!r}",
            ),
            (self.elbo in ELBOS, f"elbo must be one of {ELBOS}, got {self.elbo!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (self.particles >= 1, f"particles must be >= 1, got {self.particles}"),
            (self.eval_particles >= 1, f"eval_particles must be >= 1, got {self.eval_particles}"),
            (
                self.final_particles >= 0,
                f"final_particles must be >= 0, got {self.final_particles}",
            ),
            (
                self.estimate_every is None or self.estimate_every >= 1,
                f"estimate_every must be >= 1 (or None), got {self.estimate_every}",
            ),
            (
                self.estimate_every is None or self.final_particles >= 1,
                f"estimate_every={self.estimate_every} estimates log p̂_K with "
                "K = final_particles: it needs final_particles >= 1",
            ),
            (
                self.patience is None or self.patience >= 1,
                f"patience must be >= 1 (or None), got {self.patience}",
            ),
            (
                self.min_delta is None or self.patience is not None,
                f"min_delta={self.min_delta} is early stopping's: it needs patience=EPOCHS",
            ),
            (
                self.min_delta is None or 0 <= self.min_delta < float("inf"),
                f"min_delta={self.min_delta} must be finite and >= 0",
            ),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (0 < self.lr < math.inf, f"lr must be > 0 and finite, got {self.lr}"),
            (
                self.clip_norm is None or 0 < self.clip_norm < float("inf"),
                f"clip_norm={self.clip_norm} must be a finite number > 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_seed(self.seed)
        if self.model is not None and (
            (self.model.likelihood == "bernoulli") == (self.binarize == "none")
        ):
            raise ConfigError(
                'a Bernoulli likelihood needs binary data (binarize="dynamic" or '
                'binarize="fixed") and a Gaussian one needs the intensities '
                '(binarize="none")'
            )
        check_optimizer(
            self.optimizer,
            self.optimizer_options,
            self.lr,
            self.scheduler,
            self.scheduler_options,
            self.epochs,
        )
        _check_options("elbo_options", self.elbo_options)
        make_estimator(
            self.elbo, self.particles, self.importance_samples, self.beta, options=self.elbo_options
        )
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
                    isinstance(v, int) and not isinstance(v, bool) for v in value
                )
                wanted = "a list of whole numbers"
                value = tuple(value) if ok else value
            else:
                return value
            if not ok:
                raise ConfigError(
                    f"config field {name} must be {wanted}"
                    f"{' or null' if optional else ''}, got {shown(value)}"
                )
            return value

        def checked(raw: Any, fields: tuple, prefix: str = "") -> dict[str, Any]:
            names = {f.name: f for f in fields}
            unknown = set(raw) - set(names)
            if unknown:
                raise ConfigError(f"unknown {prefix and 'model '}config keys: {sorted(unknown)}")
            return {
                key: typed(prefix + key, value, str(names[key].type)) for key, value in raw.items()
            }

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
