"""A user's own model/guide pair, defined only here, through every tool of the package."""

import copy
import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam, pyro_method
from references import per_datapoint_elbo
from torch import nn
from torch.distributions import constraints

from pyro_vae import VAE, ConfigError, TrainConfig, fit
from pyro_vae.app.cli import EXIT_USER_ERROR, main
from pyro_vae.core.protocol import check_model
from pyro_vae.data.builtin import evaluation_images, prepare_data
from pyro_vae.data.specs import load_factory
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.models.cvae import CVAE
from pyro_vae.models.vae2 import VAE2
from pyro_vae.runs import MODEL_CLASS_KEY, load_run, read_config
from pyro_vae.util.errors import CheckpointError


class MixturePriorVAE(nn.Module):
    """A VAE whose prior is a learned mixture of Gaussians, written as a plain Pyro pair."""

    def __init__(
        self,
        input_dim: int,
        name: str = "mixture_vae",
        latent_dim: int = 2,
        components: int = 10,
        hidden: int = 64,
    ):
        super().__init__()
        self.name = name
        self.mixture_logits = nn.Parameter(torch.zeros(components))
        self.mixture_locs = nn.Parameter(2.0 * torch.randn(components, latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.Softplus(), nn.Linear(hidden, input_dim)
        )
        self.encoder = nn.Sequential(
            nn.Linear(input_dim, hidden), nn.Softplus(), nn.Linear(hidden, 2 * latent_dim)
        )

    def model(self, x):
        pyro.module(self.name + "_model", self)
        prior = dist.MixtureSameFamily(
            dist.Categorical(logits=self.mixture_logits),
            dist.Normal(self.mixture_locs, torch.ones_like(self.mixture_locs)).to_event(1),
        )
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def build(input_dim, name):
    """The factory the benchmark takes: ``--model-factory tests/train/test_own_model.py:build``."""
    return MixturePriorVAE(input_dim, name=name)


def test_the_package_trains_and_evaluates_a_users_pair(tmp_path):
    """``train`` and ``evaluate_dataset`` on the pair above: the test ELBO rises above the
    untrained pair's and the gap log p̂_K(x) − ELBO is ≥ 0, both as per-image paired
    differences beyond 3 standard errors of their mean (the ELBO of the gap from the ``trace``
    estimator, independent of the evaluator's log-weights)."""
    model = MixturePriorVAE(64)
    untrained = copy.deepcopy(model)
    config = TrainConfig(epochs=8, batch_size=128, eval_particles=4, final_particles=50)
    result = fit(config=config, run_dir=tmp_path / "run", model=model, progress=False)
    assert result.model is model
    final = json.loads((tmp_path / "run" / "history.json").read_text())["final"]
    assert final == result.history.extra["final"] and final["particles"] == 50
    assert (tmp_path / "run" / "curves.png").exists()
    assert not (tmp_path / "run" / "samples.png").exists()  # the pair has no sample()

    images = evaluation_images(prepare_data(config, torch.device("cpu")), "test", config)[:100]
    with pyro.validation_enabled(False):
        before, after = (
            evaluate_dataset(pair.model, pair.guide, images, num_particles=100, khat=False)
            for pair in (untrained, model)
        )
    gain = (after.elbo - before.elbo).double()
    assert gain.mean() > 3 * gain.std() / gain.numel() ** 0.5
    gap = after.log_px.double() - per_datapoint_elbo(model, (images,), particles=50)
    assert gap.mean() > -3 * gap.std() / gap.numel() ** 0.5


def test_the_estimator_benchmark_compares_estimators_on_a_users_pair(tmp_path, bench):
    out = tmp_path / "out"
    factory = f"{Path(__file__).resolve()}:build"
    assert (
        bench.main(
            [
                "--model-factory",
                factory,
                "--estimators",
                "trace",
                "dreg",
                "--seeds",
                "0",
                "--epochs",
                "1",
                "--importance-samples",
                "3",
                "--eval-particles",
                "20",
                "--curve-particles",
                "5",
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
    rows = {row["estimator"]: row for row in json.loads((out / "results.json").read_text())["runs"]}
    assert set(rows) == {"trace", "dreg"}
    for row in rows.values():
        assert row["snr_encoder"] > 0 and row["snr_decoder"] > 0
        assert row["test_log_px"] >= row["test_elbo"]


class _NoPlate(MixturePriorVAE):
    def guide(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(2))


class _NoEvent(MixturePriorVAE):
    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4))


class _UnplatedDimension(MixturePriorVAE):
    def guide(self, x):
        with pyro.plate("data", x.shape[0], dim=-2):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4))


