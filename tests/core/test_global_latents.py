"""Global latent variables (sites outside the data plate) against closed forms.

The model: a global mean μ ~ N(0, s² I), local factors z_n ~ N(0, I) and
x_n = W z_n + μ + ε_n, ε_n ~ N(0, σ² I). Given μ, x_n ~ N(μ, C) with C = W Wᵀ + σ² I; the
posterior of μ given the data D is N(m, Λ⁻¹) with Λ = I/s² + N C⁻¹ and m = Λ⁻¹ C⁻¹ Σ_n x_n; the
predictive of a new x is N(m, C + Λ⁻¹), and log p(D) is a Gaussian log-density of all the data.
With the exact posteriors as guide every per-particle local weight is p(x_n | μ_k), so the
evaluator's log p̂_K(x) is a K-sample estimate of the predictive, and the dataset ELBO is
log p(D) for every draw of μ.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import fit
from pyro_vae.evaluate import evaluate, evaluate_dataset, format_table
from pyro_vae.train import Callback
from pyro_vae.util.errors import ConfigError

D, LATENT, PRIOR_SCALE, NOISE = 3, 2, 2.0, 0.5
DTYPE = torch.float64


class GlobalMean(nn.Module):
    def __init__(self, posterior: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(D, LATENT, generator=g, dtype=DTYPE)
        self.q_loc = nn.Parameter(torch.zeros(D, dtype=DTYPE))
        self.q_tril = torch.eye(D, dtype=DTYPE) * 0.3
        if posterior is not None:
            with torch.no_grad():
                self.q_loc.copy_(posterior[0])
            self.q_tril = torch.linalg.cholesky(posterior[1])

    @property
    def cov(self) -> torch.Tensor:
        return self.W @ self.W.T + NOISE**2 * torch.eye(D, dtype=DTYPE)

    def model(self, x):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(D, dtype=DTYPE), PRIOR_SCALE).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], LATENT), 1.0).to_event(1))
            loc = z @ self.W.T + mu  # mu: [D], or [K, 1, D] under a particle plate
            pyro.sample("x", dist.Normal(loc, NOISE).to_event(1), obs=x)

    def guide(self, x):
        mu = pyro.sample("mu", dist.MultivariateNormal(self.q_loc, scale_tril=self.q_tril))
        precision = torch.eye(LATENT, dtype=DTYPE) + self.W.T @ self.W / NOISE**2
        cov = torch.linalg.inv(precision)
        with pyro.plate("data", x.shape[0]):
            loc = (x - mu) @ self.W @ cov / NOISE**2
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov))


def _data(num: int, seed: int = 1) -> torch.Tensor:
    pair = GlobalMean()
    g = torch.Generator().manual_seed(seed)
    mu = torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE)
    z = torch.randn(num, LATENT, generator=g, dtype=DTYPE)
    return z @ pair.W.T + mu + NOISE * torch.randn(num, D, generator=g, dtype=DTYPE)


def _posterior(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c_inv = torch.linalg.inv(GlobalMean().cov)
    precision = torch.eye(D, dtype=DTYPE) / PRIOR_SCALE**2 + x.shape[0] * c_inv
    cov = torch.linalg.inv(precision)
    return cov @ c_inv @ x.sum(0), cov


def _log_evidence(x: torch.Tensor) -> float:
    n = x.shape[0]
    cov = torch.kron(torch.eye(n, dtype=DTYPE), GlobalMean().cov) + PRIOR_SCALE**2 * torch.kron(
        torch.ones(n, n, dtype=DTYPE), torch.eye(D, dtype=DTYPE)
    )
    return (
        dist.MultivariateNormal(torch.zeros(n * D, dtype=DTYPE), cov).log_prob(x.reshape(-1)).item()
    )


def test_per_datapoint_log_px_is_the_exact_predictive_within_shrinking_error():
    train, new = _data(20), _data(8, seed=2)
    loc, cov = _posterior(train)
    exact = dist.MultivariateNormal(loc, GlobalMean().cov + cov).log_prob(new)
    pair = GlobalMean((loc, cov))
    errors = {}
    for k in (30, 3000):
        torch.manual_seed(0)
        result = evaluate(pair.model, pair.guide, new, num_particles=k)
        errors[k] = (result.log_px - exact).abs().mean().item()
        assert result.global_term.sites == ("mu",)
    assert errors[3000] < 0.01 and errors[3000] < errors[30], errors


def test_the_dataset_elbo_of_the_exact_posterior_is_log_evidence():
    x = _data(20)
    pair = GlobalMean(_posterior(x))
    torch.manual_seed(0)
    result = evaluate(pair.model, pair.guide, x, num_particles=50)
    assert result.dataset_elbo == pytest.approx(_log_evidence(x), abs=1e-8)
    summary = result.summary()
    assert summary["global"]["sites"] == ["mu"]
    assert summary["global"]["dataset_elbo"] == pytest.approx(_log_evidence(x), abs=1e-8)
    table = format_table(summary)
    assert "dataset ELBO" in table and "predictive" in table
    # batches draw their own μ: an unbiased estimate (its spread, measured over seeds: 0.02)
    batched = evaluate_dataset(pair.model, pair.guide, x, num_particles=5000, batch_size=7)
    assert batched.dataset_elbo == pytest.approx(_log_evidence(x), abs=0.1)


def test_a_global_site_with_no_local_latent_is_scored_per_datapoint():
    def model(x):
        scale = pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, scale), obs=x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 0.1))

    x = torch.tensor([0.3, -1.0, 2.0])
    torch.manual_seed(0)
    result = evaluate(model, guide, x, num_particles=4000)
    torch.manual_seed(0)
    scales = dist.LogNormal(0.0, 0.1).sample((4000,))
    expected = dist.Normal(0.0, scales[:, None]).log_prob(x).logsumexp(0) - math.log(4000)
    torch.testing.assert_close(result.log_px, expected.double(), rtol=0, atol=5e-2)
    with pytest.raises(ConfigError, match="outside the data plate"):
        evaluate(model, guide, x, num_particles=4, data_plate="elsewhere")


class _IterateAverage(Callback):
    """The mean of the guide's q(μ) location over the second half of the epochs."""

    def __init__(self, epochs: int):
        self.start, self.values = epochs // 2, []

    def on_epoch_end(self, loop) -> None:
        if loop.epoch > self.start:
            self.values.append(loop.model.q_loc.detach().clone())

    @property
    def mean(self) -> torch.Tensor:
        return torch.stack(self.values).mean(0)


