"""Pairs in the forms Pyro users write them: plain functions with ``pyro.param``, AutoGuides,
and factories returning ``(model, guide)``, through fit, the run folder and the command line."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from user_models import FactorAnalysis, fa_data, fa_guide, fa_model

from pyro_vae import fit
from pyro_vae.app.cli import main
from pyro_vae.core.pairs import PyroPair, isolated_run
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.runs import load_run
from pyro_vae.util.errors import ConfigError

USER_MODELS = str(Path(__file__).resolve().parents[1] / "support" / "user_models.py")


def _exact_fa_log_likelihood(x):
    loadings, mean, noise = (pyro.param(name).detach() for name in ("loadings", "mean", "noise"))
    cov = loadings @ loadings.T + noise**2 * torch.eye(x.shape[-1])
    return dist.MultivariateNormal(mean, cov).log_prob(x).mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_plain_functions_with_pyro_param_reach_what_pyros_svi_reaches(seed):
    """The same functions, data, steps and learning rate: fit's ``trace`` and Pyro's SVI with
    Trace_ELBO end at the same exact log-likelihood of the factor-analysis model."""
    x = torch.as_tensor(fa_data(200))
    pyro.set_rng_seed(seed)
    svi = SVI(fa_model, fa_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(max_plate_nesting=1))
    initial = None
    for step in range(300):
        svi.step(x)
        initial = _exact_fa_log_likelihood(x) if step == 0 else initial
    reference = _exact_fa_log_likelihood(x)
    pyro.clear_param_store()
    result = fit(
        fa_model,
        fa_guide,
        x,
        elbo="trace",
        batch_size=200,
        epochs=300,
        lr=0.05,
        seed=seed,
        progress=False,
    )
    assert isinstance(result.model, PyroPair)
    assert result.model.adopted == ["encoder_weight", "encoder_scale", "loadings", "mean", "noise"]
    ours = _exact_fa_log_likelihood(x)
    assert reference > initial + 1.0
    assert abs(ours - reference) < 0.02, (ours, reference)


def test_a_function_pair_checkpoints_its_params_by_name_and_resumes_exactly(tmp_path):
    x = fa_data(80)
    options = dict(batch_size=20, lr=0.05, progress=False)
    full = fit(fa_model, fa_guide, x, epochs=6, run_dir=tmp_path / "full", **options)
    expected = {name: value.detach().clone() for name, value in full.model.state_dict().items()}
    assert sorted(expected) == sorted(f"param_store.{name}" for name in full.model.adopted)
    pyro.clear_param_store()
    fit(fa_model, fa_guide, x, epochs=3, run_dir=tmp_path / "part", **options)
    pyro.clear_param_store()  # the pair owns its entries: a cleared store loses nothing
    resumed = fit(
        fa_model, fa_guide, x, epochs=6, run_dir=tmp_path / "part", resume=True, **options
    )
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    pyro.clear_param_store()
    loaded = load_run(tmp_path / "part", device="cpu", model=(fa_model, fa_guide))
    loaded.model.model(torch.as_tensor(x[:2]))  # entries are loaded as the pair reads them
    loaded.model.guide(torch.as_tensor(x[:2]))
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    torch.testing.assert_close(pyro.param("noise").detach(), expected["param_store.noise"].exp())


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal])
def test_an_autoguide_trained_by_fit_finds_a_conjugate_posterior(autoguide):
    """μ ~ N(0, 10² I), x_n ~ N(μ, I): the posterior is N(Σ x / (n + 0.01), 1 / (n + 0.01)),
    which a mean-field Gaussian guide holds exactly (trained on half-batches: the global
    latent's rate weighted by the batch's share)."""
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor([2.0, -1.0])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)

    guide = autoguide(model)
    fit(
        model,
        guide,
        x,
        elbo="meanfield",
        particles=4,
        batch_size=50,
        epochs=300,
        lr=0.02,
        progress=False,
    )
    precision = x.shape[0] + 1e-2
    if autoguide is AutoNormal:
        loc, scale = guide.locs.mu, guide.scales.mu
    else:
        loc, scale = guide.loc, guide.scale
    torch.testing.assert_close(loc.detach(), x.sum(0) / precision, atol=0.03, rtol=0)
    torch.testing.assert_close(scale.detach(), torch.full((2,), precision**-0.5), rtol=0.25, atol=0)


def test_an_autodelta_guide_is_the_maximum_a_posteriori_point():
    """A Delta guide on a global latent: the ELBO is log p(x, μ), maximized at the MAP."""
    x = torch.randn(60, generator=torch.Generator().manual_seed(1)) * 0.5 + 3.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 0.5), obs=x)

    guide = AutoDelta(model)
    fit(model, guide, x, elbo="trace", batch_size=60, epochs=400, lr=0.05, progress=False)
    exact = x.sum() / 0.25 / (x.shape[0] / 0.25 + 1.0)
    assert abs(guide.median()["mu"].item() - exact.item()) < 1e-3


def test_the_evaluator_scores_a_function_pair_with_its_trained_entries():
    x = torch.as_tensor(fa_data(120))
    result = fit(fa_model, fa_guide, x, epochs=40, batch_size=60, lr=0.05, progress=False)
    exact = torch.tensor(0.0)
    loadings, mean, noise = (pyro.param(n).detach() for n in ("loadings", "mean", "noise"))
    exact = (
        dist.MultivariateNormal(mean, loadings @ loadings.T + noise**2 * torch.eye(5))
        .log_prob(x)
        .double()
    )
    scored = evaluate_dataset(
        result.model.model, result.model.guide, x, num_particles=2000, khat=False
    )
    gap = exact - scored.log_px
    assert (gap > -0.05).all() and gap.mean() < 0.1


def test_the_command_line_trains_a_factory_that_returns_model_and_guide(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "train.npz", x=fa_data(60))
    common = [
        "--model-factory",
        f"{USER_MODELS}:make_fa_functions",
        "--data",
        "train.npz",
        "--batch-size",
        "20",
        "--device",
        "cpu",
        "--quiet",
        "--lr",
        "0.05",
    ]
    assert main(["train", *common, "--epochs", "4", "--out", "full"]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", "part"]) == 0
    pyro.clear_param_store()
    assert main(["train", "--resume", "part", "--epochs", "4", "--quiet"]) == 0
    full, part = (
        json.loads((tmp_path / run / "history.json").read_text()) for run in ("full", "part")
    )
    assert full["train_loss"] == part["train_loss"]
    capsys.readouterr()
    assert main(["evaluate", "part", "--split", "train", "--particles", "20", "--quiet"]) == 0
    assert "60 datapoints, K = 20 particles" in capsys.readouterr().out
    log_px = json.loads((tmp_path / "part" / "eval-train.json").read_text())["summary"]["log_px"][
        "mean"
    ]
    pyro.clear_param_store()
    loaded = load_run(tmp_path / "part", device="cpu")  # rebuilt from the recorded factory
    assert isinstance(loaded.model, PyroPair)
    exact = _exact_fa_log_likelihood(torch.as_tensor(fa_data(60)))
    assert math.isfinite(log_px) and exact - 0.3 < log_px < exact + 0.05, (log_px, exact)


def test_pairs_in_a_form_fit_cannot_take_are_refused_in_one_line():
    x = fa_data(10)
    with pytest.raises(ConfigError, match="not a model/guide pair: give the guide too"):
        fit(fa_model, x, progress=False)
    with pytest.raises(ConfigError, match="already has model and guide methods"):
        fit(FactorAnalysis(), fa_guide, x, progress=False)
    with pytest.raises(ConfigError, match="the guide must be callable"):
        fit(fa_model, guide=3, data=x, progress=False)
    with pytest.raises(ConfigError, match=r"\(model, data\) or \(model, guide, data\)"):
        fit(fa_model, fa_guide, x, x, progress=False)


def test_fit_reads_the_data_plate_a_pair_names_when_several_plates_hold_every_site():
    """Sequences of steps, both plates holding every site: without a name the pair is refused
    in one line, with ``data_plate`` it trains and is scored per sequence."""
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))

    def model(x):
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("sequences", x.shape[0], dim=-2), pyro.plate("steps", x.shape[1]):
            z = pyro.sample("z", dist.Normal(loc, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def guide(x):
        with pyro.plate("sequences", x.shape[0], dim=-2), pyro.plate("steps", x.shape[1]):
            pyro.sample("z", dist.Normal(0.8 * x, 0.5))

    with pytest.raises(ConfigError, match=r"several plates \['sequences', 'steps'\]"):
        fit(model, guide, x, epochs=1, progress=False)
    result = fit(
        PyroPair(model, guide, data_plate="sequences"),
        x,
        test_data=x,
        epochs=3,
        batch_size=6,
        lr=0.05,
        progress=False,
    )
    scored = evaluate_dataset(
        result.model.model, result.model.guide, x, num_particles=5, data_plate="sequences"
    )
    assert scored.log_px.shape == (12,)
    assert math.isfinite(result.history.extra["final"]["test_log_px"])


def test_the_sparse_gamma_def_trains_with_fit_on_its_whole_data_set(monkeypatch):
    """Pyro's sparse gamma DEF (two layers here): global Gamma weights, local Gamma latents
    whose guide holds a parameter per datapoint. fit checks the pair on its first batch as
    training sees it (not on two rows, which would size the guide's parameters to them), so
    the whole data set as one batch trains: the dataset ELBO rises."""
    from benchmark_loader import load_benchmark

    model, guide, (counts,) = load_benchmark("conformance", monkeypatch)._sparse_gamma_def()

    def dataset_elbo(pair):
        scored = evaluate_dataset(pair.model, pair.guide, counts, num_particles=500, khat=False)
        return float(scored.elbo.sum()) + scored.global_term.mean

    result = fit(
        model,
        guide,
        counts,
        elbo="meanfield",
        batch_size=len(counts),
        epochs=1,
        lr=0.05,
        progress=False,
        final_particles=0,
    )
    before = dataset_elbo(result.model)
    result = fit(
        result.model,
        counts,
        elbo="meanfield",
        batch_size=len(counts),
        epochs=300,
        lr=0.05,
        progress=False,
        final_particles=0,
    )
    assert dataset_elbo(result.model) > before + 20
    assert result.model.param_store["alpha_z_top"].shape == (len(counts), 3)


def test_a_guide_with_a_parameter_per_datapoint_trains_on_the_whole_data_set_in_order():
    """q(z_n) = N(m_n, s_n²) with one parameter per row, as Pyro's sparse gamma DEF writes its
    guide: one batch of the whole data set keeps the rows in their order, so each m_n meets its
    own x_n and reaches the exact posterior mean x_n / 2 (shuffled rows would average them)."""
    x = torch.randn(8, generator=torch.Generator().manual_seed(0)) * 2

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", lambda: torch.zeros(len(x)))
        scale = pyro.param(
            "scale", lambda: torch.ones(len(x)), constraint=dist.constraints.positive
        )
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, scale))

    result = fit(
        model,
        guide,
        x,
        elbo="meanfield",
        batch_size=len(x),
        epochs=400,
        lr=0.05,
        progress=False,
        final_particles=0,
    )
    torch.testing.assert_close(result.model.param_store["loc"].detach(), x / 2, atol=0.1, rtol=0)


@pytest.mark.parametrize("elbo", ["trace", "iwae"])
def test_a_function_pair_trains_compiled_as_it_trains_eagerly(elbo):
    """compile=True captures the step of a PyroPair (its adopted entries are parameters of the
    module): the same losses and parameters as the eager run, up to float rounding (with
    inductor's random numbers taken from torch's eager generator, as the compiled-step tests
    do: its own generator draws other numbers of the same distribution)."""
    import torch._inductor.config as inductor_config

    x = fa_data(120)
    runs = {}
    for compile in (False, True):
        pyro.clear_param_store()
        with inductor_config.patch(fallback_random=True):  # torch's own patcher: undone as set
            result = fit(
                fa_model,
                fa_guide,
                x,
                elbo=elbo,
                importance_samples=2 if elbo == "iwae" else 1,
                epochs=3,
                batch_size=40,
                lr=0.05,
                progress=False,
                seed=0,
                final_particles=0,
                compile=compile,
            )
        runs[compile] = result
    compiled = runs[True].compiled
    assert compiled.compiled_steps == 9 and compiled.disabled is None
    assert runs[True].history.train_loss == pytest.approx(runs[False].history.train_loss, rel=1e-5)
    for name, value in runs[True].model.state_dict().items():
        torch.testing.assert_close(value, runs[False].model.state_dict()[name], rtol=0, atol=1e-4)


class _RegisteringVAE(torch.nn.Module):
    """A VAE written as Pyro's examples write it: bound methods that register the networks
    with ``pyro.module`` (which hands Pyro's param store the modules' own parameters)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 4)
        self.decoder = torch.nn.Linear(2, 6)
        self.drop = torch.nn.Dropout(0.1)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 1.0).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            out = self.encoder(self.drop(x))
            pyro.sample("z", dist.Normal(out[..., :2], out[..., 2:].exp()).to_event(1))


