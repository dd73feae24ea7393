"""Train the same VAE with each ELBO estimator and compare bounds, likelihoods and gradient SNR.

For every seed and estimator (``trace``, ``meanfield``, ``iwae``, ``stl``, ``dreg``) the same
VAE (same initial weights, same data order and same training images) is trained for the same
number of epochs (or, with ``--time-budget``, for the same training wall time) by a plain torch
loop: ``estimator.differentiable_loss(model.model, model.guide, batch) / B``, backward,
``torch.optim.Adam`` on ``model.parameters()``, Pyro validation off, on ``--device``. With
``--warmup`` STEPS, β rises linearly from ``TrainConfig.warmup_start`` (as in ``pyro-vae
train``) to ``--beta`` over STEPS steps.

``--binarize`` names the data as ``pyro-vae train`` does: ``dynamic`` (the default for a
Bernoulli likelihood) trains on a fresh Bernoulli draw of the training images every epoch,
``fixed`` on one seeded draw (the one the train bound uses, the same for every seed), ``none``
(the default for the built-in VAE with ``--likelihood gaussian``) on the intensities. The
evaluation sets are a fixed binarization of the training and test images, or with ``none`` the
intensities themselves. Then, per run:

``train bound``
    the estimator's own bound per datapoint on the evaluation training set
    (the ELBO for trace/meanfield/stl, the K-sample IWAE bound for iwae/dreg);
``test ELBO``, ``test log p̂_K``, ``gap``
    from :func:`pyro_vae.evaluate.evaluate_dataset` with ``--eval-particles`` K on the
    evaluation test set (the same for every run);
``active units``
    latent dimensions whose posterior mean varies over the test set by more than 0.01
    (Burda et al. 2016);
``SNR enc``, ``SNR dec``
    gradient signal-to-noise ratio |E g| / std g per parameter element (Rainforth et al. 2018)
    from ``--snr-draws`` gradient draws at the final parameters on one fixed training batch,
    averaged over the encoder's / decoder's elements;
``steps/s``
    training steps per second of training time (evaluation excluded).

With several ``--seeds`` the table shows mean ± std over seeds. Also, at the final parameters of
each seed's ``iwae`` run (or its first run), the encoder and decoder SNR of the iwae and dreg
gradients for each K of ``--snr-ks``. Outputs in ``--out`` (written atomically): ``table.md``,
``runs.csv``, ``summary.csv``, ``results.json``, ``log_px_vs_epoch.png``, ``snr_vs_k.png``.

    python benchmarks/compare_estimators.py --out bench-estimators  # digits: 325 s, 2 busy cores
    python benchmarks/compare_estimators.py --seeds 0 --epochs 20 --out /tmp/quick
    python benchmarks/compare_estimators.py --data-dir ~/mnist --eval-particles 5000 --out mnist
    python benchmarks/compare_estimators.py --model-factory my_models.py:build --out mine
    python benchmarks/compare_estimators.py --likelihood gaussian --out gaussian  # intensities

A conditional (labelled) pair, ``conditional = True``, is refused: this benchmark compares
estimators of log p(x) on unlabelled images.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import pyro
import torch
from pyro import poutine

from pyro_vae import data as data_lib
from pyro_vae.cli import EXIT_USER_ERROR, OneLineParser, parse_seed
from pyro_vae.config import (BINARIZATIONS, DATASETS, DEVICES, LIKELIHOODS, ModelConfig,
                             TrainConfig, check_seed)
from pyro_vae.errors import ConfigError, PyroVAEError
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.io import atomic_path, write_json, write_text
from pyro_vae.models import VAE
from pyro_vae.infer import ESTIMATORS, ELBOEstimator, LinearWarmup, make_estimator
from pyro_vae.protocol import check_model, guide_parameters
from pyro_vae.specs import load_factory
from pyro_vae.batches import resolve_device
from pyro_vae.train import svi_step

INSIDE_LOG = ("iwae", "dreg")
ACTIVE_UNIT_THRESHOLD = 0.01
TRAIN_EVAL_SEED = 0
TEST_EVAL_SEED = 1
EVAL_RNG_OFFSET = 10_000
METRICS = ("train_bound", "test_elbo", "test_log_px", "test_gap", "active_units",
           "snr_encoder", "snr_decoder", "steps_per_s")
HEADERS = {"train_bound": "train bound", "test_elbo": "test ELBO",
           "test_log_px": "test log p̂_K", "test_gap": "gap", "active_units": "active units",
           "snr_encoder": "SNR enc", "snr_decoder": "SNR dec", "steps_per_s": "steps/s"}


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every default of the comparison in one place (see the module docstring)."""

    estimators: tuple[str, ...] = ESTIMATORS
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset: str = "digits"
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
    threads: int = 1
    model_factory: str | None = None
    likelihood: str | None = None
    binarize: str | None = None
    device: str = TrainConfig.device

    @property
    def final_eval_particles(self) -> int:
        """K of the final test log p̂_K: 1000 on digits, 5000 (the paper protocol) on MNIST."""
        if self.eval_particles is not None:
            return self.eval_particles
        return 1000 if self.dataset == "digits" else 5000

    def __post_init__(self) -> None:
        """Every field checked, so a bad value fails before any training (ConfigError).

        ``likelihood`` (built-in VAE only) defaults to the package's, ``binarize`` to
        ``TrainConfig.binarize`` or, for the built-in VAE with a Gaussian likelihood, ``none``;
        the built-in VAE's likelihood and data must agree, as in ``pyro-vae train``."""
        if self.model_factory is not None and self.likelihood is not None:
            raise ConfigError("--likelihood chooses the built-in VAE's likelihood; a "
                              "--model-factory pair has its own")
        if self.model_factory is None and self.likelihood is None:
            object.__setattr__(self, "likelihood", ModelConfig.likelihood)
        if self.binarize is None:
            object.__setattr__(self, "binarize", "none" if self.likelihood == "gaussian"
                               else TrainConfig.binarize)
        for name, value, choices in (("likelihood", self.likelihood, LIKELIHOODS),
                                     ("binarize", self.binarize, BINARIZATIONS),
                                     ("device", self.device, DEVICES)):
            if value not in choices and not (name == "likelihood" and value is None):
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
        if self.model_factory is None and \
                (self.likelihood == "bernoulli") == (self.binarize == "none"):
            raise ConfigError("the built-in VAE with a Bernoulli likelihood needs binary data "
                              "(--binarize dynamic or fixed) and with a Gaussian one the "
                              "intensities (--binarize none)")
        unknown = sorted(set(self.estimators) - set(ESTIMATORS))
        if unknown or not self.estimators or not self.seeds:
            raise ConfigError(f"need seeds and estimators from {ESTIMATORS}; got "
                              f"{self.estimators}, seeds {self.seeds}")
        for seed in self.seeds:
            check_seed(seed)
        if self.dataset not in DATASETS:
            raise ConfigError(f"dataset must be {' or '.join(DATASETS)}, got {self.dataset!r}")
        counts = {"epochs": 1, "batch_size": 1, "latent_dim": 1, "particles": 1,
                  "importance_samples": 1, "curve_particles": 1, "eval_every": 1,
                  "snr_draws": 2, "threads": 1, "warmup": 0}
        for name, minimum in counts.items():
            _check_whole(name, getattr(self, name), minimum)
        for name, values in (("hidden", self.hidden), ("snr_ks", self.snr_ks)):
            if not values:
                raise ConfigError(f"{name} needs at least one value")
            for value in values:
                _check_whole(name, value, 1)
        if self.eval_particles is not None:
            _check_whole("eval_particles", self.eval_particles, 1)
        _check_real("lr", self.lr, strictly_positive=True)
        _check_real("beta", self.beta, strictly_positive=False)
        if self.time_budget is not None:
            _check_real("time_budget", self.time_budget, strictly_positive=True)
        warmup_schedule(self)

    def importance_samples_of(self, name: str) -> int:
        return self.importance_samples if name in INSIDE_LOG else 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["final_eval_particles"] = self.final_eval_particles
        return out


