"""VIMCO on a model small enough that the importance-weighted bound and its gradient can be
computed exactly by enumerating every configuration of the K discrete draws."""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.infer import VIMCO, make_estimator
from pyro_vae.util.errors import ConfigError

X = torch.tensor([0.5, -1.0])
K = 3


class Tiny(nn.Module):
    """y ~ Bernoulli(0.3), x ~ N(2y − 1, 1) per datapoint; guide q(y) = Bernoulli(σ(φ_n))."""

    def __init__(self):
        super().__init__()
        self.phi = nn.Parameter(torch.tensor([0.3, -0.4]))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Bernoulli(0.3 * torch.ones_like(x)))
            pyro.sample("x", dist.Normal(2 * y - 1, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Bernoulli(logits=self.phi))


def exact_bound(pair: Tiny) -> torch.Tensor:
    """E over all 2^K draws of log (1/K) Σ_k w_k, summed over the datapoints."""
    q = torch.sigmoid(pair.phi)
    total = 0.0
    for draws in itertools.product([0.0, 1.0], repeat=K):
        y = torch.tensor(draws)[:, None].expand(K, len(X))
        log_q = dist.Bernoulli(probs=q).log_prob(y)
        log_p = dist.Bernoulli(0.3).log_prob(y) + dist.Normal(2 * y - 1, 1.0).log_prob(X)
        bound = torch.logsumexp(log_p - log_q, 0) - math.log(K)
        total = total + log_q.sum(0).exp() * bound
    return total.sum()


class PlainScoreFunction(VIMCO):
    """The same bound with the plain score-function gradient: learning signal L̂, no baseline."""

    @staticmethod
    def _leave_one_out(log_w):
        return torch.zeros_like(log_w)


def _gradients(estimator_class, runs=30, particles=500):
    pair = Tiny()
    grads = []
    with pyro.validation_enabled(False):
        for run in range(runs):
            torch.manual_seed(run)
            estimator = estimator_class(particles, K, max_plate_nesting=1)
            loss = estimator.differentiable_loss(pair.model, pair.guide, X)
            grads.append(torch.autograd.grad(-loss, pair.phi)[0])
    grads = torch.stack(grads)
    return grads.mean(0), grads.std(0) / math.sqrt(runs), pair


def test_vimco_is_unbiased_for_the_exact_gradient_and_beats_the_plain_score_function():
    mean, stderr, pair = _gradients(VIMCO)
    exact = torch.autograd.grad(exact_bound(pair), pair.phi)[0]
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)
    plain_mean, plain_stderr, _ = _gradients(PlainScoreFunction)
    assert ((plain_mean - exact).abs() < 4 * plain_stderr).all()
    assert (stderr < plain_stderr).all(), (stderr, plain_stderr)


def test_the_vimco_loss_is_the_importance_weighted_bound():
    pair = Tiny()
    torch.manual_seed(0)
    with pyro.validation_enabled(False):
        loss = make_estimator("vimco", 20000, K, max_plate_nesting=1).loss(
            pair.model, pair.guide, X
        )
    assert abs(-loss - exact_bound(pair).item()) < 0.02


def test_vimco_needs_two_importance_samples_and_others_refuse_discrete_sites():
    with pytest.raises(ConfigError, match="importance_samples >= 2"):
        make_estimator("vimco", 1, 1, max_plate_nesting=1)
    pair = Tiny()
    with pytest.raises(ConfigError, match="mark it for enumeration .* or sample it with the vimco"):
        make_estimator("iwae", 1, 2, max_plate_nesting=1).differentiable_loss(
            pair.model, pair.guide, X
        )


def test_a_mixture_with_a_sampled_class_trained_by_vimco_reaches_scikit_learns_fit():
    import sys
    from pathlib import Path

    from sklearn.mixture import GaussianMixture as SklearnMixture

    from pyro_vae import fit

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
    from mixtures import GaussianMixture, mixture_data

    data = mixture_data()
    reference = (
        -SklearnMixture(3, covariance_type="spherical", random_state=0)
        .fit(data.numpy())
        .score(data.numpy())
    )
    torch.manual_seed(0)
    pair = GaussianMixture(enumerate_y=False)  # q(y|x) sampled: its classifier learns by VIMCO
    with torch.no_grad():
        pair.means.copy_(data[torch.randperm(len(data))[:3]])
    fit(
        pair,
        data,
        epochs=40,
        batch_size=100,
        lr=0.1,
        elbo="vimco",
        importance_samples=5,
        progress=False,
        final_particles=0,
        seed=0,
    )
    ours = -pair.exact_log_likelihood(data).mean().item()
    assert reference - 0.005 < ours < reference + 0.01, (ours, reference)


def exact_elbo(pair: Tiny) -> torch.Tensor:
    """Σ_y q(y) [log p(x, y) − log q(y)], summed over the datapoints."""
    q = torch.sigmoid(pair.phi)
    total = 0.0
    for value in (0.0, 1.0):
        y = torch.full_like(X, value)
        log_q = dist.Bernoulli(probs=q).log_prob(y)
        log_p = dist.Bernoulli(0.3).log_prob(y) + dist.Normal(2 * y - 1, 1.0).log_prob(X)
        total = total + log_q.exp() * (log_p - log_q)
    return total.sum()


@pytest.mark.parametrize("particles, runs", [(200, 30), (1, 1500)])
def test_the_trace_score_function_gradient_with_a_baseline_is_unbiased(particles, runs):
    pair = Tiny()
    exact = torch.autograd.grad(exact_elbo(pair), pair.phi)[0]
    estimator = make_estimator("trace", particles, 1, max_plate_nesting=1)  # one running baseline
    grads = []
    with pyro.validation_enabled(False):
        for run in range(runs):
            torch.manual_seed(run)
            loss = estimator.differentiable_loss(pair.model, pair.guide, X)
            grads.append(torch.autograd.grad(-loss, pair.phi)[0])
    grads = torch.stack(grads)
    mean, stderr = grads.mean(0), grads.std(0) / math.sqrt(runs)
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)
