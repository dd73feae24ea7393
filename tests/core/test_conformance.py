"""Pairs written the way Pyro's own tests and tutorials write them, against Pyro's ELBOs.

Each case is checked against a reference that does not share the package's code: Pyro's
``TraceEnum_ELBO`` (loss and every parameter's gradient, on the same random numbers), a closed
form, or an exact property (a guide equal to a fully enumerated model has the bound 0).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal

from pyro_vae import fit
from pyro_vae.evaluate import evaluate
from pyro_vae.infer import make_estimator
from pyro_vae.util.errors import ConfigError

SUMMING = ("trace", "iwae", "stl", "dreg", "meanfield")
DATA = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])


@pytest.fixture
def cases(monkeypatch):
    """benchmarks/conformance.py, whose cases these tests share."""
    from benchmark_loader import load_benchmark

    return load_benchmark("conformance", monkeypatch)


@pytest.fixture
def mixture(cases):
    """The Gaussian-mixture tutorial's model: global weights, scale and locations, and each
    datapoint's assignment enumerated in the model."""
    return cases.mixture_model


def _globals(msg):
    return msg["name"] in ("weights", "scale", "locs")


def _gradients(loss, params):
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDelta, AutoDiagonalNormal])
@pytest.mark.parametrize("name", SUMMING)
def test_model_side_enumeration_equals_trace_enum_elbo_on_the_same_draws(autoguide, name, mixture):
    guide = autoguide(poutine.block(mixture, expose_fn=_globals))
    guide(DATA)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    torch.manual_seed(3)
    reference = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(mixture, guide, DATA)
    torch.manual_seed(3)
    loss = make_estimator(name, max_plate_nesting=1).differentiable_loss(mixture, guide, DATA)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
    if name in ("stl", "dreg"):  # the same value; the guide's score term left out by design
        return
    for ours, theirs in zip(_gradients(loss, params), _gradients(reference, params)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_evaluators_elbo_of_model_side_enumeration_is_trace_enum_elbos_in_expectation(mixture):
    """The dataset ELBO (per-datapoint ELBOs plus the global term) against the mean of
    TraceEnum_ELBO over as many draws: the assignment is summed, not drawn from its prior."""
    guide = AutoNormal(poutine.block(mixture, expose_fn=_globals), init_scale=0.3)
    guide(DATA)
    draws = 1500
    torch.manual_seed(0)
    with torch.no_grad():
        losses = torch.tensor(
            [TraceEnum_ELBO(max_plate_nesting=1).loss(mixture, guide, DATA) for _ in range(draws)]
        )
    result = evaluate(mixture, guide, DATA, num_particles=draws, data_plate="data")
    ours = float(result.elbo.sum()) + result.global_term.mean
    error = 4 * math.sqrt(2) * float(losses.std()) / math.sqrt(draws)
    assert abs(ours + float(losses.mean())) < error, (ours, -float(losses.mean()), error)


def test_a_fully_enumerated_model_with_an_empty_guide_is_scored_exactly():
    """All latents enumerated in the model, parameters as pyro.param, the guide empty (as
    Pyro's discrete HMM examples write it): the weight is p(x) itself."""
    locs = torch.tensor([-2.0, 3.0])

    @config_enumerate
    def model(data):
        probs = pyro.param("probs", torch.tensor([0.3, 0.7]))
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Categorical(probs))
            pyro.sample("obs", dist.Normal(locs[c], 1.0), obs=data)

    def guide(data):
        pass

    exact = torch.logsumexp(
        dist.Normal(locs, 1.0).log_prob(DATA[:, None]) + torch.tensor([0.3, 0.7]).log(), -1
    )
    result = evaluate(model, guide, DATA, num_particles=2)
    torch.testing.assert_close(result.log_px, exact.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(result.elbo, exact.double(), rtol=0, atol=1e-5)
    for name in SUMMING:
        loss = make_estimator(name, max_plate_nesting=1).differentiable_loss(model, guide, DATA)
        reference = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, DATA)
        torch.testing.assert_close(loss, -exact.sum(), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("subsample_size", [None, 2, 5])
@pytest.mark.parametrize("name", SUMMING)
def test_enumeration_under_subsampled_plates_and_a_sequential_plate_has_bound_zero(
    name, subsample_size
):
    """Guide = model, nothing observed, every site enumerated: Σ_x q(x) [log p(x) − log q(x)]
    and log Σ_x p(x) are both 0, with or without subsampling (each configuration must see the
    same subsample)."""
    probs = torch.tensor(0.3, requires_grad=True)

    @config_enumerate
    def model():
        with pyro.plate("outer", 10, subsample_size=subsample_size) as rows:
            for i in pyro.plate("inner", 6, subsample_size=3):
                pyro.sample(f"x_{i}", dist.Bernoulli(probs).expand([len(rows)]))

    for _ in range(3):
        loss = make_estimator(name, max_plate_nesting=1).differentiable_loss(model, model)
        assert abs(float(loss.detach())) < 1e-5, float(loss.detach())
    result = evaluate(model, model, num_particles=4)
    torch.testing.assert_close(result.log_px, torch.zeros_like(result.log_px), atol=1e-6, rtol=0)


def test_a_site_enumerated_inside_a_nested_plate_is_summed_plate_by_plate():
    """c_nj enumerated in the guide inside plate j nested in the data plate: log p(x_n) =
    Σ_j log Σ_c π_c N(x_nj; μ_c, 1) (a product of sums, not a sum of products), exact at one
    particle for the evaluator and iwae, trace the ELBO; those that run the pair once per
    configuration refuse it."""
    locs, logits = torch.tensor([-1.0, 2.0, 4.0]), torch.tensor([0.1, -0.4, 0.3])
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * 2

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("cells", x.shape[1], dim=-1):
            c = pyro.sample("c", dist.Categorical(logits=logits))
            pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("cells", x.shape[1], dim=-1):
            pyro.sample(
                "c", dist.Categorical(logits=torch.zeros(3)), infer={"enumerate": "parallel"}
            )

    exact = torch.logsumexp(
        dist.Normal(locs, 1.0).log_prob(x[..., None]) + logits.log_softmax(-1), -1
    ).sum(-1)
    result = evaluate(model, guide, x, num_particles=1, data_plate="data")
    torch.testing.assert_close(result.log_px, exact.double(), rtol=0, atol=1e-5)
    loss = make_estimator("iwae", max_plate_nesting=2, data_plate="data").differentiable_loss(
        model, guide, x
    )
    torch.testing.assert_close(loss, -exact.sum(), rtol=1e-6, atol=1e-4)
    # trace: TraceEnum_ELBO's Σ_nj Σ_c q(c)[log p(x_nj, c) − log q(c)], q uniform
    log_joint = dist.Normal(locs, 1.0).log_prob(x[..., None]) + logits.log_softmax(-1)
    elbo = ((log_joint + math.log(3)) / 3).sum()
    loss = make_estimator("trace", max_plate_nesting=2, data_plate="data").differentiable_loss(
        model, guide, x
    )
    torch.testing.assert_close(loss, -elbo, rtol=1e-6, atol=1e-4)
    for name in ("stl", "dreg", "meanfield"):
        with pytest.raises(ConfigError, match="nested in the data plate 'data'.*in the model"):
            make_estimator(name, max_plate_nesting=2, data_plate="data").differentiable_loss(
                model, guide, x
            )


def test_a_guide_latent_that_depends_on_a_model_enumerated_site_is_refused_in_one_line():
    @config_enumerate
    def model(data):
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            z = pyro.sample("z", dist.Normal(c, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(data, 1.0))

    with pytest.raises(ConfigError, match="depends on the sites enumerated in the model"):
        make_estimator("trace", max_plate_nesting=1).differentiable_loss(model, guide, DATA)


def test_the_mixture_tutorial_trains_with_fit_as_with_pyros_svi_and_is_scored_exactly(mixture):
    """The Gaussian-mixture tutorial (assignments enumerated in the model, an AutoDelta guide
    for the globals): fit reaches the parameters Pyro's SVI with TraceEnum_ELBO reaches on the
    same data, steps and Adam, and the evaluator's dataset ELBO of a point-mass guide is
    −TraceEnum_ELBO's loss exactly (the assignments summed, not drawn)."""

    def init(site):
        values = {
            "weights": torch.ones(2) / 2,
            "scale": torch.tensor(5.0),
            "locs": DATA[torch.tensor([0, 2])],
        }
        return values[site["name"]]

    def make_guide():
        return AutoDelta(poutine.block(mixture, expose_fn=_globals), init_loc_fn=init)

    reference_guide = make_guide()
    svi = pyro.infer.SVI(
        mixture, reference_guide, pyro.optim.Adam({"lr": 0.1}), TraceEnum_ELBO(max_plate_nesting=1)
    )
    for _ in range(200):
        svi.step(DATA)
    reference = {k: v.detach() for k, v in reference_guide.median().items()}
    pyro.clear_param_store()
    guide = make_guide()
    result = fit(mixture, guide, DATA, epochs=200, batch_size=len(DATA), lr=0.1, progress=False)
    for name, value in guide.median().items():
        torch.testing.assert_close(value.detach(), reference[name], atol=2e-3, rtol=0)
    with torch.no_grad():
        loss = TraceEnum_ELBO(max_plate_nesting=1).loss(mixture, guide, DATA)
    scored = evaluate(result.model.model, result.model.guide, DATA, num_particles=3)
    torch.testing.assert_close(
        float(scored.elbo.sum()) + scored.global_term.mean, -loss, atol=1e-3, rtol=0
    )


def test_ais_anneals_to_the_marginal_of_a_model_that_enumerates_its_class():
    """A mixture of factor analysers whose class is enumerated in the model and whose guide
    proposes z alone from a broad N(0, 1.5²): AIS's target is p(x, z) with the class summed
    out, so it estimates the exact log p(x)."""
    from mixtures import LATENT, MixtureOfFactorAnalysers, points

    from pyro_vae.evaluate.ais import ais

    pair = MixtureOfFactorAnalysers(enumerate_y=False)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], LATENT), 1.5).to_event(1))

    x = points(6, seed=5)
    exact = pair.exact_log_likelihood(x).double()
    torch.manual_seed(0)
    result = ais(config_enumerate(pair.model), guide, x, num_chains=16, num_steps=400)
    error = result.log_px - exact
    assert error.abs().mean() < 0.1 and error.abs().max() < 0.3, error


