"""Train the same VAE with each ELBO estimator and compare bounds, likelihoods and gradient SNR.

For every seed and estimator (``trace``, ``meanfield``, ``iwae``, ``stl``, ``dreg``) the same
pair is trained by the package's training engine, :func:`pyro_vae.fit`: one initial model per
seed, deep-copied for each estimator (the same initial weights), the same data in the same order
(``fit`` draws the order, and the per-epoch binarization, from the seed), Adam on
``model.parameters()``, Pyro validation off, on ``--device``, for ``--epochs`` epochs. With
``--warmup`` STEPS, β rises linearly from ``TrainConfig.warmup_start`` (as in ``pyro-vae
train``) to ``--beta`` over STEPS steps. Two callbacks of the engine watch each run: the test
log p̂_K curve (K = ``--curve-particles``, before training, every ``--eval-every`` epochs and at
the last epoch, on a fork of the random state), and, with ``--time-budget SECONDS``, a budget
that sets ``loop.stop`` once the run's training time reaches SECONDS: the engine stops between
epochs, so each run trains whole epochs, the last one finishing past the budget.

Data, two ways:

- the built-in images (``--dataset digits``, the default, or ``mnist`` with ``--data-dir``) and
  the built-in VAE (``--latent-dim``, ``--hidden``, ``--likelihood``) or a pair of your own made
  by ``--model-factory FILE.py:FUNCTION`` called as ``FUNCTION(input_dim, name)``.
  ``--binarize`` names the data as ``pyro-vae train`` does: ``dynamic`` (the default for a
  Bernoulli likelihood) trains on a fresh Bernoulli draw of the training images every epoch,
  ``fixed`` on one seeded draw (the one the train bound uses, the same for every seed), ``none``
  (the default with ``--likelihood gaussian``) on the intensities. The evaluation sets are a
  fixed binarization of the training and test images, or with ``none`` the intensities;
- your own data, ``--data DATA [--test-data DATA]`` with ``--model-factory FILE.py:FUNCTION``,
  exactly as ``pyro-vae train`` takes them: FUNCTION is called with no arguments,
  ``FUNCTION()``, and DATA is a ``.npz`` or ``.pt`` file or ``FILE.py:FUNCTION`` returning data
  in any form ``fit`` takes (a tensor or array, a tuple or dict of them, a Dataset, a
  DataLoader), or a ``(train, test)`` pair of them. The data are used as they are, for
  training and evaluation alike; a test set is needed (``--test-data``, or the pair's second
  part). ``--binarize``, ``--likelihood``, ``--latent-dim``, ``--hidden``, ``--dataset`` and
  ``--data-dir`` describe the built-in images and VAE and are refused with ``--data``.

Then, per run:

``train bound``
    the estimator's own bound per datapoint on the evaluation training set
    (the ELBO for trace/meanfield/stl, the K-sample IWAE bound for iwae/dreg);
``test ELBO``, ``test log p̂_K``, ``gap``
    from :func:`pyro_vae.evaluate.evaluate_dataset` with ``--eval-particles`` K on the
    evaluation test set (the same for every run);
``active units``
    latent dimensions whose posterior mean (the pair's ``encode``) varies over the test images
    by more than 0.01 (Burda et al. 2016); n/a for a pair without ``encode`` and on ``--data``;
``SNR enc``, ``SNR dec``
    gradient signal-to-noise ratio |E g| / std g per parameter element (Rainforth et al. 2018)
    from ``--snr-draws`` gradient draws at the final parameters on one fixed training batch
    (the first ``--batch-size`` datapoints), averaged over the encoder's (the parameters the
    guide's density depends on) / decoder's (the others) elements; n/a for a group with no
    parameter, e.g. the decoder of a pair whose guide uses every parameter;
``steps/s``
    training steps per second of training time (the engine's epoch times; evaluation
    excluded). The engine computes ``trace`` and ``meanfield`` steps of the built-in VAE with
    its fused loss (the same numbers as Pyro's traces, faster); ``--traced`` runs every step
    through Pyro's traces, as ``pyro-vae train --traced`` does.

With several ``--seeds`` the table shows mean ± std over seeds. Also, at the final parameters of
each seed's ``iwae`` run (or its first run), the encoder and decoder SNR and gradient variance
(the mean over elements of var g) of each estimator of ``--snr-estimators`` (comma-separated,
default ``iwae,dreg``; any estimator that takes importance samples) for each K of
``--snr-ks``, averaged over the seeds: K importance samples and ``--particles`` P for the
single-bound estimators, M bounds of K / M draws each for miwae and piwae (M =
``--snr-particles``; n/a where M does not divide K or K / M is below 2, as for any estimator at
a K below its least). Outputs in ``--out`` (written atomically): ``table.md``, ``runs.csv``,
``summary.csv``, ``results.json``, ``snr_vs_k.csv``, ``log_px_vs_epoch.png``, ``snr_vs_k.png``.

    python benchmarks/compare_estimators.py --out bench-estimators  # digits, 3 seeds x 100 epochs
    python benchmarks/compare_estimators.py --seeds 0 --epochs 20 --out /tmp/quick
    python benchmarks/compare_estimators.py --data-dir ~/mnist --eval-particles 5000 --out mnist
    python benchmarks/compare_estimators.py --model-factory my_models.py:build --out mine
    python benchmarks/compare_estimators.py --likelihood gaussian --out gaussian  # intensities
    python benchmarks/compare_estimators.py --model-factory my_models.py:make_pair \\
        --data train.npz --test-data test.npz --out own-data   # make_pair() on your data

On the built-in images a conditional (labelled) pair, ``conditional = True``, is refused: this
benchmark compares estimators of log p(x) on unlabelled images. Bad options, data or factories
give one error line and exit status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine

from pyro_vae.app.options import EXIT_USER_ERROR, OneLineParser, parse_seed
from pyro_vae.core.protocol import check_model
from pyro_vae.data import images as data_lib
from pyro_vae.data.batches import Batch, TensorSource, as_source, resolve_device
from pyro_vae.data.builtin import is_builtin
from pyro_vae.data.specs import load_data as load_data_spec
from pyro_vae.data.specs import load_factory
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.infer import ESTIMATORS, ELBOEstimator, LinearWarmup, make_estimator
from pyro_vae.models.config import (
    BINARIZATIONS,
    DATASETS,
    DEVICES,
    LIKELIHOODS,
    ModelConfig,
    check_seed,
)
from pyro_vae.models.vae import VAE
from pyro_vae.runs import build_factory_model
from pyro_vae.train import Callback, Loop, TrainConfig, fit
from pyro_vae.util.errors import ConfigError, PyroVAEError, TrainingDiverged, check_count
from pyro_vae.util.io import atomic_path, write_json, write_text
from pyro_vae.util.rng import forked_rng

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradient_snr as snr_lib
from gradient_snr import gradient_snr

#: the estimators compared (vimco, on continuous latents, is iwae; the estimators with options
#: of their own, renyi and ciwae, and miwae, piwae and rws, which need importance samples, are
#: not among them)
COMPARED = tuple(
    name for name in ESTIMATORS if name in ("trace", "meanfield", "iwae", "stl", "dreg")
)

INSIDE_LOG = ("iwae", "dreg")
ACTIVE_UNIT_THRESHOLD = 0.01
TRAIN_EVAL_SEED = 0
TEST_EVAL_SEED = 1
EVAL_RNG_OFFSET = 10_000
#: the engine's epoch limit under --time-budget (the budget's callback stops the run first)
BUDGET_EPOCH_LIMIT = 10**9
METRICS = (
    "train_bound",
    "test_elbo",
    "test_log_px",
    "test_gap",
    "active_units",
    "snr_encoder",
    "snr_decoder",
    "steps_per_s",
)
HEADERS = {
    "train_bound": "train bound",
    "test_elbo": "test ELBO",
    "test_log_px": "test log p̂_K",
    "test_gap": "gap",
    "active_units": "active units",
    "snr_encoder": "SNR enc",
    "snr_decoder": "SNR dec",
    "steps_per_s": "steps/s",
}


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every default of the comparison in one place (see the module docstring)."""

    estimators: tuple[str, ...] = COMPARED
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str | None = "digits"
    data_dir: str | None = None
    epochs: int = 100
    time_budget: float | None = None
    batch_size: int = 64
    lr: float = 3e-3
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    particles: int = 1
    importance_samples: int = 5
    beta: float = 1.0
    warmup: int = 0
    warmup_start: float = TrainConfig.warmup_start
    eval_particles: int | None = None
    curve_particles: int = 100
    eval_every: int = 10
    snr_draws: int = 100
    snr_ks: tuple[int, ...] = (1, 5, 10, 50)
    snr_estimators: tuple[str, ...] = INSIDE_LOG
    snr_particles: int = 2
    threads: int = 1
    model_factory: str | None = None
    likelihood: str | None = None
    binarize: str | None = None
    device: str = TrainConfig.device
    data: str | None = None
    test_data: str | None = None
    traced: bool = False

    @property
    def final_eval_particles(self) -> int:
        """K of the final test log p̂_K: 5000 (the paper protocol) on MNIST, else 1000."""
        if self.eval_particles is not None:
            return self.eval_particles
        return 5000 if self.dataset == "mnist" else 1000

    def __post_init__(self) -> None:
        """Every field checked, so a bad value fails before any training (ConfigError).

        ``likelihood`` (built-in VAE only) defaults to the package's, ``binarize`` to
        ``TrainConfig.binarize`` or, for the built-in VAE with a Gaussian likelihood, ``none``;
        the built-in VAE's likelihood and data must agree, as in ``pyro-vae train``. With
        ``data`` (a spec of the user's own data, as ``pyro-vae train --data`` takes it) the run
        has no built-in dataset (``dataset`` becomes ``None``) and no binarization (``none``),
        and needs ``model_factory``."""
        if self.data is not None:
            self._check_user_data()
        elif self.test_data is not None:
            raise ConfigError("test_data is the test set of data: give data too")
        if self.model_factory is not None and self.likelihood is not None:
            raise ConfigError(
                "--likelihood chooses the built-in VAE's likelihood; a "
                "--model-factory pair has its own"
            )
        if self.model_factory is None and self.likelihood is None:
            object.__setattr__(self, "likelihood", ModelConfig.likelihood)
        if self.binarize is None:
            object.__setattr__(
                self, "binarize", "none" if self.likelihood == "gaussian" else TrainConfig.binarize
            )
        for name, value, choices in (
            ("likelihood", self.likelihood, LIKELIHOODS),
            ("binarize", self.binarize, BINARIZATIONS),
            ("device", self.device, DEVICES),
        ):
            if value not in choices and not (name == "likelihood" and value is None):
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        if self.model_factory is None and (self.likelihood == "bernoulli") == (
            self.binarize == "none"
        ):
            raise ConfigError(
                "the built-in VAE with a Bernoulli likelihood needs binary data "
                "(--binarize dynamic or fixed) and with a Gaussian one the "
                "intensities (--binarize none)"
            )
        unknown = sorted(set(self.estimators) - set(COMPARED))
        if unknown or not self.estimators or not self.seeds:
            raise ConfigError(
                f"need seeds and estimators from {COMPARED}; got "
                f"{self.estimators}, seeds {self.seeds}"
            )
        for seed in self.seeds:
            check_seed(seed)
        if self.data is None and self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be {' or '.join(DATASETS)}, got {self.dataset!r}")
        counts = {
            "epochs": 1,
            "batch_size": 1,
            "latent_dim": 1,
            "particles": 1,
            "importance_samples": 1,
            "curve_particles": 1,
            "eval_every": 1,
            "snr_draws": 2,
            "snr_particles": 2,
            "threads": 1,
            "warmup": 0,
        }
        for name, minimum in counts.items():
            check_count(name, getattr(self, name), minimum)
        for name, values in (("hidden", self.hidden), ("snr_ks", self.snr_ks)):
            if not values:
                raise ConfigError(f"{name} needs at least one value")
            for value in values:
                check_count(name, value)
        if self.eval_particles is not None:
            check_count("eval_particles", self.eval_particles)
        _check_real("lr", self.lr, strictly_positive=True)
        _check_real("beta", self.beta, strictly_positive=False)
        if self.time_budget is not None:
            _check_real("time_budget", self.time_budget, strictly_positive=True)
        object.__setattr__(self, "snr_estimators", snr_lib.check_estimators(self.snr_estimators))
        warmup_schedule(self)

    def _check_user_data(self) -> None:
        if self.model_factory is None:
            raise ConfigError(
                "--data needs --model-factory FILE.py:FUNCTION (the pair to train "
                "on it; FUNCTION() is called with no arguments)"
            )
        if (
            self.likelihood is not None
            or self.binarize not in (None, "none")
            or self.data_dir is not None
        ):
            raise ConfigError(
                "likelihood, binarize and data_dir describe the built-in images "
                "and VAE: data are used as they are"
            )
        object.__setattr__(self, "dataset", None)
        object.__setattr__(self, "binarize", "none")

    def importance_samples_of(self, name: str) -> int:
        return self.importance_samples if name in INSIDE_LOG else 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["final_eval_particles"] = self.final_eval_particles
        return out


