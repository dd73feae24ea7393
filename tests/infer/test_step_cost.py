"""What one step of each estimator runs, counted in network calls on the built-in VAE (one
local latent site): the costs ``docs/estimators.rst`` states in "Choosing an estimator"."""

from __future__ import annotations

import pytest
from counting import counted_vae

from pyro_vae.infer import CLASSES, ESTIMATORS, make_estimator

#: (estimator, K, options) -> (encoder calls, decoder calls) of one step after the first
EXPECTED = {
    ("trace", 1, None): (1, 1),
    ("meanfield", 1, None): (1, 1),
    ("iwae", 5, None): (1, 1),
    ("stl", 1, None): (1, 1),  # one local site: log q read from the traced site, no replay
    ("dreg", 5, None): (1, 1),  # the gradient gate: one run
    ("vimco", 5, None): (1, 1),
    ("renyi", 5, None): (1, 1),
    ("renyi", 5, (("gradient", "dreg"),)): (1, 2),  # the model again, on detached draws
    ("ciwae", 5, None): (1, 1),
    ("miwae", 5, None): (1, 1),
    ("piwae", 5, None): (1, 2),  # the model again, on detached draws
    ("rws", 5, None): (1, 1),  # the model runs on detached draws in the one run
    ("tvo", 5, None): (1, 1),
}


def test_every_estimator_has_a_stated_cost():
    assert {name for name, _, _ in EXPECTED} == set(ESTIMATORS)


@pytest.mark.parametrize("name, k, options", list(EXPECTED))
def test_network_calls_per_step(name, k, options):
    vae, calls, x = counted_vae()
    particles = 1 if CLASSES[name].single_particle_is is None else 2  # miwae, piwae: M >= 2
    estimator = make_estimator(name, particles, k, max_plate_nesting=1, options=dict(options or ()))
    estimator.loss_and_grads(vae.model, vae.guide, x)  # the first call probes the pair
    calls.clear()
    estimator.loss_and_grads(vae.model, vae.guide, x)
    assert (calls["encoder"], calls["decoder"]) == EXPECTED[name, k, options]
