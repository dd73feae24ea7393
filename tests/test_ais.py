"""Annealed importance sampling on factor analysis, whose log p(x) is exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import softplus

from pyro_vae.evaluate import evaluate
from pyro_vae.evaluate.ais import ais, sigmoid_schedule
from user_models import FactorAnalysis, fa_data


def _pair(x: torch.Tensor, offset: float = 0.0, scale: float | None = None) -> FactorAnalysis:
    """Factor analysis with the exact posterior as guide, or its mean moved by ``offset`` and
    a diagonal scale ``scale`` (a poor guide)."""
    pair = FactorAnalysis()
    with torch.no_grad():
        pair.W.copy_(torch.randn(5, 2, generator=torch.Generator().manual_seed(3)))
        pair.mu.copy_(x.mean(0))
        psi = softplus(pair.raw_psi) + 1e-4
        cov = torch.linalg.inv(torch.eye(2) + pair.W.T @ torch.diag(1 / psi) @ pair.W)
        gain = cov @ pair.W.T @ torch.diag(1 / psi)
        pair.A.copy_(gain)
        pair.b.copy_(-gain @ pair.mu + offset)
        tril = torch.linalg.cholesky(cov) if scale is None else scale * torch.eye(2)
        raw = tril.clone()
        raw.diagonal().copy_(torch.log(torch.expm1(tril.diagonal() - 1e-4)))
        pair.raw_tril.copy_(raw)
    return pair


def test_with_the_exact_posterior_as_guide_ais_is_exact_at_any_number_of_steps():
    x = torch.as_tensor(fa_data(6))
    pair = _pair(x)
    exact = pair.exact_log_likelihood(x).detach().double()
    torch.manual_seed(0)
    for steps in (1, 5):
        result = ais(pair.model, pair.guide, x, num_chains=4, num_steps=steps)
        torch.testing.assert_close(result.log_px, exact, rtol=0, atol=1e-5)


def test_more_annealing_steps_recover_more_of_what_a_poor_guide_misses():
    """A guide 1 unit off the posterior mean (posterior sd about 0.4) and 4 times too narrow:
    importance sampling with K = 5000 falls about 4 nats short; AIS's shortfall shrinks as the
    number of steps grows (this seed: 2.15 nats at 4 steps, 1.43 at 40; a run with 8 chains
    and 200 steps came within 0.17)."""
    x = torch.as_tensor(fa_data(6))
    pair = _pair(x, offset=1.0, scale=0.1)
    exact = pair.exact_log_likelihood(x).detach().double()
    torch.manual_seed(0)
    short_is = (exact - evaluate(pair.model, pair.guide, x, num_particles=5000).log_px).mean()
    shortfalls = [(exact - ais(pair.model, pair.guide, x, num_chains=16, num_steps=steps,
                               step_size=0.1).log_px).mean().item() for steps in (4, 40)]
    assert short_is > 3.0
    assert shortfalls[1] < shortfalls[0] - 0.3 and shortfalls[1] < short_is - 2.0, shortfalls


def test_the_sigmoid_schedule_rises_from_zero_to_one():
    betas = sigmoid_schedule(10)
    assert betas[0] == 0 and betas[-1] == 1 and bool((betas[1:] > betas[:-1]).all())
    assert betas[1] - betas[0] < betas[5] - betas[4]  # dense near the ends
    with pytest.raises(ValueError, match="rise from 0 to 1"):
        ais(lambda x: None, lambda x: None, torch.zeros(2, 5),
            schedule=torch.tensor([0.0, 0.5]))
    assert math.isclose(float(betas.sum()), 5.5, rel_tol=1e-9)  # symmetric about t = T/2
