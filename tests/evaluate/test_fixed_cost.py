"""What an evaluation runs besides its particle chunks: counted network calls, not seconds.

The fixed work of one evaluation is the plate nesting's guess (one run of the pair, skipped
when ``max_plate_nesting`` is given), the vectorization probe (skipped for one particle, which
needs no particle plate) and Pyro's validation (inside a small first chunk, or one separate
one-particle run before large ones). Skipping work must leave the numbers as they were.
"""

from __future__ import annotations

import pyro
import pytest
import torch
from counting import counted_vae
from references import plain_pyro_log_weight

from pyro_vae import evaluate as ev
from pyro_vae.evaluate.chunks import VALIDATED_CHUNK


@pytest.mark.parametrize(
    "num_particles, nesting_given, expected",
    [
        (1, False, 2),  # the nesting's guess and the one chunk, validated itself
        (1, True, 1),  # the chunk alone
        (5, True, 4),  # the probe's vectorized run and two replays, and the chunk
        (40, True, 1 + 3 + 2),  # a separate validation run, the probe, two chunks of 20
    ],
)
def test_network_calls_per_evaluation(num_particles, nesting_given, expected):
    vae, calls, x = counted_vae()
    with pyro.validation_enabled(True):
        ev.evaluate_dataset(
            vae.model,
            vae.guide,
            x,
            num_particles=num_particles,
            batch_size=12,
            particle_chunk=20,
            max_plate_nesting=1 if nesting_given else None,
        )
    assert calls == {"encoder": expected, "decoder": expected}


@pytest.mark.parametrize("validate", [True, False])
def test_one_particle_is_the_pair_run_on_its_own(validate):
    # A chunk of one particle is drawn without a particle plate: its log-weights are those of
    # one plain run of the guide and of the model replayed on it, from the same random state.
    vae, _, x = counted_vae()
    torch.manual_seed(3)
    with pyro.validation_enabled(validate):
        got = ev.evaluate(vae.model, vae.guide, x, num_particles=1, khat=False).log_weights
    torch.manual_seed(3)
    expected = plain_pyro_log_weight(vae.model, vae.guide, x)
    assert got.shape == (1, 12)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("num_particles", [1, VALIDATED_CHUNK, VALIDATED_CHUNK + 1])
def test_validation_still_checks_the_data(num_particles):
    vae, _, x = counted_vae()
    x[2, 5] = 0.5  # not a Bernoulli value
    with pyro.validation_enabled(True), pytest.raises(ValueError, match="support"):
        ev.evaluate(vae.model, vae.guide, x, num_particles=num_particles)
    with pyro.validation_enabled(False):  # unchecked, the density is still finite
        ev.evaluate(vae.model, vae.guide, x, num_particles=num_particles)