def _check_whole(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _check_real(name: str, value: Any, strictly_positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (strictly_positive and value == 0):
        relation = "> 0" if strictly_positive else ">= 0"
        raise ConfigError(f"{name} must be a finite number {relation}, got {value!r}")


def warmup_schedule(config: BenchmarkConfig) -> LinearWarmup:
    """β per step: from ``config.warmup_start`` to ``config.beta`` over ``config.warmup``
    steps (constant ``config.beta`` without warm-up), the schedule of ``pyro-vae train``."""
    return LinearWarmup(config.warmup or None, config.warmup_start, config.beta)


@dataclass
class Data:
    """``train``: the training intensities; ``train_eval`` / ``test_eval``: the fixed sets
    every run is evaluated on (a seeded binarization, or the intensities with ``none``)."""

    train: torch.Tensor
    train_eval: torch.Tensor
    test_eval: torch.Tensor


def load_data(config: BenchmarkConfig, device: torch.device = torch.device("cpu")) -> Data:
    dataset = (data_lib.load_digits() if config.dataset == "digits"
               else data_lib.load_mnist(config.data_dir)).to(device)
    train, test = dataset.train.images, dataset.test.images
    if config.binarize == "none":
        return Data(train=train, train_eval=train, test_eval=test)
    return Data(train=train, train_eval=data_lib.fixed_binarization(train, TRAIN_EVAL_SEED),
                test_eval=data_lib.fixed_binarization(test, TEST_EVAL_SEED))


def epoch_images(config: BenchmarkConfig, data: Data, generator: torch.Generator
                 ) -> torch.Tensor:
    """One epoch's training images: a fresh Bernoulli draw with ``generator`` (``dynamic``),
    the fixed binarization ``data.train_eval`` (``fixed``) or the intensities (``none``)."""
    if config.binarize == "dynamic":
        return data_lib.binarize(data.train, generator)
    return data.train_eval


def _fork_rng(device: torch.device):
    """A fork of torch's CPU random state and, on CUDA, of the device's."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` has run (CUDA is
    asynchronous: without the synchronization a timing would stop before the kernels do)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _estimator(name: str, config: BenchmarkConfig, importance_samples: int | None = None
               ) -> ELBOEstimator:
    k = config.importance_samples_of(name) if importance_samples is None else importance_samples
    return make_estimator(name, num_particles=config.particles, importance_samples=k,
                          beta=config.beta, max_plate_nesting=1)


@torch.no_grad()
def test_log_px(model: VAE, images: torch.Tensor, particles: int, seed: int) -> dict[str, float]:
    """Mean per-datapoint log p̂_K, ELBO and gap (nats) on ``images``, on a fork of the RNG."""
    with _fork_rng(images.device):
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        result = evaluate_dataset(model.model, model.guide, images, num_particles=particles,
                                  batch_size=100, particle_chunk=500, khat=False,
                                  max_plate_nesting=1)
    return {"test_log_px": result.log_px.mean().item(), "test_elbo": result.elbo.mean().item(),
            "test_gap": result.gap.mean().item()}


@torch.no_grad()
def own_bound(model: VAE, estimator: ELBOEstimator, images: torch.Tensor, seed: int,
              batch_size: int = 500) -> float:
    """The estimator's bound per datapoint over ``images`` (nats)."""
    total = 0.0
    with _fork_rng(images.device):
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        for start in range(0, images.shape[0], batch_size):
            total -= estimator.loss(model.model, model.guide, images[start:start + batch_size])
    return total / images.shape[0]


@torch.no_grad()
def active_units(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Latent dimensions whose posterior mean has variance > 0.01 over ``images`` (NaN for a
    model without an ``encode`` method)."""
    if not callable(getattr(model, "encode", None)):
        return math.nan
    loc, _ = model.encode(images)
    return int((loc.var(0) > ACTIVE_UNIT_THRESHOLD).sum())


def gradient_snr(model: torch.nn.Module, estimator: ELBOEstimator, batch: torch.Tensor,
                 draws: int) -> dict[str, float]:
    """Mean over parameter elements of |E g| / std g, from ``draws`` gradients at fixed
    parameters on ``batch``, for the guide's (encoder) and the model's (decoder) parameters."""
    encoder = guide_parameters(model, batch)
    encoder_ids = {id(p) for p in encoder}
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = {"snr_encoder": encoder, "snr_decoder": decoder}
    params = [p for group in groups.values() for p in group]
    samples = []
    for _ in range(draws):
        loss = estimator.differentiable_loss(model.model, model.guide, batch) / batch.shape[0]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        samples.append(torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten()
                                  for p, g in zip(params, grads)]))
    grads = torch.stack(samples).double()
    mean, std = grads.mean(0).abs(), grads.std(0)
    out, start = {}, 0
    for key, group in groups.items():
        size = sum(p.numel() for p in group)
        m, s = mean[start:start + size], std[start:start + size]
        informative = s > 0
        out[key] = (m[informative] / s[informative]).mean().item() if informative.any() \
            else math.nan
        start += size
    return out


def _check_data_fits(model: torch.nn.Module, batch: torch.Tensor, binarize: str) -> None:
    """Score ``batch`` once under Pyro validation: a pair whose likelihood's support misses the
    data (a Bernoulli pair on intensities, with ``--binarize none``) is refused before any
    training, in one line."""
    try:
        with poutine.block(), pyro.validation_enabled(True), _fork_rng(batch.device):
            evaluate_dataset(model.model, model.guide, batch, num_particles=1, khat=False,
                             max_plate_nesting=1)
    except ValueError as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        data = "the intensities" if binarize == "none" else "binary (0/1) images"
        raise ConfigError(f"{type(model).__name__} cannot score the data: {first_line} "
                          f"(with --binarize {binarize} the data are {data}: choose the "
                          "--binarize that fits the pair's likelihood)") from None


def _init_model(config: BenchmarkConfig, data: Data, seed: int, name: str) -> torch.nn.Module:
    """The same initial weights for every estimator of a seed; a param-store name of its own.
    With ``config.model_factory`` the model is ``factory(input_dim, name)``: a user's own pair
    (a conditional one is refused). The model is moved to the data's device."""
    torch.manual_seed(seed)
    device = data.train.device
    if config.model_factory is not None:
        model = load_factory(config.model_factory)(data.train.shape[1], f"{name}-{seed}")
        check_model(model)
        if getattr(model, "conditional", False):
            raise ConfigError(f"{type(model).__name__} is a conditional pair (conditional = "
                              "True): conditional (labelled) pairs are not supported by this "
                              "benchmark, which compares estimators of log p(x) on unlabelled "
                              "images")
        model = model.to(device)
        check_model(model, data.train_eval[:2])
        _check_data_fits(model, data.train_eval[:config.batch_size], config.binarize)
    else:
        model = VAE(data.train.shape[1], config.latent_dim, config.hidden,
                    likelihood=config.likelihood, name=f"{name}-{seed}").to(device)
    if hasattr(model, "initialize_from_data"):
        model.initialize_from_data(data.train)
    return model


def train_run(name: str, seed: int, config: BenchmarkConfig, data: Data) -> dict[str, Any]:
    """Train one VAE with estimator ``name``; return its model, metrics and curve."""
    model = _init_model(config, data, seed, name)
    estimator = _estimator(name, config)
    schedule = warmup_schedule(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    device = data.train.device
    generator = torch.Generator(device=device).manual_seed(seed)
    pyro.set_rng_seed(seed)
    num_train = data.train.shape[0]
    curve = [(0, test_log_px(model, data.test_eval, config.curve_particles, seed)["test_log_px"])]
    steps, train_seconds, epoch = 0, 0.0, 0
    out_of_time = False
    while not out_of_time and (config.time_budget is not None or epoch < config.epochs):
        epoch += 1
        order = torch.randperm(num_train, generator=generator, device=device)
        images = epoch_images(config, data, generator)[order]
        started = _clock(device)
        with pyro.validation_enabled(False):
            for start in range(0, num_train, config.batch_size):
                batch = images[start:start + config.batch_size]
                estimator.beta = schedule(steps)
                loss = svi_step(partial(estimator.differentiable_loss, model.model, model.guide,
                                        batch), batch.shape[0], optimizer)
                steps += 1
                # not synchronized: the device's queue is waited for at the epoch's end only
                if (config.time_budget is not None
                        and train_seconds + time.perf_counter() - started >= config.time_budget):
                    out_of_time = True
                    break
        train_seconds += _clock(device) - started
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{name}, seed {seed}: the loss diverged at epoch {epoch}")
        if epoch % config.eval_every == 0 or out_of_time or epoch == config.epochs:
            value = test_log_px(model, data.test_eval, config.curve_particles, seed)
            curve.append((epoch, value["test_log_px"]))
    estimator.beta = config.beta
    metrics: dict[str, Any] = {"estimator": name, "seed": seed, "epochs": epoch, "steps": steps,
                               "train_seconds": train_seconds,
                               "steps_per_s": steps / train_seconds}
    metrics["train_bound"] = own_bound(model, estimator, data.train_eval, seed)
    metrics.update(test_log_px(model, data.test_eval, config.final_eval_particles, seed))
    metrics["active_units"] = active_units(model, data.test_eval)
    with pyro.validation_enabled(False), _fork_rng(device):
        torch.manual_seed(seed + EVAL_RNG_OFFSET)
        metrics.update(gradient_snr(model, estimator, data.train_eval[:config.batch_size],
                                    config.snr_draws))
    return {"metrics": metrics, "curve": curve, "model": model}


def snr_versus_k(model: VAE, config: BenchmarkConfig, data: Data, seed: int
                 ) -> dict[str, dict[str, list[float]]]:
    """Encoder/decoder SNR of the iwae and dreg gradients at ``model``'s parameters, per K."""
    out: dict[str, dict[str, list[float]]] = {}
    batch = data.train_eval[:config.batch_size]
    for name in INSIDE_LOG:
        rows: dict[str, list[float]] = {"snr_encoder": [], "snr_decoder": []}
        for k in config.snr_ks:
            with pyro.validation_enabled(False), _fork_rng(batch.device):
                torch.manual_seed(seed + EVAL_RNG_OFFSET)
                snr = gradient_snr(model, _estimator(name, config, importance_samples=k), batch,
                                   config.snr_draws)
            for key, value in snr.items():
                rows[key].append(value)
        out[name] = rows
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else math.nan)


def summarize(runs: list[dict[str, Any]], config: BenchmarkConfig) -> list[dict[str, Any]]:
    rows = []
    for name in config.estimators:
        mine = [run for run in runs if run["estimator"] == name]
        row: dict[str, Any] = {"estimator": name, "K": config.importance_samples_of(name),
                               "P": config.particles, "seeds": len(mine)}
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
    digits = {"train_bound": 2, "test_elbo": 2, "test_log_px": 2, "test_gap": 2,
              "active_units": 1, "snr_encoder": 3, "snr_decoder": 3, "steps_per_s": 0}
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


def curve_statistics(per_seed: list[list[tuple[int, float]]]
                     ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The epochs that every seed's curve evaluated, and the mean and std over seeds of the
    values at those epochs (std NaN for one seed). With --time-budget, seeds may stop at
    different epochs; each value is matched by its epoch, never by its position."""
    by_epoch = [dict(curve) for curve in per_seed]
    common = sorted(set.intersection(*(set(values) for values in by_epoch)))
    values = torch.tensor([[values[epoch] for epoch in common] for values in by_epoch],
                          dtype=torch.float64).reshape(len(by_epoch), len(common))
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
            ax.plot([epoch for epoch, _ in curve], [value for _, value in curve], color=color,
                    alpha=0.3, linewidth=0.8)
        epochs, mean, std = curve_statistics(per_seed)
        ax.plot(epochs, mean.tolist(), color=color, marker=".", label=name)
        if len(per_seed) > 1:
            ax.fill_between(epochs, (mean - std).tolist(), (mean + std).tolist(), color=color,
                            alpha=0.2)
    ax.set(xlabel="epoch", ylabel=f"test log p̂_K (K = {k}), nats", title="test log-likelihood")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)


def plot_snr(snr: dict[str, dict[str, list[float]]], ks: Sequence[int], path: Path) -> None:
    fig = _figure(2)
    for i, (key, title) in enumerate((("snr_encoder", "encoder (guide)"),
                                      ("snr_decoder", "decoder (model)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, rows in snr.items():
            ax.plot(list(ks), rows[key], marker="o", label=name)
        ax.set(xscale="log", xlabel="importance samples K", ylabel="mean |E g| / std g",
               title=f"gradient SNR: {title}")
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
        models = {}
        for name in config.estimators:
            result = train_run(name, seed, config, data)
            runs.append(result["metrics"])
            curves[name].append(result["curve"])
            models[name] = result["model"]
            if progress:
                m = result["metrics"]
                print(f"[{time.perf_counter() - started:6.0f}s] seed {seed} {name:9s} "
                      f"log p̂ {m['test_log_px']:.2f}  ELBO {m['test_elbo']:.2f}  "
                      f"{m['steps_per_s']:.0f} steps/s", file=sys.stderr, flush=True)
        base = models.get("iwae", next(iter(models.values())))
        snr_runs.append(snr_versus_k(base, config, data, seed))
    snr = {name: {key: [statistics.fmean(run[name][key][i] for run in snr_runs)
                        for i in range(len(config.snr_ks))]
                  for key in ("snr_encoder", "snr_decoder")}
           for name in INSIDE_LOG}
    return {"config": config.to_dict(), "runs": runs, "summary": summarize(runs, config),
            "curves": curves, "snr_vs_k": {"K": list(config.snr_ks), **snr},
            "seconds": time.perf_counter() - started,
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "pyro": pyro.__version__, "platform": platform.platform(),
                            "threads": config.threads, "device": str(device),
                            "gpu": (torch.cuda.get_device_name(device)
                                    if device.type == "cuda" else None)}}


def write_outputs(results: dict[str, Any], out: Path, command: str) -> str:
    table = markdown_table(results["summary"])
    config = results["config"]
    write_text(out / "table.md", f"```\n{command}\n```\n\n{table}")
    write_text(out / "runs.csv", _csv(results["runs"]))
    write_text(out / "summary.csv", _csv(results["summary"]))
    write_json(out / "results.json", {**results, "command": command})
    plot_curves(results["curves"], out / "log_px_vs_epoch.png", config["curve_particles"])
    snr = {name: results["snr_vs_k"][name] for name in INSIDE_LOG}
    plot_snr(snr, results["snr_vs_k"]["K"], out / "snr_vs_k.png")
    return table


def _number(convert: Callable[[str], Any], kind: str, accepts: Callable[[Any], bool],
            wanted: str, show_text: bool) -> Callable[[str], Any]:
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
                f"expected {wanted}, got {text if show_text else value}")
        return value

    return parse


def _whole(minimum: int) -> Callable[[str], int]:
    return _number(int, "whole number", lambda value: value >= minimum,
                   f"a whole number >= {minimum}", show_text=False)


def _real(strictly_positive: bool) -> Callable[[str], float]:
    return _number(float, "number", lambda value: math.isfinite(value) and value >= 0
                   and not (strictly_positive and value == 0),
                   f"a finite number {'> 0' if strictly_positive else '>= 0'}", show_text=True)


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchmarkConfig()
    positive = _whole(1)
    p = OneLineParser(prog="compare_estimators.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    p.add_argument("--seeds", nargs="+", type=parse_seed, default=list(defaults.seeds))
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: mnist if --data-dir is given, else digits")
    p.add_argument("--data-dir", default=None, help="folder with the MNIST IDX files")
    p.add_argument("--epochs", type=positive, default=defaults.epochs)
    p.add_argument("--time-budget", type=_real(strictly_positive=True), default=None,
                   metavar="SECONDS",
                   help="equal training wall time per run instead of equal epochs")
    p.add_argument("--batch-size", type=positive, default=defaults.batch_size)
    p.add_argument("--lr", type=_real(strictly_positive=True), default=defaults.lr)
    p.add_argument("--latent-dim", type=positive,
                   help=f"built-in VAE only (default {defaults.latent_dim})")
    p.add_argument("--hidden", nargs="+", type=positive,
                   help=f"built-in VAE only (default {' '.join(map(str, defaults.hidden))})")
    p.add_argument("--particles", type=positive, default=defaults.particles,
                   help="P, averaged outside the log (every estimator)")
    p.add_argument("--importance-samples", type=positive,
                   default=defaults.importance_samples, help="K inside the log (iwae, dreg)")
    p.add_argument("--beta", type=_real(strictly_positive=False), default=defaults.beta,
                   help="weight of the rate (KL) term, >= 0")
    p.add_argument("--warmup", type=_whole(0), default=defaults.warmup, metavar="STEPS",
                   help=f"KL warm-up: beta rises linearly from {defaults.warmup_start} (as in "
                        "pyro-vae train) to --beta over STEPS optimizer steps (0: constant beta)")
    p.add_argument("--eval-particles", type=positive, default=None,
                   help="K of the final test log p̂_K (default 1000 on digits, 5000 on MNIST)")
    p.add_argument("--curve-particles", type=positive, default=defaults.curve_particles)
    p.add_argument("--eval-every", type=positive, default=defaults.eval_every)
    p.add_argument("--snr-draws", type=_whole(2), default=defaults.snr_draws)
    p.add_argument("--snr-ks", nargs="+", type=positive, default=list(defaults.snr_ks))
    p.add_argument("--threads", type=positive, default=defaults.threads)
    p.add_argument("--device", choices=DEVICES, default=defaults.device,
                   help=f"auto: cuda when a GPU is available, else cpu; default "
                        f"{defaults.device}")
    p.add_argument("--likelihood", choices=LIKELIHOODS, default=None,
                   help="of the built-in VAE: bernoulli (binary pixels; the default) or "
                        "gaussian (intensities, a learned standard deviation); not with "
                        "--model-factory")
    p.add_argument("--binarize", choices=BINARIZATIONS, default=None,
                   help="training data: dynamic (a fresh Bernoulli draw every epoch), fixed (one "
                        "seeded draw) or none (the intensities; evaluation on the intensities "
                        f"too); default {TrainConfig.binarize}, none with --likelihood gaussian")
    p.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                   help="compare on your own pair: FUNCTION(input_dim, name) returns an "
                        "nn.Module with model/guide methods (see pyro_vae.protocol); "
                        "MODULE may be a .py file")
    p.add_argument("--out", type=Path, required=True)
    return p


def parse_args(argv: Sequence[str] | None,
               parser: argparse.ArgumentParser | None = None) -> tuple[BenchmarkConfig, Path]:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    dataset = args.dataset or ("mnist" if args.data_dir else "digits")
    if args.model_factory is not None:
        given = [flag for flag, value in (("--latent-dim", args.latent_dim),
                                          ("--hidden", args.hidden)) if value is not None]
        if given:
            parser.error(f"{' and '.join(given)} size the built-in VAE; a --model-factory pair "
                         "is built by its factory")
    defaults = BenchmarkConfig()
    latent_dim = defaults.latent_dim if args.latent_dim is None else args.latent_dim
    hidden = defaults.hidden if args.hidden is None else tuple(args.hidden)
    try:
        config = BenchmarkConfig(
            estimators=tuple(dict.fromkeys(args.estimators)),
            seeds=tuple(dict.fromkeys(args.seeds)), dataset=dataset, data_dir=args.data_dir,
            epochs=args.epochs, time_budget=args.time_budget, batch_size=args.batch_size,
            lr=args.lr, latent_dim=latent_dim, hidden=hidden,
            particles=args.particles, importance_samples=args.importance_samples,
            beta=args.beta, warmup=args.warmup, eval_particles=args.eval_particles,
            curve_particles=args.curve_particles, eval_every=args.eval_every,
            snr_draws=args.snr_draws, snr_ks=tuple(args.snr_ks), threads=args.threads,
            model_factory=args.model_factory, likelihood=args.likelihood,
            binarize=args.binarize, device=args.device)
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