def test_the_bound_methods_of_a_module_registered_by_pyro_module_train_and_follow_its_mode():
    """The module behind the bound methods is the pair's: its own parameters are trained (not
    copies that its networks never read) and the pair's eval mode reaches its dropout."""
    torch.manual_seed(0)
    vae = _RegisteringVAE()
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    pair = PyroPair(vae.model, vae.guide)
    fit(
        pair,
        torch.randn(40, 6) + 2.0,
        elbo="trace",
        batch_size=40,
        epochs=20,
        lr=0.05,
        seed=0,
        progress=False,
        final_particles=0,
    )
    assert all(not torch.equal(p, before[name]) for name, p in vae.named_parameters()), [
        name for name, p in vae.named_parameters() if torch.equal(p, before[name])
    ]
    pair.eval()
    assert not vae.training and not vae.drop.training
    assert {id(p) for p in pair.parameters()} == {id(p) for p in vae.parameters()}


def test_a_module_outside_plain_functions_that_pyro_module_registers_is_trained():
    torch.manual_seed(0)
    decoder = torch.nn.Linear(2, 6)
    before = decoder.weight.detach().clone()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0], 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.5).to_event(1))

    result = fit(
        model,
        guide,
        torch.randn(30, 6) + 1.0,
        elbo="trace",
        batch_size=30,
        epochs=10,
        lr=0.05,
        seed=0,
        progress=False,
        final_particles=0,
    )
    assert not torch.equal(decoder.weight, before)
    assert any(p is decoder.weight for p in result.model.parameters())


