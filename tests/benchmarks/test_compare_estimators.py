"""benchmarks/compare_estimators.py: its metrics against known answers, its data modes, training
through the engine, the user's own data (--data), warm-up, device and refusals. (More end-to-end
smoke tests and option errors are in test_objectives.py and test_own_model.py.)"""

from __future__ import annotations

import copy
import csv
import importlib
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from user_models import fa_data

from pyro_vae import TrainConfig, fit
from pyro_vae.data import images as data_lib
from pyro_vae.data.batches import as_source
from pyro_vae.models.vae import VAE
from pyro_vae.util.errors import ConfigError

USER_MODELS = Path(__file__).resolve().parents[1] / "support" / "user_models.py"

TINY = [
    "--seeds",
    "0",
    "--epochs",
    "1",
    "--importance-samples",
    "2",
    "--eval-particles",
    "10",
    "--curve-particles",
    "2",
    "--snr-draws",
    "2",
    "--snr-ks",
    "1",
    "2",
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("compare_estimators.py: error: "), err
    return err


# ------------------------------------------------------------------------------ gradient SNR


class _TwoGroupPair(nn.Module):
    """A pair whose guide uses ``encoder`` and whose model uses ``decoder``; ``unused`` is in
    neither (its gradient is None: zero in every draw)."""

    def __init__(self, encoder_size: int, decoder_size: int):
        super().__init__()
        self.encoder = nn.Parameter(torch.zeros(encoder_size))
        self.decoder = nn.Parameter(torch.zeros(decoder_size))
        self.unused = nn.Parameter(torch.zeros(2))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z + self.decoder.sum(), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc = self.encoder.sum() * x.new_ones(x.shape[0], 1)
            pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


class _ScriptedGradients:
    """A stand-in estimator whose per-datapoint loss has gradient ``encoder_draws[i]`` in the
    encoder and ``decoder_draws[i]`` in the decoder at its i-th call: ``gradient_snr`` sees
    exactly these draws."""

    def __init__(
        self, pair: _TwoGroupPair, encoder_draws: torch.Tensor, decoder_draws: torch.Tensor
    ):
        self.pair = pair
        self.draws = iter(zip(encoder_draws, decoder_draws))

    def differentiable_loss(self, model, guide, x):
        encoder_grad, decoder_grad = next(self.draws)
        return x.shape[0] * (
            (self.pair.encoder * encoder_grad).sum() + (self.pair.decoder * decoder_grad).sum()
        )


def _snr_by_hand(draws: torch.Tensor) -> float:
    """Mean over the columns with a non-zero sample std of |mean| / std (Bessel-corrected)."""
    ratios = []
    for column in draws.T.tolist():
        std = statistics.stdev(column)
        if std > 0:
            ratios.append(abs(statistics.fmean(column)) / std)
    return statistics.fmean(ratios)


def test_gradient_snr_is_the_mean_over_elements_of_abs_mean_over_std(bench):
    """Scripted draws: the SNR of each group is |mean| / std per element (sample std, n − 1),
    averaged over the group's elements, skipping an element whose draws are all equal (the
    encoder's third here, and the unused parameter's zeros); the variance is the sample
    variance averaged over every element of the group."""
    generator = torch.Generator().manual_seed(0)
    draws = 7
    encoder_draws = torch.randn(draws, 3, generator=generator) + torch.tensor([2.0, -0.5, 0.0])
    encoder_draws[:, 2] = 0.25
    decoder_draws = 0.3 * torch.randn(draws, 4, generator=generator) - 1.0
    pair = _TwoGroupPair(3, 4)
    batch = torch.zeros(4, 1)
    snr = bench.gradient_snr(
        pair, _ScriptedGradients(pair, encoder_draws, decoder_draws), batch, draws
    )
    assert snr["snr_encoder"] == pytest.approx(_snr_by_hand(encoder_draws[:, :2]), rel=1e-6)
    assert snr["snr_decoder"] == pytest.approx(_snr_by_hand(decoder_draws), rel=1e-6)
    by_hand = [statistics.variance(column) for column in encoder_draws.T.tolist()]
    assert snr["var_encoder"] == pytest.approx(statistics.fmean(by_hand), rel=1e-6)
    by_hand = [statistics.variance(column) for column in decoder_draws.T.tolist()]
    by_hand += [0.0, 0.0]  # the variance counts every element: the unused pair's zeros too
    assert snr["var_decoder"] == pytest.approx(statistics.fmean(by_hand), rel=1e-6)


def test_gradient_snr_of_gaussian_draws_matches_its_closed_form(bench):
    """Draws g ~ N(μ, σ²) per element: the SNR estimate is |μ| / σ = r to within 4 standard
    errors, with Var(|ḡ| / s) ≈ (1 + r² / 2) / n for n normal draws (delta method), averaged over
    m independent elements."""
    draws, elements, mu, sigma = 400, 32, 1.5, 2.0
    generator = torch.Generator().manual_seed(1)
    encoder_draws = mu + sigma * torch.randn(draws, elements, generator=generator)
    decoder_draws = -mu + sigma * torch.randn(draws, elements, generator=generator)
    pair = _TwoGroupPair(elements, elements)
    snr = bench.gradient_snr(
        pair, _ScriptedGradients(pair, encoder_draws, decoder_draws), torch.zeros(2, 1), draws
    )
    ratio = mu / sigma
    stderr = math.sqrt((1 + ratio**2 / 2) / draws / elements)
    for key in ("snr_encoder", "snr_decoder"):
        assert abs(snr[key] - ratio) < 4 * stderr, (key, snr[key], ratio, stderr)


def test_gradient_snr_groups_follow_the_guide(bench):
    """The encoder group is what the guide's log-density depends on: swapping which draws go to
    which parameter swaps the two SNRs."""
    generator = torch.Generator().manual_seed(2)
    high = 5.0 + torch.randn(6, 3, generator=generator)
    low = 0.1 + torch.randn(6, 3, generator=generator)
    pair = _TwoGroupPair(3, 3)
    batch = torch.zeros(2, 1)
    first = bench.gradient_snr(pair, _ScriptedGradients(pair, high, low), batch, 6)
    second = bench.gradient_snr(pair, _ScriptedGradients(pair, low, high), batch, 6)
    assert first["snr_encoder"] == pytest.approx(second["snr_decoder"], rel=1e-6)
    assert first["snr_decoder"] == pytest.approx(second["snr_encoder"], rel=1e-6)
    assert first["snr_encoder"] > first["snr_decoder"]


SNR_NAMES = "iwae,renyi,ciwae,miwae,piwae,rws,vimco"


def test_snr_of_every_estimator_follows_the_estimators_identities(bench, tmp_path):
    """--snr-estimators: every estimator's SNR and variance against K, from the same draws at
    the same parameters, so the estimators' identities hold number for number. At K = 1 the
    Rényi bound and CIWAE are the ELBO, as IWAE is; PIWAE's guide follows MIWAE(M, K) and its
    model the IWAE bound of all M·K draws; RWS's wake-θ is IWAE's model gradient; VIMCO with no
    discrete latent is IWAE. miwae and piwae (M = 2) have no split of K = 1 or 2 and rws none
    of K = 1 (n/a); snr_vs_k.csv holds the same numbers."""
    out = tmp_path / "out"
    argv = [*TINY[:-5], "--snr-draws", "3", "--snr-ks", "1", "2", "4"]
    argv += ["--estimators", "iwae", "--snr-estimators", SNR_NAMES, "--out", str(out)]
    assert bench.main(argv) == 0
    snr = json.loads((out / "results.json").read_text())["snr_vs_k"]
    assert snr["K"] == [1, 2, 4] and set(snr) == {"K", *SNR_NAMES.split(",")}
    iwae = snr["iwae"]
    for key in ("snr_encoder", "snr_decoder", "var_encoder", "var_decoder"):
        assert all(math.isfinite(v) and v > 0 for v in iwae[key])
        for name in ("renyi", "ciwae"):
            assert snr[name][key][0] == pytest.approx(iwae[key][0], rel=1e-5)
        assert snr["vimco"][key][1:] == pytest.approx(iwae[key][1:], rel=1e-5)
        assert all(math.isnan(snr[name][key][i]) for name in ("miwae", "piwae") for i in (0, 1))
        assert math.isnan(snr["rws"][key][0])
    for key in ("snr_encoder", "var_encoder"):
        assert snr["piwae"][key][2] == pytest.approx(snr["miwae"][key][2], rel=1e-5)
    for key in ("snr_decoder", "var_decoder"):
        assert snr["piwae"][key][2] == pytest.approx(iwae[key][2], rel=1e-4)
        assert snr["rws"][key][1:] == pytest.approx(iwae[key][1:], rel=1e-5)
    assert snr["miwae"]["var_decoder"][2] != pytest.approx(iwae["var_decoder"][2], rel=1e-3)
    assert (snr["miwae"]["particles"][2], snr["miwae"]["importance_samples"][2]) == (2, 2)
    assert snr["iwae"]["particles"] == [1, 1, 1] and snr["iwae"]["importance_samples"] == [1, 2, 4]
    with (out / "snr_vs_k.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7 * 3 and rows[0].keys() >= {"estimator", "draws", "P", "K"}
    for row in rows:
        index = snr["K"].index(int(row["draws"]))
        assert float(row["var_encoder"]) == pytest.approx(
            snr[row["estimator"]]["var_encoder"][index], nan_ok=True
        )


def test_the_variance_of_m_averaged_bounds_is_one_mth(bench):
    """MIWAE(M, K)'s gradient is the mean of M independent IWAE_K gradients, so each element's
    variance is IWAE_K's over M. With 400 draws each group's mean variance has a relative
    error of a few percent (about sqrt(2 / 399) per element, less averaged over elements); the
    ratio is checked to within 25%."""
    from pyro_vae.infer import make_estimator

    torch.manual_seed(0)
    pair = VAE(6, 2, (5,), name="snr-variance")
    batch = torch.bernoulli(torch.full((16, 6), 0.4))
    M, K, draws = 4, 2, 400
    stats = {}
    for name, particles in (("iwae", 1), ("miwae", M)):
        estimator = make_estimator(name, particles, K, max_plate_nesting=1)
        stats[name] = bench.gradient_snr(pair, estimator, batch, draws)
    for group in ("encoder", "decoder"):
        ratio = stats["iwae"][f"var_{group}"] / stats["miwae"][f"var_{group}"]
        assert ratio == pytest.approx(M, rel=0.25), (group, ratio)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--snr-estimators", "iwae,stl"], "'stl' is no estimator that takes importance samples"),
        (["--snr-estimators", "nope"], "'nope' is no estimator"),
        (["--snr-particles", "1"], "argument --snr-particles: expected a whole number >= 2"),
    ],
)
def test_bad_snr_options_give_one_line_and_exit_2(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert message in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_snr_estimators_are_checked_in_the_config(bench):
    with pytest.raises(ConfigError, match="'trace' takes no importance samples"):
        bench.BenchmarkConfig(snr_estimators=("iwae", "trace"))


# ------------------------------------------------------------------------------ active units


def test_active_units_counts_latent_means_whose_variance_exceeds_the_threshold(bench):
    """A VAE with a linear encoder whose mean for latent j is c_j · x₀ with x₀ of unit sample
    variance over the images: Var(μ_j) = c_j², chosen above and below the threshold."""
    threshold = bench.ACTIVE_UNIT_THRESHOLD
    variances = threshold * torch.tensor([100.0, 2.0, 1.1, 0.9, 0.5, 0.0])
    latent_dim, input_dim = variances.numel(), 5
    vae = VAE(input_dim, latent_dim, hidden=())
    with torch.no_grad():
        vae.encoder.head.weight.zero_()
        vae.encoder.head.weight[:latent_dim, 0] = variances.sqrt()
    pixel = torch.linspace(0.0, 1.0, 101)
    pixel = (pixel - pixel.mean()) / pixel.std()
    images = torch.rand(101, input_dim, generator=torch.Generator().manual_seed(0))
    images[:, 0] = pixel
    torch.testing.assert_close(vae.encode(images)[0].var(0), variances, rtol=1e-5, atol=1e-7)
    assert bench.active_units(vae, images) == 3


def test_active_units_is_nan_without_an_encode_method(bench):
    assert math.isnan(bench.active_units(_TwoGroupPair(1, 1), torch.zeros(3, 1)))


# ------------------------------------------------------------------------------ data modes


def test_binarize_none_evaluates_and_trains_on_the_intensities(bench):
    digits = data_lib.load_digits()
    config = bench.BenchmarkConfig(likelihood="gaussian")
    assert config.binarize == "none"
    data = bench.load_data(config)
    assert torch.equal(data.test_eval, digits.test.images)
    assert torch.equal(data.train_eval, digits.train.images)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(bench.epoch_images(config, data, generator), digits.train.images)
    assert not ((data.test_eval == 0) | (data.test_eval == 1)).all()


@pytest.mark.parametrize("binarize", ["dynamic", "fixed"])
def test_binarized_modes_evaluate_on_a_fixed_binarization(bench, binarize):
    """The evaluation sets are the seeded binarizations whatever the mode; ``fixed`` trains on
    the training one every epoch, ``dynamic`` on a new draw each epoch."""
    digits = data_lib.load_digits()
    config = bench.BenchmarkConfig(binarize=binarize)
    data = bench.load_data(config)
    assert torch.equal(
        data.test_eval, data_lib.fixed_binarization(digits.test.images, bench.TEST_EVAL_SEED)
    )
    generator = torch.Generator().manual_seed(0)
    first, second = (bench.epoch_images(config, data, generator) for _ in range(2))
    assert ((first == 0) | (first == 1)).all()
    if binarize == "fixed":
        assert torch.equal(first, data.train_eval) and torch.equal(second, data.train_eval)
    else:
        assert not torch.equal(first, second)


def test_config_defaults_follow_the_likelihood(bench):
    assert bench.BenchmarkConfig().binarize == TrainConfig().binarize
    assert bench.BenchmarkConfig().likelihood == "bernoulli"
    assert bench.BenchmarkConfig(model_factory="m.py:f").likelihood is None
    assert bench.BenchmarkConfig(model_factory="m.py:f", binarize="none").binarize == "none"
    for likelihood, binarize in (
        ("bernoulli", "none"),
        ("gaussian", "dynamic"),
        ("gaussian", "fixed"),
    ):
        with pytest.raises(ConfigError, match="built-in VAE"):
            bench.BenchmarkConfig(likelihood=likelihood, binarize=binarize)
    with pytest.raises(ConfigError, match="--model-factory pair has its own"):
        bench.BenchmarkConfig(model_factory="m.py:f", likelihood="gaussian")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--binarize", "none"], "Bernoulli likelihood needs binary data"),
        (["--likelihood", "gaussian", "--binarize", "fixed"], "Bernoulli likelihood needs binary"),
        (["--binarize", "sometimes"], "argument --binarize: invalid choice"),
        (["--device", "tpu"], "argument --device: invalid choice"),
        (["--likelihood", "gaussian", "--model-factory", "m.py:f"], "has its own"),
        (
            ["--latent-dim", "4", "--hidden", "8", "--model-factory", "m.py:f"],
            "--latent-dim and --hidden size the built-in VAE",
        ),
    ],
)
def test_bad_data_options_give_one_line_and_exit_2(bench, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--out", str(out)])
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_a_gaussian_run_end_to_end(bench, tmp_path):
    """--likelihood gaussian trains the built-in Gaussian VAE on the intensities; log p̂_K ≥ the
    ELBO of the same draws (Jensen)."""
    out = tmp_path / "out"
    assert (
        bench.main(
            ["--likelihood", "gaussian", "--estimators", "meanfield", *TINY, "--out", str(out)]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["binarize"] == "none"
    assert results["config"]["likelihood"] == "gaussian"
    assert results["environment"]["device"] == "cpu"
    (run,) = results["runs"]
    assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"]


class FactorAnalysis(nn.Module):
    """A continuous-data pair: z ~ N(0, I), x | z ~ N(W z + b, σ² I), q(z | x) linear-Gaussian."""

    def __init__(self, input_dim: int, name: str, latent_dim: int = 2):
        super().__init__()
        self.name = name
        self.loading = nn.Linear(latent_dim, input_dim)
        self.log_noise = nn.Parameter(torch.zeros(()))
        self.recognition = nn.Linear(input_dim, 2 * latent_dim)
        self.latent_dim = latent_dim

    def model(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(self.loading(z), self.log_noise.exp()).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.recognition(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def build_factor_analysis(input_dim, name):
    return FactorAnalysis(input_dim, name)


class _BernoulliPair(FactorAnalysis):
    def model(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(x.shape[0], self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.loading(z)).to_event(1), obs=x)


def build_bernoulli(input_dim, name):
    return _BernoulliPair(input_dim, name)


def test_a_users_continuous_pair_on_the_intensities(bench, tmp_path):
    out = tmp_path / "out"
    factory = f"{Path(__file__).resolve()}:build_factor_analysis"
    assert (
        bench.main(
            [
                "--model-factory",
                factory,
                "--binarize",
                "none",
                "--estimators",
                "iwae",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["binarize"] == "none" and results["config"]["likelihood"] is None
    (run,) = results["runs"]
    assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"]


def test_a_users_bernoulli_pair_on_the_intensities_is_refused(bench, tmp_path, capsys):
    out = tmp_path / "out"
    factory = f"{Path(__file__).resolve()}:build_bernoulli"
    assert (
        bench.main(["--model-factory", factory, "--binarize", "none", *TINY, "--out", str(out)])
        == 2
    )
    err = _one_error_line(capsys)
    assert "_BernoulliPair cannot score the data" in err and "--binarize none" in err
    assert not out.exists()


# ------------------------------------------------------------------------------ warm-up


def test_warmup_starts_where_training_does(bench, monkeypatch):
    """The β of each training step of the engine: from TrainConfig.warmup_start (as ``pyro-vae
    train``) to β over ``--warmup`` steps, then β (also for the SNR draws at the final
    parameters). A recording estimator is traced, never fused, so every step is seen."""
    betas = []
    make = bench.make_estimator

    def recording(name, *args, **kwargs):
        class Recording(type(make(name, *args, **kwargs))):  # a subclass: traced, never fused
            def differentiable_loss(self, *loss_args, **loss_kwargs):
                betas.append(self.beta)
                return super().differentiable_loss(*loss_args, **loss_kwargs)

        options = kwargs.pop("options", None) or {}  # the estimator's own keywords
        return Recording(*args, **kwargs, **options)

    monkeypatch.setattr(bench, "make_estimator", recording)
    monkeypatch.setattr(
        importlib.import_module("pyro_vae.train.engine"), "make_estimator", recording
    )
    warmup, beta, batch_size = 2, 0.8, 500
    config = bench.BenchmarkConfig(
        estimators=("meanfield",),
        seeds=(0,),
        epochs=1,
        batch_size=batch_size,
        beta=beta,
        warmup=warmup,
        eval_particles=2,
        curve_particles=1,
        snr_draws=2,
    )
    data = bench.load_data(config)
    bench.train_run("meanfield", 0, config, data, bench.initial_model(config, data, 0))
    steps = math.ceil(data.train.shape[0] / batch_size)
    start = TrainConfig().warmup_start
    expected = [start + (beta - start) * min(step, warmup) / warmup for step in range(steps)]
    assert betas == pytest.approx(expected + [beta] * config.snr_draws)
    assert betas[0] == pytest.approx(start) and start > 0


# ------------------------------------------------------------------------------ the engine


@pytest.fixture
def fa_files(tmp_path):
    """Factor-analysis data as pyro-vae train takes them: a training .npz of named arrays
    (keyword arguments) and a test .npz of unnamed ones (positional)."""
    np.savez(tmp_path / "train.npz", x=fa_data(120))
    np.savez(tmp_path / "test.npz", fa_data(60, seed=1))
    return tmp_path / "train.npz", tmp_path / "test.npz"


def _fa_config(bench, fa_files, **changes):
    train, test = fa_files
    options = dict(
        estimators=("trace", "dreg"),
        seeds=(0,),
        epochs=2,
        batch_size=50,
        importance_samples=3,
        eval_every=1,
        eval_particles=10,
        curve_particles=3,
        snr_draws=3,
        snr_ks=(1, 2),
        model_factory=f"{USER_MODELS}:make_fa",
        data=str(train),
        test_data=str(test),
    )
    return bench.BenchmarkConfig(**{**options, **changes})


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


@pytest.mark.parametrize("setting", ["digits", "user data"])
def test_a_run_is_the_engines_run_undisturbed_by_its_probes(bench, fa_files, setting):
    """A benchmark run, with its curve probes and SNR draws, ends at exactly the weights of a bare
    ``fit`` of a copy of the same initial model with the same seed: it trains through the
    engine, and its callbacks draw on forks of the random state. The seed's initial model is
    left as it was (each estimator trains a deep copy)."""
    if setting == "digits":
        config = bench.BenchmarkConfig(
            estimators=("iwae",),
            seeds=(3,),
            epochs=2,
            batch_size=500,
            importance_samples=2,
            eval_every=1,
            eval_particles=2,
            curve_particles=2,
            snr_draws=2,
        )
    else:
        config = _fa_config(bench, fa_files, estimators=("iwae",), seeds=(3,))
    data = bench.load_data(config)
    initial = bench.initial_model(config, data, 3)
    before = copy.deepcopy(initial)
    run = bench.train_run("iwae", 3, config, data, initial)
    bare = fit(
        copy.deepcopy(initial),
        bench.training_source(config, data),
        config=bench.engine_config("iwae", 3, config),
        progress=False,
    )
    _same_weights(run["model"], bare.model)
    _same_weights(initial, before)
    assert not torch.equal(next(run["model"].parameters()), next(initial.parameters()))
    assert [epoch for epoch, _ in run["curve"]] == [0, 1, 2]
    steps = bare.history.epoch[-1] * math.ceil(as_source(data.train).num_data / config.batch_size)
    assert run["metrics"]["epochs"] == 2 and run["metrics"]["steps"] == steps


def test_traced_runs_every_step_through_pyros_traces_with_the_same_numbers(
    bench, tmp_path, monkeypatch
):
    """--traced asks the engine for Pyro's traces (fused=False); the built-in VAE's trace runs
    reach the same metrics either way (FusedLoss is the same numbers), only the times differ."""
    calls = []
    engine = bench.fit

    def recording(*args, **kwargs):
        calls.append(kwargs["fused"])
        return engine(*args, **kwargs)

    monkeypatch.setattr(bench, "fit", recording)
    runs = []
    for flags in ([], ["--traced"]):
        out = tmp_path / f"out{len(flags)}"
        assert bench.main(["--estimators", "trace", *TINY, *flags, "--out", str(out)]) == 0
        (run,) = json.loads((out / "results.json").read_text())["runs"]
        runs.append({k: v for k, v in run.items() if k not in ("train_seconds", "steps_per_s")})
    assert calls == [True, False]
    assert runs[0] == runs[1]


def test_the_time_budget_stops_between_epochs_once_reached(bench, fa_files, monkeypatch):
    """With --time-budget the engine trains whole epochs until their summed time reaches the
    budget: on a clock that advances 0.02 s per reading (two readings an epoch) a budget of
    0.05 s is reached in epoch 3, after two epochs under it, and the curve has its last point
    there."""
    import itertools

    from pyro_vae.train import loop as loop_module

    ticks = itertools.count()
    monkeypatch.setattr(loop_module, "clock", lambda: 0.02 * next(ticks))
    budget = 0.05
    config = _fa_config(bench, fa_files, time_budget=budget, eval_every=1000)
    data = bench.load_data(config)
    run = bench.train_run("trace", 0, config, data, bench.initial_model(config, data, 0))
    metrics = run["metrics"]
    assert metrics["epochs"] == 3
    assert metrics["train_seconds"] == pytest.approx(0.06)
    assert [epoch for epoch, _ in run["curve"]] == [0, metrics["epochs"]]
    assert metrics["steps"] == metrics["epochs"] * 3  # 120 datapoints, batches of 50


def test_the_benchmark_on_a_users_pair_and_data(bench, fa_files, tmp_path):
    """--data/--test-data with --model-factory FILE.py:FUNCTION exactly as pyro-vae train takes
    them (FUNCTION() without arguments): every output is written; both estimators start from
    the same weights (the same curve value at epoch 0); log p̂_K ≥ ELBO; active units are n/a
    (no images, no encode) and both SNR groups exist (the guide's A, b, L; the model's W, μ, ψ)."""
    train, test = fa_files
    out = tmp_path / "out"
    assert (
        bench.main(
            [
                "--model-factory",
                f"{USER_MODELS}:make_fa",
                "--data",
                str(train),
                "--test-data",
                str(test),
                "--estimators",
                "trace",
                "dreg",
                "--seeds",
                "0",
                "--epochs",
                "2",
                "--eval-every",
                "1",
                "--batch-size",
                "50",
                "--importance-samples",
                "3",
                "--eval-particles",
                "20",
                "--curve-particles",
                "3",
                "--snr-draws",
                "3",
                "--snr-ks",
                "1",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    names = {
        "table.md",
        "runs.csv",
        "summary.csv",
        "results.json",
        "log_px_vs_epoch.png",
        "snr_vs_k.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    results = json.loads((out / "results.json").read_text())
    config = results["config"]
    assert (config["data"], config["test_data"]) == (str(train), str(test))
    assert config["dataset"] is None and config["binarize"] == "none"
    rows = {row["estimator"]: row for row in results["runs"]}
    assert set(rows) == {"trace", "dreg"}
    for row in rows.values():
        assert row["epochs"] == 2 and row["steps"] == 2 * 3
        assert math.isfinite(row["test_log_px"]) and row["test_log_px"] >= row["test_elbo"]
        assert math.isnan(row["active_units"])
        assert row["snr_encoder"] > 0 and row["snr_decoder"] > 0
    (trace_curve,), (dreg_curve,) = results["curves"]["trace"], results["curves"]["dreg"]
    assert [epoch for epoch, _ in trace_curve] == [0, 1, 2] == [epoch for epoch, _ in dreg_curve]
    assert trace_curve[0] == dreg_curve[0] and trace_curve[1] != dreg_curve[1]
    for name in ("iwae", "dreg"):
        assert len(results["snr_vs_k"][name]["snr_encoder"]) == 2
    table = (out / "table.md").read_text()
    assert "| trace |" in table and "| dreg (K=3) |" in table
    assert all(line.split(" | ")[5] == "n/a" for line in table.splitlines()[-2:])
    runs_csv = (out / "runs.csv").read_text().splitlines()
    assert len(runs_csv) == 3 and runs_csv[0].startswith("estimator,seed,epochs,steps")


def test_a_data_function_returning_train_and_test_loaders(bench, tmp_path):
    """--data FILE.py:FUNCTION returning (train, test) DataLoaders whose collate function gives
    keyword arguments (x, mask): no --test-data needed; the guide (the exact posterior) uses
    every parameter, so the decoder's SNR is n/a."""
    out = tmp_path / "out"
    assert (
        bench.main(
            [
                "--model-factory",
                f"{USER_MODELS}:make_sequence_model",
                "--data",
                f"{USER_MODELS}:sequence_data",
                "--estimators",
                "meanfield",
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"] - 1e-4
    assert run["snr_encoder"] > 0 and math.isnan(run["snr_decoder"])
    assert run["steps"] == 4  # 60 sequences in the loader's batches of 16


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--binarize", "fixed"], "--binarize describes the built-in images and VAE, not --data"),
        (["--likelihood", "gaussian"], "--likelihood describes the built-in images and VAE"),
        (["--latent-dim", "3"], "--latent-dim describes the built-in images and VAE"),
        (["--hidden", "8", "8"], "--hidden describes the built-in images and VAE"),
        (
            ["--binarize", "none", "--dataset", "mnist"],
            "--dataset, --binarize describe the built-in images and VAE, not --data",
        ),
    ],
)
def test_built_in_flags_with_data_give_one_line_and_exit_2(
    bench, fa_files, tmp_path, capsys, argv, message
):
    train, test = fa_files
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(
            [
                "--model-factory",
                f"{USER_MODELS}:make_fa",
                "--data",
                str(train),
                "--test-data",
                str(test),
                *argv,
                "--out",
                str(out),
            ]
        )
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "{train}"], "--data needs --model-factory FILE.py:FUNCTION"),
        (
            ["--model-factory", f"{USER_MODELS}:make_fa", "--test-data", "{test}"],
            "--test-data is the test set of --data",
        ),
    ],
)
def test_data_flags_without_their_partner_give_one_line_and_exit_2(
    bench, fa_files, tmp_path, capsys, argv, message
):
    train, test = fa_files
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        bench.main([arg.format(train=train, test=test) for arg in argv] + ["--out", str(out)])
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(
    "factory, data, message",
    [
        ("make_fa", ["{train}"], "holds no test set: give --test-data DATA"),
        ("make_fa", ["{missing}", "--test-data", "{test}"], "no data file"),
        (
            "build_two_arguments",
            ["{train}", "--test-data", "{test}"],
            "is called as FUNCTION() with --data",
        ),
    ],
)
def test_bad_data_or_factory_is_one_line_before_any_output(
    bench, fa_files, tmp_path, capsys, factory, data, message
):
    train, test = fa_files
    (tmp_path / "factories.py").write_text(
        "from user_models import FactorAnalysis\n\n\n"
        "def build_two_arguments(input_dim, name):\n"
        "    return FactorAnalysis(input_dim)\n"
    )
    spec = (
        f"{USER_MODELS}:{factory}"
        if factory == "make_fa"
        else f"{tmp_path / 'factories.py'}:{factory}"
    )
    paths = dict(train=train, test=test, missing=tmp_path / "missing.npz")
    out = tmp_path / "out"
    assert (
        bench.main(
            [
                "--model-factory",
                spec,
                "--data",
                *(arg.format(**paths) for arg in data),
                *TINY,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert message in _one_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------------------ refusals, device


def test_a_conditional_pair_is_refused_plainly(bench, tmp_path, capsys):
    factory = tmp_path / "conditional.py"
    factory.write_text(
        "from pyro_vae.models.cvae import CVAE\n\n\n"
        "def build(input_dim, name):\n"
        "    return CVAE(input_dim, 10, name=name)\n"
    )
    out = tmp_path / "out"
    assert bench.main(["--model-factory", f"{factory}:build", *TINY, "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "conditional (labelled) pairs are not supported by this benchmark" in err
    assert "plate" not in err
    assert not out.exists()


def test_device_cuda_without_a_gpu_is_one_line_and_exit_2(bench, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    assert bench.main(["--device", "cuda", *TINY, "--out", str(out)]) == 2
    assert "no CUDA GPU is available" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.cuda
def test_a_run_on_the_gpu(bench, tmp_path):
    out = tmp_path / "out"
    assert (
        bench.main(["--device", "cuda", "--estimators", "trace", "dreg", *TINY, "--out", str(out)])
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"].startswith("cuda")
    for run in results["runs"]:
        assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"]
        assert run["snr_encoder"] > 0 and run["snr_decoder"] > 0