@pytest.mark.parametrize("name", SUMMING)
def test_a_pair_whose_marked_site_appears_after_unmarked_calls_is_still_summed(name):
    """The estimators draw a pair without enumeration after a first call that enumerated
    nothing; a later call whose model marks a site for enumeration (the class observed on
    labelled batches, summed on the others) must still sum it, exactly."""
    locs = torch.tensor([-2.0, 3.0])
    probs = torch.tensor([0.3, 0.7])

    def model(data, c=None):
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Categorical(probs), obs=c, infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(locs[c], 1.0), obs=data)

    def guide(data, c=None):
        pass

    estimator = make_estimator(name, max_plate_nesting=1)
    labels = torch.tensor([0, 1, 1, 0, 1])
    for _ in range(2):
        labelled = estimator.differentiable_loss(model, guide, DATA, labels)
        exact = dist.Normal(locs[labels], 1.0).log_prob(DATA) + probs.log()[labels]
        torch.testing.assert_close(labelled, -exact.sum(), rtol=1e-6, atol=1e-5)
    summed = estimator.differentiable_loss(model, guide, DATA)
    exact = torch.logsumexp(dist.Normal(locs, 1.0).log_prob(DATA[:, None]) + probs.log(), -1)
    torch.testing.assert_close(summed, -exact.sum(), rtol=1e-6, atol=1e-5)