def _check_real(name: str, value: Any, strictly_positive: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (strictly_positive and value == 0)
    ):
        relation = "> 0" if strictly_positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {relation}, got {value!r}")


def warmup_schedule(config: BenchmarkConfig) -> LinearWarmup:
    """β per step: from ``config.warmup_start`` to ``config.beta`` over ``config.warmup``
    steps (constant ``config.beta`` without warm-up), the schedule of ``pyro-vae train`` (and of
    the engine, which every run trains with)."""
    return LinearWarmup(config.warmup or None, config.warmup_start, config.beta)


# ------------------------------------------------------------------------------ data


@dataclass
class Data:
    """What every run sees. On the built-in images, tensors: ``train`` the training
    intensities, ``train_eval`` / ``test_eval`` the fixed sets every run is evaluated on (a
    seeded binarization, or the intensities with ``none``). On ``--data``, sources of batches
    (:func:`pyro_vae.data.batches.as_source`): ``train`` and ``train_eval`` the training data,
    ``test_eval`` the test data, all used as they are."""

    train: Any
    train_eval: Any
    test_eval: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def images(self) -> bool:
        """Whether these are the built-in images (tensors of flattened images)."""
        return isinstance(self.train, torch.Tensor)

    def cast(self, dtype: torch.dtype) -> Data:
        """The same data with floating-point tensors in ``dtype`` (a pair's parameter dtype)."""

        def to(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value.to(dtype=dtype) if value.is_floating_point() else value
            return value.to(self.device, dtype)

        return Data(to(self.train), to(self.train_eval), to(self.test_eval), self.device)


CPU = torch.device("cpu")


def load_data(config: BenchmarkConfig, device: torch.device = CPU) -> Data:
    """The built-in images of ``config.dataset`` (binarized as ``config.binarize`` says), or the
    user's ``config.data`` / ``config.test_data``, on ``device``."""
    if config.data is not None:
        return load_user_data(config, device)
    dataset = (
        data_lib.load_digits()
        if config.dataset == "digits"
        else data_lib.load_mnist(config.data_dir)
    ).to(device)
    train, test = dataset.train.images, dataset.test.images
    if config.binarize == "none":
        return Data(train=train, train_eval=train, test_eval=test, device=device)
    return Data(
        train=train,
        train_eval=data_lib.fixed_binarization(train, TRAIN_EVAL_SEED),
        test_eval=data_lib.fixed_binarization(test, TEST_EVAL_SEED),
        device=device,
    )


def load_user_data(config: BenchmarkConfig, device: torch.device) -> Data:
    """``--data`` and ``--test-data`` read as ``pyro-vae train`` reads them
    (:func:`pyro_vae.data.specs.load_data`); the test set is ``--test-data`` or the second part of
    a function's ``(train, test)`` pair, and must exist."""
    train, paired = load_data_spec(config.data)
    test = load_data_spec(config.test_data)[0] if config.test_data is not None else paired
    if test is None:
        raise ConfigError(
            f"--data {config.data} holds no test set: give --test-data DATA (the "
            "test ELBO, log p̂_K and curves are scored on it), or a function "
            "returning a (train, test) pair"
        )
    train = as_source(train).to(device)
    return Data(train=train, train_eval=train, test_eval=as_source(test).to(device), device=device)


def _binarize_epoch(tensors: tuple, generator: torch.Generator) -> tuple:
    return (data_lib.binarize(tensors[0], generator),)


def training_source(config: BenchmarkConfig, data: Data) -> Any:
    """What the engine trains on: on the built-in images a source whose every epoch is a
    fresh Bernoulli draw with the engine's seeded generator (``dynamic``), the fixed
    binarization ``data.train_eval`` (``fixed``) or the intensities (``none``); on ``--data``
    the data as they are."""
    if not data.images:
        return data.train
    if config.binarize == "dynamic":
        return TensorSource((data.train,), _binarize_epoch)
    return TensorSource((data.train_eval,))


def epoch_images(config: BenchmarkConfig, data: Data, generator: torch.Generator) -> torch.Tensor:
    """One epoch's training images (before the engine orders them) as
    :func:`training_source` makes them with ``generator``."""
    source = training_source(config, data)
    tensors = (
        source.tensors if source.transform is None else source.transform(source.tensors, generator)
    )
    return tensors[0]


def _first_batch(data: Any, batch_size: int) -> Batch:
    """The first ``batch_size`` datapoints of a tensor or a source, in order."""
    return next(iter(as_source(data).ordered(batch_size)))


def _num_data(data: Any) -> int:
    return as_source(data).num_data


# ------------------------------------------------------------------------------ metrics


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(
        (p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype()
    )


def _nesting(model: torch.nn.Module) -> int | None:
    """The plate nesting the engine uses: the package's models' one data plate, guessed from
    the first call for any other pair."""
    return 1 if is_builtin(model) else None


def _estimator(
    name: str,
    config: BenchmarkConfig,
    importance_samples: int | None = None,
    max_plate_nesting: int | None = 1,
) -> ELBOEstimator:
    k = config.importance_samples_of(name) if importance_samples is None else importance_samples
    return make_estimator(
        name,
        num_particles=config.particles,
        importance_samples=k,
        beta=config.beta,
        max_plate_nesting=max_plate_nesting,
    )


@torch.no_grad()
def test_log_px(
    model: torch.nn.Module, data: Any, particles: int, seed: int, max_plate_nesting: int | None = 1
) -> dict[str, float]:
    """Mean per-datapoint log p̂_K, ELBO and gap (nats) on ``data`` (a tensor of images or a
    source), on a fork of the RNG."""
    with forked_rng():
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        result = evaluate_dataset(
            model.model,
            model.guide,
            data,
            num_particles=particles,
            batch_size=100,
            particle_chunk=500,
            khat=False,
            max_plate_nesting=max_plate_nesting,
        )
    return {
        "test_log_px": result.log_px.mean().item(),
        "test_elbo": result.elbo.mean().item(),
        "test_gap": result.gap.mean().item(),
    }


@torch.no_grad()
def own_bound(
    model: torch.nn.Module, estimator: ELBOEstimator, data: Any, seed: int, batch_size: int = 500
) -> float:
    """The estimator's bound per datapoint over ``data`` (nats); a global latent's term counts
    once over the data (each batch weighs it by its share, as in training)."""
    source = as_source(data)
    total = 0.0
    with forked_rng():
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        try:
            for batch in source.ordered(batch_size):
                estimator.global_weight = batch.size / source.num_data
                total -= estimator.loss(model.model, model.guide, *batch.args, **batch.kwargs)
        finally:
            estimator.global_weight = 1.0
    return total / source.num_data


@torch.no_grad()
def active_units(model: torch.nn.Module, images: torch.Tensor | None) -> float:
    """Latent dimensions whose posterior mean has variance > 0.01 over ``images`` (NaN without
    images or for a model without an ``encode`` method)."""
    if images is None or not callable(getattr(model, "encode", None)):
        return math.nan
    loc, _ = model.encode(images)
    return int((loc.var(0) > ACTIVE_UNIT_THRESHOLD).sum())


# ------------------------------------------------------------------------------ the pairs


def _check_data_fits(model: torch.nn.Module, data: Any, binarize: str | None) -> None:
    """Score ``data`` (a first batch) once under Pyro validation: a pair whose likelihood's
    support misses the data (a Bernoulli pair on intensities, with ``--binarize none``) is
    refused before any training, in one line. ``binarize`` is ``None`` on ``--data``."""
    try:
        with poutine.block(), pyro.validation_enabled(True), forked_rng():
            evaluate_dataset(
                model.model,
                model.guide,
                data,
                num_particles=1,
                khat=False,
                max_plate_nesting=_nesting(model),
            )
    except ValueError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if binarize is None:
            hint = "check that --data is what the pair's likelihood scores"
        else:
            data = "the intensities" if binarize == "none" else "binary (0/1) images"
            hint = (
                f"with --binarize {binarize} the data are {data}: choose the --binarize "
                "that fits the pair's likelihood"
            )
        raise ConfigError(
            f"{type(model).__name__} cannot score the data: {first_line} ({hint})"
        ) from None


def _call_factory(spec: str, build: Callable[..., Any], *args: Any) -> Any:
    """``build(*args)``; a call with the wrong arguments (a factory written for the other
    convention) is one line saying both conventions."""
    try:
        return build(*args)
    except TypeError as exc:
        raise ConfigError(
            f"{spec}: {exc} (--model-factory is called as FUNCTION() with "
            "--data, as FUNCTION(input_dim, name) on the built-in images)"
        ) from None


def initial_model(config: BenchmarkConfig, data: Data, seed: int) -> torch.nn.Module:
    """The seed's initial pair, built after ``torch.manual_seed(seed)`` and moved to the data's
    device; every estimator's run of the seed trains a deep copy of it. With ``--data`` it is
    ``factory()`` (no arguments, as ``pyro-vae train --data`` calls it); with
    ``config.model_factory`` on the built-in images ``factory(input_dim, name)`` (a conditional
    pair is refused); else the built-in VAE."""
    torch.manual_seed(seed)
    device, name = data.device, f"compare-seed{seed}"
    if config.data is not None:
        model = _call_factory(config.model_factory, build_factory_model, config.model_factory)
        check_model(model)
        model = model.to(device)
        data = data.cast(_param_dtype(model))
        first = _first_batch(data.train_eval, 2)
        check_model(model, *first.args, **first.kwargs)
        _check_data_fits(model, as_source(data.train_eval).head(config.batch_size), None)
        return model
    if config.model_factory is not None:
        factory = load_factory(config.model_factory)
        model = _call_factory(config.model_factory, factory, data.train.shape[1], name)
        check_model(model)
        if getattr(model, "conditional", False):
            raise ConfigError(
                f"{type(model).__name__} is a conditional pair (conditional = "
                "True): conditional (labelled) pairs are not supported by this "
                "benchmark, which compares estimators of log p(x) on unlabelled "
                "images"
            )
        model = model.to(device)
        check_model(model, data.train_eval[:2])
        _check_data_fits(model, data.train_eval[: config.batch_size], config.binarize)
    else:
        model = VAE(
            data.train.shape[1],
            config.latent_dim,
            config.hidden,
            likelihood=config.likelihood,
            name=name,
        ).to(device)
    if hasattr(model, "initialize_from_data"):
        model.initialize_from_data(data.train)
    return model


# ------------------------------------------------------------------------------ training


class TimeBudget(Callback):
    """Ends a run (``loop.stop``) after the epoch in which its training time, the sum of the
    engine's epoch times, reaches ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_epoch_end(self, loop: Loop) -> None:
        if sum(loop.history.seconds) >= self.seconds:
            loop.stop = True


class ProbeCurve(Callback):
    """``(epoch, probe(model))`` every ``every`` epochs, at ``last_epoch`` and at the epoch a
    callback before it stopped the run (a time budget)."""

    def __init__(
        self,
        probe: Callable[[torch.nn.Module], float],
        every: int,
        last_epoch: int | None,
        curve: list[tuple[int, float]],
    ) -> None:
        self.probe, self.every, self.last_epoch, self.curve = probe, every, last_epoch, curve

    def on_epoch_end(self, loop: Loop) -> None:
        if loop.epoch % self.every == 0 or loop.stop or loop.epoch == self.last_epoch:
            self.curve.append((loop.epoch, self.probe(loop.model)))


def engine_config(name: str, seed: int, config: BenchmarkConfig) -> TrainConfig:
    """The engine's config of one run: the estimator ``name`` with the comparison's
    optimization settings, on data given to :func:`pyro_vae.fit` (no built-in dataset), no
    final estimate (the benchmark makes its own), and under a time budget an epoch limit that
    the budget reaches first."""
    return TrainConfig(
        dataset=None,
        model=None,
        binarize="none",
        elbo=name,
        particles=config.particles,
        importance_samples=config.importance_samples_of(name),
        beta=config.beta,
        warmup=config.warmup,
        warmup_start=config.warmup_start,
        epochs=(config.epochs if config.time_budget is None else BUDGET_EPOCH_LIMIT),
        batch_size=config.batch_size,
        lr=config.lr,
        seed=seed,
        device=config.device,
        final_particles=0,
    )


def train_run(
    name: str, seed: int, config: BenchmarkConfig, data: Data, initial: torch.nn.Module
) -> dict[str, Any]:
    """Train a deep copy of ``initial`` with estimator ``name`` through :func:`pyro_vae.fit`;
    return its model, metrics and curve."""
    model = copy.deepcopy(initial)
    data = data.cast(_param_dtype(model))
    nesting = _nesting(model)
    pyro.clear_param_store()

    def probe(module: torch.nn.Module) -> float:
        return test_log_px(module, data.test_eval, config.curve_particles, seed, nesting)[
            "test_log_px"
        ]

    curve = [(0, probe(model))]
    callbacks: list[Callback] = (
        [] if config.time_budget is None else [TimeBudget(config.time_budget)]
    )
    callbacks.append(
        ProbeCurve(
            probe, config.eval_every, config.epochs if config.time_budget is None else None, curve
        )
    )
    source = training_source(config, data)
    try:
        history = fit(
            model,
            source,
            config=engine_config(name, seed, config),
            callbacks=callbacks,
            progress=False,
            fused=not config.traced,
        ).history
    except TrainingDiverged as exc:
        raise TrainingDiverged(f"{name}, seed {seed}: {exc}") from None
    epochs = len(history.epoch)
    steps = epochs * as_source(source).steps(config.batch_size)
    train_seconds = sum(history.seconds)
    metrics: dict[str, Any] = {
        "estimator": name,
        "seed": seed,
        "epochs": epochs,
        "steps": steps,
        "train_seconds": train_seconds,
        "steps_per_s": steps / train_seconds,
    }
    estimator = _estimator(name, config, max_plate_nesting=nesting)
    metrics["train_bound"] = own_bound(model, estimator, data.train_eval, seed)
    metrics.update(test_log_px(model, data.test_eval, config.final_eval_particles, seed, nesting))
    metrics["active_units"] = active_units(model, data.test_eval if data.images else None)
    with pyro.validation_enabled(False), forked_rng():
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        metrics.update(
            gradient_snr(
                model,
                estimator,
                _first_batch(data.train_eval, config.batch_size),
                config.snr_draws,
                _num_data(data.train_eval),
            )
        )
    return {"metrics": metrics, "curve": curve, "model": model}


def snr_versus_k(
    model: torch.nn.Module, config: BenchmarkConfig, data: Data, seed: int
) -> dict[str, dict[str, list[float]]]:
    """Encoder/decoder SNR and variance of the gradients of ``config.snr_estimators`` at
    ``model``'s parameters, per K of ``config.snr_ks`` (:func:`gradient_snr.snr_versus_draws`)."""
    data = data.cast(_param_dtype(model))

    def make(name: str, particles: int, samples: int) -> ELBOEstimator:
        return make_estimator(
            name,
            num_particles=particles,
            importance_samples=samples,
            beta=config.beta,
            max_plate_nesting=_nesting(model),
        )

    return snr_lib.snr_versus_draws(
        model,
        make,
        _first_batch(data.train_eval, config.batch_size),
        config.snr_estimators,
        config.snr_ks,
        particles=config.particles,
        multi_particles=config.snr_particles,
        draws=config.snr_draws,
        num_data=_num_data(data.train_eval),
        seed=seed + EVAL_RNG_OFFSET,
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (NaN for one value); both NaN when a value is (a metric n/a)."""
    if any(math.isnan(value) for value in values):
        return math.nan, math.nan
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(runs: list[dict[str, Any]], config: BenchmarkConfig) -> list[dict[str, Any]]:
    rows = []
    for name in config.estimators:
        mine = [run for run in runs if run["estimator"] == name]
        row: dict[str, Any] = {
            "estimator": name,
            "K": config.importance_samples_of(name),
            "P": config.particles,
            "seeds": len(mine),
        }
        for metric in METRICS:
            row[metric], row[f"{metric}_std"] = _mean_std([run[metric] for run in mine])
        rows.append(row)
    return rows


def _format(value: float, std: float, digits: int) -> str:
    if math.isnan(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    digits = {
        "train_bound": 2,
        "test_elbo": 2,
        "test_log_px": 2,
        "test_gap": 2,
        "active_units": 1,
        "snr_encoder": 3,
        "snr_decoder": 3,
        "steps_per_s": 0,
    }
    header = ["estimator", *(HEADERS[m] for m in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        label = row["estimator"] + (f" (K={row['K']})" if row["K"] > 1 else "")
        cells = [_format(row[m], row[f"{m}_std"], digits[m]) for m in METRICS]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _figure(ncols: int = 1) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(5.5 * ncols, 3.8), layout="constrained")


def curve_statistics(
    per_seed: list[list[tuple[int, float]]],
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The epochs that every seed's curve evaluated, and the mean and std over seeds of the
    values at those epochs (std NaN for one seed). With --time-budget, seeds may stop at
    different epochs; each value is matched by its epoch, never by its position."""
    by_epoch = [dict(curve) for curve in per_seed]
    common = sorted(set.intersection(*(set(values) for values in by_epoch)))
    values = torch.tensor(
        [[values[epoch] for epoch in common] for values in by_epoch], dtype=torch.float64
    ).reshape(len(by_epoch), len(common))
    std = values.std(0) if len(by_epoch) > 1 else torch.full((len(common),), math.nan)
    return common, values.mean(0), std


def plot_curves(curves: dict[str, list[list[tuple[int, float]]]], path: Path, k: int) -> None:
    """Test log p̂ against epoch: each seed's own curve (thin), and the mean ± std over seeds at
    the epochs that every seed evaluated (:func:`curve_statistics`)."""
    fig = _figure()
    ax = fig.add_subplot()
    for index, (name, per_seed) in enumerate(curves.items()):
        color = f"C{index}"
        for curve in per_seed:
            ax.plot(
                [epoch for epoch, _ in curve],
                [value for _, value in curve],
                color=color,
                alpha=0.3,
                linewidth=0.8,
            )
        epochs, mean, std = curve_statistics(per_seed)
        ax.plot(epochs, mean.tolist(), color=color, marker=".", label=name)
        if len(per_seed) > 1:
            ax.fill_between(
                epochs, (mean - std).tolist(), (mean + std).tolist(), color=color, alpha=0.2
            )
    ax.set(xlabel="epoch", ylabel=f"test log p̂_K (K = {k}), nats", title="test log-likelihood")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def run_benchmark(config: BenchmarkConfig, progress: bool = True) -> dict[str, Any]:
    """Train and evaluate every (seed, estimator); return everything that gets written."""
    device = resolve_device(config.device)
    torch.set_num_threads(config.threads)
    pyro.clear_param_store()
    data = load_data(config, device)
    runs, curves = [], {name: [] for name in config.estimators}
    snr_runs = []
    started = time.perf_counter()
    for seed in config.seeds:
        initial = initial_model(config, data, seed)
        models = {}
        for name in config.estimators:
            result = train_run(name, seed, config, data, initial)
            runs.append(result["metrics"])
            curves[name].append(result["curve"])
            models[name] = result["model"]
            if progress:
                m = result["metrics"]
                print(
                    f"[{time.perf_counter() - started:6.0f}s] seed {seed} {name:9s} "
                    f"log p̂ {m['test_log_px']:.2f}  ELBO {m['test_elbo']:.2f}  "
                    f"{m['steps_per_s']:.0f} steps/s",
                    file=sys.stderr,
                    flush=True,
                )
        base = models.get("iwae", next(iter(models.values())))
        snr_runs.append(snr_versus_k(base, config, data, seed))
    snr = {
        name: snr_lib.mean_over_seeds([run[name] for run in snr_runs])
        for name in config.snr_estimators
    }
    return {
        "config": config.to_dict(),
        "runs": runs,
        "summary": summarize(runs, config),
        "curves": curves,
        "snr_vs_k": {"K": list(config.snr_ks), **snr},
        "seconds": time.perf_counter() - started,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "pyro": pyro.__version__,
            "platform": platform.platform(),
            "threads": config.threads,
            "device": str(device),
            "gpu": (torch.cuda.get_device_name(device) if device.type == "cuda" else None),
        },
    }


def write_outputs(results: dict[str, Any], out: Path, command: str) -> str:
    table = markdown_table(results["summary"])
    config = results["config"]
    write_text(out / "table.md", f"```\n{command}\n```\n\n{table}")
    write_text(out / "runs.csv", _csv(results["runs"]))
    write_text(out / "summary.csv", _csv(results["summary"]))
    write_json(out / "results.json", {**results, "command": command})
    plot_curves(results["curves"], out / "log_px_vs_epoch.png", config["curve_particles"])
    snr = {name: results["snr_vs_k"][name] for name in config["snr_estimators"]}
    write_text(out / "snr_vs_k.csv", _csv(snr_lib.csv_rows(results["snr_vs_k"])))
    snr_lib.plot_snr(snr, results["snr_vs_k"]["K"], out / "snr_vs_k.png")
    return table


def _number(
    convert: Callable[[str], Any],
    kind: str,
    accepts: Callable[[Any], bool],
    wanted: str,
    show_text: bool,
) -> Callable[[str], Any]:
    """An argparse ``type``: ``convert(text)`` if it converts and ``accepts`` the value, else
    one line, ``expected a {kind}, got 'TEXT'`` or ``expected {wanted}, got X``, X the text as
    typed (``show_text``) or the converted value."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(
                f"expected {wanted}, got {text if show_text else value}"
            )
        return value

    return parse


def _whole(minimum: int) -> Callable[[str], int]:
    return _number(
        int,
        "whole number",
        lambda value: value >= minimum,
        f"a whole number >= {minimum}",
        show_text=False,
    )


def _real(strictly_positive: bool) -> Callable[[str], float]:
    return _number(
        float,
        "number",
        lambda value: (
            math.isfinite(value) and value >= 0 and not (strictly_positive and value == 0)
        ),
        f"a finite number {'> 0' if strictly_positive else '>= 0'}",
        show_text=True,
    )


def _names(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        unknown = [name for name in names if name not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{unknown[0]!r} is no estimator that takes importance samples; choose "
                f"among {', '.join(choices)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchmarkConfig()
    positive = _whole(1)
    p = OneLineParser(prog="compare_estimators.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", nargs="+", choices=COMPARED, default=list(COMPARED))
    p.add_argument("--seeds", nargs="+", type=parse_seed, default=list(defaults.seeds))
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default=None,
        help="built-in images: mnist if --data-dir is given, else digits (the "
        "default); not with --data",
    )
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument(
        "--data",
        metavar="DATA",
        help="your own data instead of the built-in images, as pyro-vae train "
        "--data takes it: a .npz or .pt file, or FILE.py:FUNCTION returning "
        "data or a (train, test) pair; used as it is; needs --model-factory, "
        "whose FUNCTION() is then called with no arguments",
    )
    p.add_argument(
        "--test-data",
        metavar="DATA",
        help="the test set of --data (same forms); needed unless --data's function "
        "returns a (train, test) pair",
    )
    p.add_argument("--epochs", type=positive, default=defaults.epochs)
    p.add_argument(
        "--time-budget",
        type=_real(strictly_positive=True),
        default=None,
        metavar="SECONDS",
        help="equal training wall time per run instead of equal epochs",
    )
    p.add_argument("--batch-size", type=positive, default=defaults.batch_size)
    p.add_argument("--lr", type=_real(strictly_positive=True), default=defaults.lr)
    p.add_argument(
        "--latent-dim", type=positive, help=f"built-in VAE only (default {defaults.latent_dim})"
    )
    p.add_argument(
        "--hidden",
        nargs="+",
        type=positive,
        help=f"built-in VAE only (default {' '.join(map(str, defaults.hidden))})",
    )
    p.add_argument(
        "--particles",
        type=positive,
        default=defaults.particles,
        help="P, averaged outside the log (every estimator)",
    )
    p.add_argument(
        "--importance-samples",
        type=positive,
        default=defaults.importance_samples,
        help="K inside the log (iwae, dreg)",
    )
    p.add_argument(
        "--beta",
        type=_real(strictly_positive=False),
        default=defaults.beta,
        help="weight of the rate (KL) term, >= 0",
    )
    p.add_argument(
        "--warmup",
        type=_whole(0),
        default=defaults.warmup,
        metavar="STEPS",
        help=f"KL warm-up: beta rises linearly from {defaults.warmup_start} (as in "
        "pyro-vae train) to --beta over STEPS optimizer steps (0: constant beta)",
    )
    p.add_argument(
        "--eval-particles",
        type=positive,
        default=None,
        help="K of the final test log p̂_K (default 1000 on digits, 5000 on MNIST)",
    )
    p.add_argument("--curve-particles", type=positive, default=defaults.curve_particles)
    p.add_argument("--eval-every", type=positive, default=defaults.eval_every)
    p.add_argument("--snr-draws", type=_whole(2), default=defaults.snr_draws)
    p.add_argument("--snr-ks", nargs="+", type=positive, default=list(defaults.snr_ks))
    p.add_argument(
        "--snr-estimators",
        type=_names(snr_lib.importance_estimators()),
        default=list(defaults.snr_estimators),
        metavar="NAMES",
        help="comma-separated estimators whose gradient SNR and variance are measured "
        f"against --snr-ks (default {','.join(defaults.snr_estimators)}); any of "
        f"{', '.join(snr_lib.importance_estimators())}",
    )
    p.add_argument(
        "--snr-particles",
        type=_whole(2),
        default=defaults.snr_particles,
        metavar="M",
        help=f"M of {' and '.join(snr_lib.MULTI_BOUND)} in the SNR against K: M bounds of "
        f"K / M draws each, for a K of --snr-ks that M divides (default {defaults.snr_particles})",
    )
    p.add_argument("--threads", type=positive, default=defaults.threads)
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=defaults.device,
        help=f"auto: cuda when a GPU is available, else cpu; default {defaults.device}",
    )
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default=None,
        help="of the built-in VAE: bernoulli (binary pixels; the default) or "
        "gaussian (intensities, a learned standard deviation); not with "
        "--model-factory",
    )
    p.add_argument(
        "--binarize",
        choices=BINARIZATIONS,
        default=None,
        help="training data: dynamic (a fresh Bernoulli draw every epoch), fixed (one "
        "seeded draw) or none (the intensities; evaluation on the intensities "
        f"too); default {TrainConfig.binarize}, none with --likelihood gaussian",
    )
    p.add_argument(
        "--model-factory",
        metavar="MODULE:FUNCTION",
        help="compare on your own pair, an nn.Module with model/guide methods (see "
        "pyro_vae.core.protocol); MODULE may be a .py file. On the built-in images "
        "FUNCTION(input_dim, name) builds it; with --data FUNCTION() (no "
        "arguments, as pyro-vae train calls it)",
    )
    p.add_argument(
        "--traced",
        action="store_true",
        help="run every step through Pyro's traces, as pyro-vae train --traced: "
        "without it the engine computes trace and meanfield steps of the "
        "built-in VAE with its fused loss (the same numbers, faster)",
    )
    p.add_argument("--out", type=Path, required=True)
    return p


def parse_args(
    argv: Sequence[str] | None, parser: argparse.ArgumentParser | None = None
) -> tuple[BenchmarkConfig, Path]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    if args.test_data is not None and args.data is None:
        parser.error("--test-data is the test set of --data: give --data too")
    if args.data is not None:
        if args.model_factory is None:
            parser.error(
                "--data needs --model-factory FILE.py:FUNCTION (the pair to train on "
                "it; FUNCTION() is called with no arguments)"
            )
        given = [
            flag
            for flag, value in (
                ("--dataset", args.dataset),
                ("--data-dir", args.data_dir),
                ("--binarize", args.binarize),
                ("--likelihood", args.likelihood),
                ("--latent-dim", args.latent_dim),
                ("--hidden", args.hidden),
            )
            if value is not None
        ]
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            parser.error(
                f"{', '.join(given)} {verb} the built-in images and VAE, not --data: "
                "your data are used as they are, with the pair of --model-factory"
            )
    dataset = (
        None
        if args.data is not None
        else (args.dataset or ("mnist" if args.data_dir else "digits"))
    )
    if args.model_factory is not None:
        given = [
            flag
            for flag, value in (("--latent-dim", args.latent_dim), ("--hidden", args.hidden))
            if value is not None
        ]
        if given:
            parser.error(
                f"{' and '.join(given)} size the built-in VAE; a --model-factory pair "
                "is built by its factory"
            )
    defaults = BenchmarkConfig()
    latent_dim = defaults.latent_dim if args.latent_dim is None else args.latent_dim
    hidden = defaults.hidden if args.hidden is None else tuple(args.hidden)
    try:
        config = BenchmarkConfig(
            estimators=tuple(dict.fromkeys(args.estimators)),
            seeds=tuple(dict.fromkeys(args.seeds)),
            dataset=dataset,
            data_dir=args.data_dir,
            epochs=args.epochs,
            time_budget=args.time_budget,
            batch_size=args.batch_size,
            lr=args.lr,
            latent_dim=latent_dim,
            hidden=hidden,
            particles=args.particles,
            importance_samples=args.importance_samples,
            beta=args.beta,
            warmup=args.warmup,
            eval_particles=args.eval_particles,
            curve_particles=args.curve_particles,
            eval_every=args.eval_every,
            snr_draws=args.snr_draws,
            snr_ks=tuple(args.snr_ks),
            snr_estimators=tuple(args.snr_estimators),
            snr_particles=args.snr_particles,
            threads=args.threads,
            model_factory=args.model_factory,
            likelihood=args.likelihood,
            binarize=args.binarize,
            device=args.device,
            data=args.data,
            test_data=args.test_data,
            traced=args.traced,
        )
    except PyroVAEError as exc:
        parser.error(str(exc))
    return config, args.out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; bad options, data or model factories give one error line and exit
    status 2, before anything is written."""
    parser = build_parser()
    config, out = parse_args(argv, parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/compare_estimators.py", *argv])
    try:
        results = run_benchmark(config)
        table = write_outputs(results, out, command)
    except PyroVAEError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(table)
    print(f"{results['seconds']:.0f} s; results in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
