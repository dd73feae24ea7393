"""What an evaluation runs besides its particle chunks: counted network calls, not seconds.

The fixed work of one evaluation is one plain run of the pair (the plate nesting's guess and the
automatic chunk's size; skipped when ``max_plate_nesting`` is given and the chunk is not
automatic, or for one particle with a given nesting), the vectorization probe (two one-particle
replays of the first chunk's first and last particles; none for one particle, which needs no
particle plate) and Pyro's validation (inside a small first chunk, or one separate one-particle
run before large ones). Skipping work must leave the numbers as they were.
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
    "num_particles, nesting_given, chunk, expected",
    [
        (1, False, 20, 2),  # the nesting's guess and the one chunk, validated itself
        (1, True, 20, 1),  # the chunk alone
        (1, True, "auto", 1),  # one particle needs no size
        (5, True, 20, 1 + 2),  # the chunk, its first and last particles replayed
        (5, False, 20, 1 + 1 + 2),  # and the plain run that guesses the nesting
        (5, True, "auto", 1 + 1 + 2),  # or that sizes the chunk (all 5: 12 × 16 pixels)
        (40, True, 20, 1 + 1 + 2 + 1),  # a separate validation run, two chunks, two replays
        (40, True, None, 1 + 1 + 2),  # all 40 in one chunk
        (
            40,
            True,
            1,
            3 + 40,
        ),  # one-particle chunks: the probe runs apart, vectorized and two replays
    ],
)
def test_network_calls_per_evaluation(num_particles, nesting_given, chunk, expected):
    vae, calls, x = counted_vae()
    with pyro.validation_enabled(True):
        ev.evaluate_dataset(
            vae.model,
            vae.guide,
            x,
            num_particles=num_particles,
            batch_size=12,
            particle_chunk=chunk,
            max_plate_nesting=1 if nesting_given else None,
        )
    assert calls == {"encoder": expected, "decoder": expected}


def test_the_probe_runs_once_per_call_not_per_batch():
    vae, calls, x = counted_vae()
    with pyro.validation_enabled(False):
        ev.evaluate_dataset(
            vae.model, vae.guide, x, num_particles=5, batch_size=4, max_plate_nesting=1
        )
    # the plain run that sizes the chunk, three batches of one chunk each, and the probe's two
    # replays on the first
    assert calls == {"encoder": 1 + 3 + 2, "decoder": 1 + 3 + 2}


@pytest.mark.parametrize("chunk", [2, 3, 5])
def test_the_probe_on_the_first_chunk_leaves_the_draws_as_they_were(chunk):
    # the probe's replays run on a fork: the chunks' draws are those of plain vectorized calls
    vae, _, x = counted_vae()
    torch.manual_seed(4)
    got = ev.evaluate(vae.model, vae.guide, x, num_particles=5, particle_chunk=chunk)
    torch.manual_seed(4)
    expected = ev.log_weights(vae.model, vae.guide, x, num_particles=5, particle_chunk=chunk)
    assert got.vectorized is True
    torch.testing.assert_close(got.log_weights, expected, rtol=0, atol=0)


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