def test_the_evaluator_names_the_summed_bound_apart_from_the_elbo(cases):
    """With a site enumerated in the guide, the mean log-weight is E log Σ_c w_c, which lies
    above the ELBO TraceEnum_ELBO computes: the result says which sites are summed, reports
    both, each by its own name, and its ELBO is TraceEnum_ELBO's (exact here: the only latent
    is discrete)."""
    from pyro_vae.evaluate.results import format_table

    case = next(c for c in cases.CASES if c.name == "enum_guide_discrete")
    model, guide, (x,) = case.build()
    guide(x)
    result = evaluate(model, guide, x, num_particles=1)
    assert result.summed_sites == ("c",)
    with torch.no_grad():
        elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x)
    assert result.elbo.sum().item() > elbo + 1e-3
    assert result.trace_enum_elbo.sum().item() == pytest.approx(elbo, abs=1e-4)
    table = format_table(result.summary())
    assert "E log Σ_c w" in table and "\nELBO" in table and "TraceEnum_ELBO's" in table
    assert result.to_dict()["summary"]["trace_enum_elbo"]["mean"] == pytest.approx(
        elbo / len(x), abs=1e-5
    )
    plain = format_table(evaluate(*_plain_pair(), x, num_particles=2).summary())
    assert (
        "\nELBO" in plain
        and "summed" not in plain
        and "trace_enum" not in str(evaluate(*_plain_pair(), x, num_particles=2).summary())
    )


