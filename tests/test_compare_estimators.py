"""benchmarks/compare_estimators.py: its metrics against known answers, its data modes, warm-up,
device and refusals. (The end-to-end smoke tests and option errors are in test_objectives.py and
test_own_model.py.)"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import data as data_lib
from pyro_vae.config import TrainConfig
from pyro_vae.errors import ConfigError
from pyro_vae.models import VAE

TINY = ["--seeds", "0", "--epochs", "1", "--importance-samples", "2", "--eval-particles", "10",
        "--curve-particles", "2", "--snr-draws", "2", "--snr-ks", "1", "2"]


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

    def __init__(self, pair: _TwoGroupPair, encoder_draws: torch.Tensor,
                 decoder_draws: torch.Tensor):
        self.pair = pair
        self.draws = iter(zip(encoder_draws, decoder_draws))

    def differentiable_loss(self, model, guide, x):
        encoder_grad, decoder_grad = next(self.draws)
        return x.shape[0] * ((self.pair.encoder * encoder_grad).sum()
                             + (self.pair.decoder * decoder_grad).sum())


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
    encoder's third here, and the unused parameter's zeros)."""
    generator = torch.Generator().manual_seed(0)
    draws = 7
    encoder_draws = torch.randn(draws, 3, generator=generator) + torch.tensor([2.0, -0.5, 0.0])
    encoder_draws[:, 2] = 0.25
    decoder_draws = 0.3 * torch.randn(draws, 4, generator=generator) - 1.0
    pair = _TwoGroupPair(3, 4)
    batch = torch.zeros(4, 1)
    snr = bench.gradient_snr(pair, _ScriptedGradients(pair, encoder_draws, decoder_draws), batch,
                             draws)
    assert snr["snr_encoder"] == pytest.approx(_snr_by_hand(encoder_draws[:, :2]), rel=1e-6)
    assert snr["snr_decoder"] == pytest.approx(_snr_by_hand(decoder_draws), rel=1e-6)


def test_gradient_snr_of_gaussian_draws_matches_its_closed_form(bench):
    """Draws g ~ N(μ, σ²) per element: the SNR estimate is |μ| / σ = r to within 4 standard
    errors, with Var(|ḡ| / s) ≈ (1 + r² / 2) / n for n normal draws (delta method), averaged over
    m independent elements."""
    draws, elements, mu, sigma = 400, 32, 1.5, 2.0
    generator = torch.Generator().manual_seed(1)
    encoder_draws = mu + sigma * torch.randn(draws, elements, generator=generator)
    decoder_draws = -mu + sigma * torch.randn(draws, elements, generator=generator)
    pair = _TwoGroupPair(elements, elements)
    snr = bench.gradient_snr(pair, _ScriptedGradients(pair, encoder_draws, decoder_draws),
                             torch.zeros(2, 1), draws)
    ratio = mu / sigma
    stderr = math.sqrt((1 + ratio ** 2 / 2) / draws / elements)
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
    assert torch.equal(data.test_eval, data_lib.fixed_binarization(digits.test.images,
                                                                   bench.TEST_EVAL_SEED))
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
    for likelihood, binarize in (("bernoulli", "none"), ("gaussian", "dynamic"),
                                 ("gaussian", "fixed")):
        with pytest.raises(ConfigError, match="built-in VAE"):
            bench.BenchmarkConfig(likelihood=likelihood, binarize=binarize)
    with pytest.raises(ConfigError, match="--model-factory pair has its own"):
        bench.BenchmarkConfig(model_factory="m.py:f", likelihood="gaussian")


@pytest.mark.parametrize("argv, message", [
    (["--binarize", "none"], "Bernoulli likelihood needs binary data"),
    (["--likelihood", "gaussian", "--binarize", "fixed"], "Bernoulli likelihood needs binary"),
    (["--binarize", "sometimes"], "argument --binarize: invalid choice"),
    (["--device", "tpu"], "argument --device: invalid choice"),
    (["--likelihood", "gaussian", "--model-factory", "m.py:f"], "has its own"),
    (["--latent-dim", "4", "--hidden", "8", "--model-factory", "m.py:f"],
     "--latent-dim and --hidden size the built-in VAE"),
])
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
    assert bench.main(["--likelihood", "gaussian", "--estimators", "meanfield", *TINY,
                       "--out", str(out)]) == 0
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
            pyro.sample("x", dist.Normal(self.loading(z), self.log_noise.exp()).to_event(1),
                        obs=x)

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
    assert bench.main(["--model-factory", factory, "--binarize", "none", "--estimators", "iwae",
                       *TINY, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["binarize"] == "none" and results["config"]["likelihood"] is None
    (run,) = results["runs"]
    assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"]


def test_a_users_bernoulli_pair_on_the_intensities_is_refused(bench, tmp_path, capsys):
    out = tmp_path / "out"
    factory = f"{Path(__file__).resolve()}:build_bernoulli"
    assert bench.main(["--model-factory", factory, "--binarize", "none", *TINY,
                       "--out", str(out)]) == 2
    err = _one_error_line(capsys)
    assert "_BernoulliPair cannot score the data" in err and "--binarize none" in err
    assert not out.exists()


# ------------------------------------------------------------------------------ warm-up

def test_warmup_starts_where_training_does(bench, monkeypatch):
    """The β of each training step: from TrainConfig.warmup_start (as ``pyro-vae train``) to β
    over ``--warmup`` steps, then β (also for the SNR draws at the final parameters)."""
    betas = []
    make = bench.make_estimator

    def recording(*args, **kwargs):
        estimator = make(*args, **kwargs)
        loss = estimator.differentiable_loss

        def differentiable_loss(*loss_args):
            betas.append(estimator.beta)
            return loss(*loss_args)

        estimator.differentiable_loss = differentiable_loss
        return estimator

    monkeypatch.setattr(bench, "make_estimator", recording)
    warmup, beta, batch_size = 2, 0.8, 500
    config = bench.BenchmarkConfig(estimators=("meanfield",), seeds=(0,), epochs=1,
                                   batch_size=batch_size, beta=beta, warmup=warmup,
                                   eval_particles=2, curve_particles=1, snr_draws=2)
    data = bench.load_data(config)
    bench.train_run("meanfield", 0, config, data)
    steps = math.ceil(data.train.shape[0] / batch_size)
    start = TrainConfig().warmup_start
    expected = [start + (beta - start) * min(step, warmup) / warmup for step in range(steps)]
    assert betas == pytest.approx(expected + [beta] * config.snr_draws)
    assert betas[0] == pytest.approx(start) and start > 0


# ------------------------------------------------------------------------------ refusals, device

def test_a_conditional_pair_is_refused_plainly(bench, tmp_path, capsys):
    factory = tmp_path / "conditional.py"
    factory.write_text("from pyro_vae.cvae import CVAE\n\n\n"
                       "def build(input_dim, name):\n"
                       "    return CVAE(input_dim, 10, name=name)\n")
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
    assert bench.main(["--device", "cuda", "--estimators", "trace", "dreg", *TINY,
                       "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["device"].startswith("cuda")
    for run in results["runs"]:
        assert math.isfinite(run["test_log_px"]) and run["test_log_px"] >= run["test_elbo"]
        assert run["snr_encoder"] > 0 and run["snr_decoder"] > 0
