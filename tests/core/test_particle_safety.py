"""Networks written for [batch, ...] inputs, as users write them: the evaluator either draws its
particles in one vectorized call that they cannot observe, or finds out that they can and draws
one particle per call. Either way its log-weights are those of a plain Pyro loop over particles.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from batchnorm_pair import BatchNormTwoSiteGuide
from pyro import poutine
from references import plain_pyro_log_weight
from torch import nn

from pyro_vae import VAE
from pyro_vae.core.vectorization import particle_mismatch
from pyro_vae.evaluate import evaluate, evaluate_dataset

N, D, LATENT, K = 12, 6, 3, 7


class _Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(D, 2 * LATENT)
        self.decoder = nn.Linear(LATENT, D)

    def guide(self, x):
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))

    def prior(self, x):
        return dist.Normal(x.new_zeros(x.shape[0], LATENT), 1.0).to_event(1)


class SoftmaxOverRows(_Pair):
    """Topic-model style: word probabilities by ``softmax(dim=1)``, the feature axis of a
    ``[N, D]`` input and the datapoint axis of a ``[K, N, D]`` one."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            probs = torch.softmax(self.decoder(z), dim=1)
            pyro.sample("x", dist.Multinomial(probs=probs, validate_args=False), obs=x)


class BatchNormDecoder(_Pair):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(D)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", dist.Normal(self.norm(self.decoder(z)), 1.0).to_event(1), obs=x)


class MaskIndexing(_Pair):
    """Scores only the pixels a fixed mask keeps, selected by boolean indexing."""

    keep = torch.arange(D) % 2 == 0

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            mask = self.keep.expand(x.shape[0], D)
            loc = self.decoder(z)[mask].view(x.shape[0], -1)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[mask].view(x.shape[0], -1))