def test_the_evaluators_elbo_of_a_guide_with_enumerated_and_continuous_sites_is_trace_enums(cases):
    """Guide sites enumerated in the data plate and in a plate nested in it, a continuous site
    drawn given them and a site enumerated in the model: the evaluator's ELBO (many particles)
    agrees with TraceEnum_ELBO's in expectation, within four standard errors."""
    case = next(c for c in cases.CASES if c.name == "enum_guide_nested_plates")
    model, guide, (x,) = case.build()
    guide(x)
    pyro.set_rng_seed(0)
    result = evaluate(model, guide, x, num_particles=1000, data_plate="data")
    ours = result.trace_enum_elbo.sum().item()
    with torch.no_grad():
        draws = torch.tensor(
            [-TraceEnum_ELBO(max_plate_nesting=2).loss(model, guide, x) for _ in range(200)]
        )
    assert abs(ours - draws.mean().item()) < 4 * draws.std().item() / 200**0.5, (ours, draws.mean())
    assert (result.elbo > result.trace_enum_elbo).all()  # the summed bound lies above


def _plain_pair():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    return model, guide


def test_a_pair_without_a_data_plate_is_scored_as_one_datapoint_the_data_set():
    """No plate holds the observed vector: evaluate scores the whole data set as one
    datapoint (with the guide the exact posterior, log p̂ is log p(x) exactly, the marginal of
    a conjugate Normal mean) and says per-datapoint statistics do not apply."""
    from pyro_vae.evaluate.results import format_table

    x = torch.tensor([0.4, -0.3, 1.2])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(mu, 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(x):  # the exact posterior N(Σx / (n + 1), 1 / (n + 1))
        pyro.sample("mu", dist.Normal(x.sum() / 4, 0.5))

    result = evaluate(model, guide, x, num_particles=5)
    exact = dist.MultivariateNormal(torch.zeros(3), torch.eye(3) + 1.0).log_prob(x)
    assert result.whole_data_set and result.log_px.shape == (1,)
    torch.testing.assert_close(result.log_px, exact.double().reshape(1), rtol=0, atol=1e-5)
    assert "scored as one datapoint" in format_table(result.summary())


def test_a_guide_latent_drawn_before_an_enumerated_site_it_depends_on_in_the_model():
    """scANVI's shape: the guide draws z1, then enumerates y ~ q(y | z1); the model draws z1
    given y. The model's log p(z1 | y) carries y's enumeration dimension, which the guide
    sums: trace equals TraceEnum_ELBO on the same draws. A guide latent that depends in the
    model on a site the *model* enumerates is refused in one line."""

    def model(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(torch.ones(2) / 2))
            z1 = pyro.sample("z1", dist.Normal(torch.tensor([-1.0, 1.0])[y], 1.0))
            pyro.sample("x", dist.Normal(z1, 0.5), obs=x)

    def guide(x):
        w = pyro.param("w", torch.tensor(0.7))
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(w * x, 0.6))
            pyro.sample(
                "y",
                dist.Categorical(logits=torch.stack([-z1, z1], -1)),
                infer={"enumerate": "parallel"},
            )

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, DATA)
    pyro.set_rng_seed(0)
    ours = make_estimator("trace", max_plate_nesting=1).differentiable_loss(model, guide, DATA)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    def unguided_y(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z1", dist.Normal(0.7 * x, 0.6))

    with pytest.raises(
        ConfigError,
        match=r"model site 'z1', which the guide samples, depends "
        r"on the sites enumerated in the model \['y'\]",
    ):
        make_estimator("trace", max_plate_nesting=1).differentiable_loss(
            config_enumerate(model), unguided_y, DATA
        )