@pytest.mark.parametrize(
    "name, tolerance",
    [("stl", 1e-3), ("dreg", 1e-3), ("trace", 0.06), ("meanfield", 0.06), ("iwae", 0.06)],
)
def test_training_q_mu_with_each_estimator_recovers_the_exact_posterior_mean(name, tolerance):
    """With the exact local posterior and q(μ)'s exact covariance, every estimator at K = 1
    maximizes the dataset ELBO at q(μ)'s location = the posterior mean m. stl and dreg have
    zero-variance gradients there, so they land on m; the others within their noise (the
    iterates' average over the second half of the epochs; posterior sd of μ: 0.35-0.49)."""
    x = _data(20)
    loc, cov = _posterior(x)
    pair = GlobalMean((torch.zeros(D, dtype=DTYPE), cov))
    average = _IterateAverage(400)
    torch.manual_seed(0)
    fit(
        pair,
        x,
        elbo=name,
        epochs=400,
        batch_size=20,
        lr=0.05,
        final_particles=0,
        progress=False,
        callbacks=[average],
    )
    assert (average.mean - loc).abs().max().item() < tolerance


def test_minibatches_weight_the_global_term_by_their_share_of_the_data():
    """The engine sets global_weight = B / N each step, so the halves of a data set add up to
    its loss: exactly −log p(D) for the full batch with the exact posterior as guide (every
    draw gives it)."""
    from pyro_vae.infer import make_estimator

    x = _data(20)
    pair = GlobalMean(_posterior(x))
    estimator = make_estimator("stl")
    estimator.global_weight = 0.5
    torch.manual_seed(0)
    halves = sum(estimator.loss(pair.model, pair.guide, part) for part in (x[:10], x[10:]))
    estimator.global_weight = 1.0
    full = estimator.loss(pair.model, pair.guide, x)
    assert full == pytest.approx(-_log_evidence(x), abs=1e-8)
    # each half: −[Σ_half log p(x_n | μ) + ½ (log p(μ) − log q(μ))] at its own draw of μ; their
    # sum is −log p(D) in expectation over the two draws (its spread: a few nats)
    assert halves == pytest.approx(full, abs=10.0)


class SparseGammaDEF(nn.Module):
    """A one-layer sparse gamma deep exponential family on counts: global weights
    W ~ Gamma(0.3, 0.3) [K, V], local z_n ~ Gamma(0.3, 0.3) [K], x_n ~ Poisson(z_n W)."""

    def __init__(self, vocab: int = 8, topics: int = 2):
        super().__init__()
        self.q_w_shape = nn.Parameter(torch.zeros(topics, vocab))
        self.q_w_rate = nn.Parameter(torch.zeros(topics, vocab))
        self.encoder = nn.Linear(vocab, 2 * topics)
        self.topics, self.vocab = topics, vocab

    def model(self, x):
        w = pyro.sample(
            "w", dist.Gamma(x.new_full((self.topics, self.vocab), 0.3), 0.3).to_event(2)
        )
        with pyro.plate("documents", x.shape[0]):
            z = pyro.sample(
                "z", dist.Gamma(x.new_full((x.shape[0], self.topics), 0.3), 0.3).to_event(1)
            )
            # z: [..., N, K], w: [K, V] or, under a particle plate, [P, 1, K, V]
            rates = (z.unsqueeze(-1) * w).sum(-2)
            pyro.sample("x", dist.Poisson(rates + 1e-3).to_event(1), obs=x)

    def guide(self, x):
        softplus = nn.functional.softplus
        pyro.sample(
            "w",
            dist.Gamma(softplus(self.q_w_shape) + 0.1, softplus(self.q_w_rate) + 0.1).to_event(2),
        )
        shape, rate = self.encoder(torch.log1p(x)).chunk(2, -1)
        with pyro.plate("documents", x.shape[0]):
            pyro.sample("z", dist.Gamma(softplus(shape) + 0.1, softplus(rate) + 0.1).to_event(1))


@pytest.mark.parametrize("name", ["trace", "meanfield"])
def test_a_sparse_gamma_def_trains_through_fit_and_is_evaluated(name):
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(
        torch.rand(60, 2, generator=g) @ (3 * torch.rand(2, 8, generator=g)), generator=g
    )
    torch.manual_seed(0)
    result = fit(
        SparseGammaDEF(),
        counts,
        test_data=counts[:20],
        elbo=name,
        particles=4,
        epochs=40,
        batch_size=20,
        lr=0.05,
        final_particles=20,
        progress=False,
    )
    history = result.history
    assert history.test_elbo[-1] > history.test_elbo[0]
    torch.manual_seed(1)
    scored = evaluate_dataset(result.model.model, result.model.guide, counts[:20], num_particles=50)
    assert scored.global_term.sites == ("w",)
    assert math.isfinite(scored.dataset_elbo)
    assert scored.dataset_elbo < scored.elbo.sum().item()  # the global KL is positive