def _data(counts: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if counts:
        return torch.randint(0, 5, (N, D), generator=g).float()
    return torch.randn(N, D, generator=g)


def _plain_pyro_log_weights(pair: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: one ordinary Pyro call per particle, log p(x, z) − log q(z|x) per datapoint."""
    rows = [plain_pyro_log_weight(pair.model, pair.guide, x) for _ in range(K)]
    return torch.stack(rows)


@pytest.mark.parametrize(
    "pair_class, counts",
    [(SoftmaxOverRows, True), (BatchNormDecoder, False), (MaskIndexing, False)],
)
def test_networks_that_see_the_particle_dimension_are_scored_one_particle_at_a_time(
    pair_class, counts
):
    torch.manual_seed(0)
    pair, x = pair_class().eval(), _data(counts)
    assert particle_mismatch(pair.model, pair.guide, (x,), {}, max_plate_nesting=1) is not None
    with torch.no_grad():
        torch.manual_seed(1)
        reference = _plain_pyro_log_weights(pair, x)
        torch.manual_seed(1)
        result = evaluate(pair.model, pair.guide, x, num_particles=K)
    assert result.vectorized is False
    torch.testing.assert_close(result.log_weights, reference, rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    batched = evaluate_dataset(
        pair.model, pair.guide, x, num_particles=K, batch_size=N, keep_log_weights=True
    )
    torch.testing.assert_close(batched.log_weights, result.log_weights)


def test_the_packages_vae_keeps_its_vectorized_particles():
    vae = VAE(D, latent_dim=LATENT, hidden=(8,))
    x = (_data(False) > 0).float()
    assert particle_mismatch(vae.model, vae.guide, (x,), {}, max_plate_nesting=1) is None
    assert evaluate(vae.model, vae.guide, x, num_particles=K).vectorized is True


def test_evaluation_runs_in_eval_mode_and_restores_the_mode():
    class Dropout(_Pair):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def model(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", self.prior(x))
                pyro.sample("x", dist.Normal(self.drop(self.decoder(z)), 1.0).to_event(1), obs=x)

    pair, x = Dropout(), _data(False)
    results = []
    for train_mode in (True, False):
        pair.train(train_mode)
        torch.manual_seed(2)
        results.append(evaluate(pair.model, pair.guide, x, num_particles=K).log_weights)
        assert pair.training is train_mode and pair.drop.training is train_mode
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def _plain_pyro_trace_loss(pair: nn.Module, x: torch.Tensor) -> torch.Tensor:
    guide_trace = poutine.trace(pair.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(pair.model, trace=guide_trace)).get_trace(x)
    return -(model_trace.log_prob_sum() - guide_trace.log_prob_sum())


@pytest.mark.parametrize("name", ["trace", "meanfield", "stl"])
def test_one_draw_per_step_needs_no_particle_dimension_and_matches_plain_pyro(name):
    """trace, meanfield and stl with one draw run the pair as plain Pyro does: trace has the
    loss and gradient of a plain Pyro trace, stl its loss (its gradient drops the score term),
    meanfield runs (its KL is exact, so its value differs)."""
    from pyro_vae.infer import make_estimator

    torch.manual_seed(0)
    pair, x = SoftmaxOverRows().eval(), _data(True)
    params = [p for p in pair.parameters()]
    torch.manual_seed(4)
    loss = make_estimator(name).differentiable_loss(pair.model, pair.guide, x)
    grads = torch.autograd.grad(loss, params)
    if name == "meanfield":
        assert torch.isfinite(loss)
        return
    torch.manual_seed(4)
    reference = _plain_pyro_trace_loss(pair, x)
    torch.testing.assert_close(loss, reference)
    if name == "stl":
        return
    for mine, theirs in zip(grads, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, options",
    [
        ("iwae", {"importance_samples": 3}),
        ("dreg", {"importance_samples": 3}),
        ("trace", {"num_particles": 2}),
    ],
)
@pytest.mark.parametrize("pair_class", [SoftmaxOverRows, BatchNormDecoder, MaskIndexing])
def test_several_draws_per_step_are_refused_for_networks_that_see_them(name, options, pair_class):
    from pyro_vae.infer import make_estimator
    from pyro_vae.util.errors import ConfigError

    torch.manual_seed(0)
    pair, x = pair_class().eval(), _data(pair_class is SoftmaxOverRows)
    with pytest.raises(
        ConfigError,
        match=f"{name} draws [23] particles per step in one "
        "vectorized call, but .*broadcast over leading",
    ):
        make_estimator(name, **options).loss(pair.model, pair.guide, x)


def test_fit_trains_such_a_pair_with_one_draw_and_scores_it_one_particle_at_a_time():
    from pyro_vae import fit
    from pyro_vae.util.errors import ConfigError

    x = _data(True)
    torch.manual_seed(0)
    result = fit(
        SoftmaxOverRows(),
        x,
        test_data=x,
        elbo="trace",
        epochs=2,
        batch_size=6,
        eval_particles=3,
        final_particles=4,
        progress=False,
    )
    assert all(torch.isfinite(torch.tensor(result.history.test_elbo)))
    with pytest.raises(ConfigError, match="iwae draws 4 particles per step"):
        fit(
            SoftmaxOverRows(),
            x,
            elbo="iwae",
            importance_samples=4,
            epochs=1,
            final_particles=0,
            progress=False,
        )


@pytest.mark.parametrize("name", ["stl", "dreg"])
def test_estimators_that_replay_the_guide_refuse_active_dropout(name):
    from pyro_vae.infer import make_estimator
    from pyro_vae.util.errors import ConfigError

    class DropoutGuide(BatchNormDecoder):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.2)

        def guide(self, x):
            loc, raw = self.encoder(self.drop(x)).chunk(2, -1)
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))

    pair, x = DropoutGuide().train(), _data(False)
    with pytest.raises(
        ConfigError, match=f"{name} replays the guide .* DropoutGuide has dropout active"
    ):
        make_estimator(name).loss(pair.model, pair.guide, x)
    pair.eval()
    assert torch.isfinite(torch.tensor(make_estimator("stl").loss(pair.model, pair.guide, x)))


@pytest.mark.parametrize("name, single_pass", [("stl", True), ("dreg", True), ("dreg", False)])
def test_replays_leave_running_statistics_as_the_steps_one_run_left_them(name, single_pass):
    """Two training steps of stl and dreg (which replay the guide, and dreg's two-run surrogate
    also the model) move BatchNorm's running statistics exactly as trace's steps do on the same
    random numbers (one update per step, the guessing of the plate nesting included), and the
    steps' backward passes still run."""
    from pyro_vae.infer import DoublyReparameterizedELBO, make_estimator

    class TwoRunDReG(DoublyReparameterizedELBO):  # the model runs again on detached draws
        draw_view = None

    x = _data(False)
    torch.manual_seed(0)
    initial = BatchNormTwoSiteGuide()
    statistics = {}
    for estimator_name in ("trace", name):
        pair = BatchNormTwoSiteGuide()
        pair.load_state_dict(initial.state_dict())
        estimator = (
            make_estimator(estimator_name)
            if single_pass or estimator_name == "trace"
            else TwoRunDReG()
        )
        pyro.set_rng_seed(4)
        for _ in range(2):
            estimator.differentiable_loss(pair.model, pair.guide, x).backward()
        statistics[estimator_name] = dict(pair.second[1].named_buffers())
    assert statistics["trace"]["num_batches_tracked"].item() == 2
    for buffer, value in statistics[name].items():
        assert torch.equal(value, statistics["trace"][buffer]), buffer


def test_fits_checks_of_the_pair_leave_running_statistics_alone():
    """Before training, fit runs the pair on two datapoints of the first batch (checking its
    sites, guessing its plate nesting, probing the particle dimension): none of these runs may
    move BatchNorm's running statistics, so one epoch of one batch moves them once."""
    from pyro_vae import fit

    torch.manual_seed(0)
    pair = BatchNormTwoSiteGuide()
    fit(
        pair,
        _data(False),
        elbo="trace",
        epochs=1,
        batch_size=N,
        eval_particles=1,
        final_particles=0,
        progress=False,
    )
    assert pair.second[1].num_batches_tracked.item() == 1


@pytest.mark.parametrize(
    "pair_class, counts",
    [(SoftmaxOverRows, True), (BatchNormDecoder, False), (MaskIndexing, False)],
)
def test_ais_refuses_in_one_line_the_pairs_the_evaluator_scores_one_particle_at_a_time(
    pair_class, counts
):
    """AIS runs each datapoint's chains as a particle plate: a pair whose networks see that
    dimension would be annealed on wrong densities (or crash inside the network), so it is
    refused where the evaluator falls back to one particle per call."""
    from pyro_vae.evaluate.ais import ais
    from pyro_vae.util.errors import ConfigError

    torch.manual_seed(0)
    pair, x = pair_class().eval(), _data(counts)
    with pytest.raises(
        ConfigError,
        match="AIS runs the chains of every datapoint as one "
        "particle plate, but .*importance sampling",
    ):
        ais(pair.model, pair.guide, x, num_chains=4, num_steps=3)