class _WrongSize(MixturePriorVAE):
    def guide(self, x):
        with pyro.plate("data", 2 * x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(2 * x.shape[0], 2), 1.0).to_event(1))


class _NotReparameterized(MixturePriorVAE):
    """A count latent: no rsample and no finite support to sum over (a Categorical would be
    accepted: summed out when marked for enumeration, or sampled by vimco)."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Poisson(torch.ones(x.shape[0])))
            pyro.sample(
                "x", dist.Bernoulli(logits=self.decoder(torch.stack([z, z], -1))).to_event(1), obs=x
            )

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Poisson(torch.ones(x.shape[0])))


class _GlobalLoadings(MixturePriorVAE):
    """Everyday Pyro: factor-analysis loadings in the global param store, beside the module's
    encoder; the optimizer over ``module.parameters()`` would never move them."""

    def model(self, x):
        loadings = pyro.param("loadings", lambda: 0.1 * torch.randn(2, x.shape[1]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ loadings).to_event(1), obs=x)


class _StoredLoadings(MixturePriorVAE):
    """Loadings read from the global param store by name alone (set up outside the pair)."""

    def model(self, x):
        loadings = pyro.param("loadings")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ loadings).to_event(1), obs=x)


class _NoParameters(nn.Module):
    def model(self, x):
        pass

    def guide(self, x):
        pass


@pytest.mark.parametrize(
    "model, message",
    [
        (object(), "must be a torch.nn.Module"),
        (_NoParameters(), "no trainable parameters"),
        (_NoPlate(64), "data plate"),
        (_NoEvent(64), r"Shape mismatch .*\.to_event\(1\)"),
        (_UnplatedDimension(64), r"guide's site 'z' .* dimension\(s\) \[-1\] in no plate"),
        (_WrongSize(64), "has size 8 but the batch has 4 rows"),
        (_NotReparameterized(64), "not reparameterizable"),
        (
            _GlobalLoadings(64),
            r"param site\(s\) \['loadings'\] of _GlobalLoadings are not "
            r"parameters of the module.*nn\.Parameter",
        ),
        (
            _StoredLoadings(64),
            r"KeyError 'loadings' \(if that names a pyro\.param read without an "
            r"initial value, make the parameter an nn\.Parameter",
        ),
    ],
)
def test_what_a_pair_needs_is_checked_with_a_clear_message(model, message):
    x = torch.bernoulli(torch.full((4, 64), 0.3))
    with pytest.raises(ConfigError, match=message):
        check_model(model, x)


class _PyroModulePair(PyroModule):
    """Loadings and a positive noise scale as PyroParams: inside a ``pyro_method`` they are
    param sites whose values are the constrained transforms of the module's own (unconstrained)
    parameters."""

    def __init__(self, input_dim: int):
        super().__init__()
        self.encoder = nn.Linear(input_dim, 4)
        self.loadings = PyroParam(0.1 * torch.randn(2, input_dim))
        self.noise = PyroParam(torch.ones(input_dim), constraint=constraints.positive)

    @pyro_method
    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.loadings, self.noise).to_event(1), obs=x)

    @pyro_method
    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-4).to_event(1))


def test_param_sites_of_the_modules_own_parameters_pass_whatever_the_param_store_holds():
    """pyro.module and the package's register_module send the module's own tensors as param
    sites, PyroParams their constrained transforms; all pass, also when Pyro's global param store
    holds an older pair's entries under the same names (which ``pyro.module`` would send), and
    the check leaves the store as it found it."""
    x = torch.bernoulli(torch.full((4, 64), 0.3))
    with pyro.get_param_store().scope():
        pyro.module("mixture_vae_model", MixturePriorVAE(64))  # an older pair of the same name
        before = dict(pyro.get_param_store().named_parameters())
        for pair in (
            VAE(64),
            VAE(64, guide="full"),
            VAE(64, likelihood="gaussian"),
            VAE2(64),
            MixturePriorVAE(64),
            _PyroModulePair(64),
        ):
            check_model(pair, x)
        check_model(CVAE(64, 10), x, torch.arange(4))
        after = dict(pyro.get_param_store().named_parameters())
    assert before.keys() == after.keys()
    assert all(before[name] is after[name] for name in before)


def test_train_checks_a_users_pair_before_training():
    with pytest.raises(ConfigError, match="data plate"):
        fit(config=TrainConfig(epochs=1), model=_NoPlate(64), progress=False)


def test_factories_are_loaded_from_a_module_or_a_file(tmp_path):
    assert load_factory("pyro_vae.models.vae:VAE").__name__ == "VAE"
    assert load_factory(f"{Path(__file__).resolve()}:build")(64, "m").name == "m"
    for spec, message in [
        ("no-colon", "MODULE:FUNCTION"),
        ("nonexistent_mod_xyz:f", "import"),
        ("pyro_vae.models.vae:nothing", "no callable"),
        (f"{tmp_path}/missing.py:f", "no file"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_factory(spec)


def test_a_users_run_resumes_from_python_and_the_command_line_refuses_it(tmp_path, capsys):
    """The run folder records the pair's class; Python resumes it (given a fresh pair) to the
    uninterrupted run's parameters and history, while load_run without the pair and the CLI's
    evaluate, sample and train --resume refuse it in one line, leaving the folder unchanged."""
    config = TrainConfig(epochs=3, batch_size=128, eval_particles=2, final_particles=0)
    initial = MixturePriorVAE(64)
    full = fit(copy.deepcopy(initial), config=config, run_dir=tmp_path / "full", progress=False)
    part = tmp_path / "part"
    fit(copy.deepcopy(initial), config=config.replace(epochs=1), run_dir=part, progress=False)
    recorded = f"{MixturePriorVAE.__module__}.MixturePriorVAE"
    assert json.loads((part / "config.json").read_text())[MODEL_CLASS_KEY] == recorded
    assert read_config(part) == config.replace(epochs=1)

    refusal = rf"{part} holds a model defined in Python \({recorded}\).*load_run\("
    with pytest.raises(CheckpointError, match=refusal):
        load_run(part, device="cpu")
    with pytest.raises(CheckpointError, match=refusal):
        fit(config=config, run_dir=part, resume=True, progress=False)
    with pytest.raises(
        CheckpointError,
        match=rf"does not fit the given model \(it holds "
        rf"{recorded}\)",
    ):
        fit(
            MixturePriorVAE(64, hidden=32), config=config, run_dir=part, resume=True, progress=False
        )
    history = (part / "history.json").read_text()
    for argv in (
        ["evaluate", str(part)],
        ["sample", str(part)],
        ["train", "--resume", str(part), "--epochs", "3", "--quiet"],
    ):
        assert main(argv) == EXIT_USER_ERROR
        err = capsys.readouterr().err
        assert "model defined in Python" in err and len(err.strip().splitlines()) == 1, err
    assert (part / "history.json").read_text() == history

    resumed = fit(
        MixturePriorVAE(64),
        config=read_config(part).replace(epochs=3),
        run_dir=part,
        resume=True,
        progress=False,
    )
    for name, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert resumed.history.train_loss == full.history.train_loss
    assert resumed.history.test_elbo == full.history.test_elbo
    loaded = load_run(part, device="cpu", model=MixturePriorVAE(64))
    assert loaded.history.epoch == [1, 2, 3]
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name
