"""What one draw reads from its traces, counted: the shared scale factor is read once per draw
(the checks and the loss both need it), and refusing differing factors still happens."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import VAE
from pyro_vae.core import particles as particles_module
from pyro_vae.infer import make_estimator
from pyro_vae.util.errors import ConfigError


def _counting_common_scale(monkeypatch) -> list[int]:
    calls = []
    original = particles_module.common_scale

    def counting(model_trace, guide_trace):
        calls.append(1)
        return original(model_trace, guide_trace)

    monkeypatch.setattr(particles_module, "common_scale", counting)
    return calls


def _vae_batch() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    return VAE(6, 2, (5,)), torch.bernoulli(torch.full((4, 6), 0.5))


@pytest.mark.parametrize("name, k", [("iwae", 3), ("trace", 1), ("dreg", 2)])
def test_the_scale_factor_is_read_once_per_draw(name, k, monkeypatch):
    vae, x = _vae_batch()
    estimator = make_estimator(name, importance_samples=k, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        estimator.differentiable_loss(vae.model, vae.guide, x)  # the pair's first-call checks
        calls = _counting_common_scale(monkeypatch)
        for _ in range(3):
            estimator.differentiable_loss(vae.model, vae.guide, x)
    assert len(calls) == 3


def test_a_common_scale_is_applied_and_differing_scales_are_still_refused():
    vae, x = _vae_batch()
    estimator = make_estimator("iwae", importance_samples=3, max_plate_nesting=1)
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(1)
        plain = estimator.differentiable_loss(vae.model, vae.guide, x)
        pyro.set_rng_seed(1)
        scaled = estimator.differentiable_loss(
            poutine.scale(vae.model, 4.0), poutine.scale(vae.guide, 4.0), x
        )
        assert torch.equal(scaled, 4.0 * plain)
        with pytest.raises(ConfigError, match="has scale"):
            estimator.differentiable_loss(poutine.scale(vae.model, 2.0), vae.guide, x)