@pytest.mark.parametrize(
    "likelihood, refused",
    [
        (lambda x: dist.Categorical(logits=torch.zeros(x.shape + (4,))), "{0, ..., 3}"),
        (lambda x: dist.Beta(torch.ones_like(x), 1.0), "[0.0, 1.0]"),
        (lambda x: dist.Binomial(5 * torch.ones_like(x), 0.5), None),  # bounds per datapoint
    ],
)
def test_every_batch_is_checked_against_the_support_without_running_the_pair(likelihood, refused):
    from pyro_vae.core.protocol import check_batches, check_data
    from pyro_vae.data.batches import as_source
    from pyro_vae.util.errors import DataError

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", likelihood(x).to_event(1), obs=x)

    x = torch.full((7, 3), 0.5 if refused == "[0.0, 1.0]" else 1.0)
    x[6, 1] = 9.0
    pair = PyroPair(model, lambda x: None)
    first = next(iter(as_source(x).ordered(4)))
    checks = check_data(pair, *first.args)  # rows 0..3 are fine
    if refused is None:
        assert checks == []
        return
    with pytest.raises(DataError, match=rf"values 9 outside {re.escape(refused)}.*\(row 6\)$"):
        check_batches(checks, as_source(x).ordered(4))


@pytest.mark.parametrize("validate", [True, False, None])
def test_an_isolated_run_leaves_nothing_behind(validate):
    """Inside: an empty param store, the validation asked for, effects hidden from a trace
    around it; afterwards the random state, the store and BatchNorm's statistics as before."""
    net = torch.nn.BatchNorm1d(3).train()
    pyro.clear_param_store()
    pyro.param("kept", torch.ones(2))
    state = torch.get_rng_state()
    statistics = [b.clone() for b in net.buffers()]
    outer_validation = pyro.infer.util.is_validation_enabled()

    def look():
        with isolated_run(net, validate=validate):
            assert list(pyro.get_param_store().keys()) == []
            inside = pyro.infer.util.is_validation_enabled()
            assert inside == (outer_validation if validate is None else validate)
            net(torch.randn(5, 3))
            pyro.param("left", torch.zeros(1))
            pyro.sample("z", dist.Normal(0.0, 1.0))

    trace = pyro.poutine.trace(look).get_trace()
    assert [name for name, site in trace.nodes.items() if site["type"] in ("sample", "param")] == []
    assert torch.equal(torch.get_rng_state(), state)
    assert list(pyro.get_param_store().keys()) == ["kept"]
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), statistics))
