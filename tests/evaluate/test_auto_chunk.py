"""The automatic particle chunk: sized from the largest sample-site tensor of one plain run of
the pair, used unless a chunk is given, and drawing what an explicit chunk of that size draws."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from counting import counted_vae
from linear_gaussian import LinearGaussian
from pyro import poutine

from pyro_vae import evaluate as ev
from pyro_vae.evaluate import sizing
from pyro_vae.evaluate.weights import resolve_draws
from pyro_vae.util.errors import ConfigError

N, PIXELS = 12, 16  # counted_vae's images: its largest site is the [N, 16] Bernoulli logits


def test_the_largest_site_counts_its_distributions_shape_and_dtype():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 3), 1.0).to_event(1))
            loc = z.sum(-1, keepdim=True).expand(-1, 5)
            # the value [5] is broadcast: the distribution's [N, 5] is the tensor a call makes
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x[0])

    x = torch.zeros(7, 5, dtype=torch.float64)
    trace = poutine.trace(model).get_trace(x)
    assert sizing.site_bytes(trace.nodes["x"]) == 7 * 5 * 8
    assert sizing.site_bytes(trace.nodes["z"]) == 7 * 3 * 8
    assert sizing.largest_site_bytes(trace) == 7 * 5 * 8


def test_plain_run_gives_the_nesting_and_the_bytes_and_leaves_the_random_state():
    vae, calls, x = counted_vae()
    torch.manual_seed(2)
    before = torch.get_rng_state()
    run = sizing.plain_run(vae.model, vae.guide, (x,), {})
    assert run == sizing.PlainRun(max_plate_nesting=1, bytes_per_particle=N * PIXELS * 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert calls == {"encoder": 1, "decoder": 1}


@pytest.mark.parametrize(
    "num_particles, target, expected",
    [(40, 5 * N * PIXELS * 4, 5), (40, 5 * N * PIXELS * 4 + 1, 5), (3, 5 * N * PIXELS * 4, 3)],
)
def test_the_chunk_is_the_target_over_the_bytes_per_particle(
    monkeypatch, num_particles, target, expected
):
    monkeypatch.setattr(sizing, "CHUNK_BYTES", target)
    vae, _, x = counted_vae()
    draws = resolve_draws(vae.model, vae.guide, (x,), {}, num_particles, "auto", None, None)
    assert draws.particle_chunk == expected
    assert draws.max_plate_nesting == 1 and draws.vectorize is None


def test_auto_chunk_bounds():
    assert sizing.auto_chunk(10, 10**12) == 1  # at least one particle
    assert sizing.auto_chunk(10, 1) == 10  # at most all
    assert sizing.auto_chunk(10**9, 2**20) == sizing.CHUNK_BYTES // 2**20
    # a data plate of n entries holds at least n bytes per particle: no auto chunk is larger
    assert sizing.chunk_bound(10**9, 100) == sizing.CHUNK_BYTES // 100


def test_the_default_draws_what_the_explicit_chunk_of_that_size_draws(monkeypatch):
    monkeypatch.setattr(sizing, "CHUNK_BYTES", 7 * N * PIXELS * 4)  # 7 particles per call
    vae, calls, x = counted_vae()
    torch.manual_seed(5)
    options = dict(num_particles=30, batch_size=N, keep_log_weights=True)
    auto = ev.evaluate_dataset(vae.model, vae.guide, x, **options)
    assert calls["decoder"] == 1 + 5 + 2  # the sizing run, ceil(30 / 7) chunks, the probe
    torch.manual_seed(5)
    explicit = ev.evaluate_dataset(vae.model, vae.guide, x, particle_chunk=7, **options)
    torch.testing.assert_close(auto.log_weights, explicit.log_weights, rtol=0, atol=0)
    torch.testing.assert_close(auto.log_px, explicit.log_px, rtol=0, atol=0)


def test_explicit_chunks_are_kept_as_given():
    vae, calls, x = counted_vae()
    with pyro.validation_enabled(False):
        ev.evaluate_dataset(
            vae.model, vae.guide, x, num_particles=30, particle_chunk=4, max_plate_nesting=1
        )
    assert calls["decoder"] == 8 + 2  # ceil(30 / 4) chunks and the probe's two replays
    calls.clear()
    with pyro.validation_enabled(False):
        ev.evaluate_dataset(
            vae.model, vae.guide, x, num_particles=30, particle_chunk=None, max_plate_nesting=1
        )
    assert calls["decoder"] == 1 + 2  # all at once


def test_auto_chunks_keep_an_exact_guide_exact(monkeypatch):
    # an exact posterior makes every log-weight log p(x): any chunking gives it to rounding
    monkeypatch.setattr(sizing, "CHUNK_BYTES", 3 * 9 * 6 * 8)  # 3 particles of [9, 6] float64
    lg = LinearGaussian.random(6, 3, dtype=torch.float64)
    x = lg.sample(9, torch.Generator().manual_seed(1))
    result = ev.evaluate_dataset(lg.model, lg.guide, x, num_particles=10, khat=False)
    torch.testing.assert_close(result.log_px, lg.log_marginal(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bad", ["big", "", 0, 2.5])
def test_particle_chunk_must_be_a_count_none_or_auto(bad):
    vae, calls, x = counted_vae()
    with pytest.raises(ConfigError, match="particle_chunk must be an integer >= 1"):
        ev.evaluate_dataset(vae.model, vae.guide, x, num_particles=3, particle_chunk=bad)
    with pytest.raises(ConfigError, match="particle_chunk must be an integer >= 1"):
        ev.evaluate(vae.model, vae.guide, x, num_particles=3, particle_chunk=bad)
    assert not calls


def test_the_iwae_mnist_network_gets_40_particles_per_batch_of_100():
    # 784-200-200-50: the largest site is the [100, 784] float32 Bernoulli logits, 313,600 bytes
    from pyro_vae import VAE

    vae = VAE(784, 50, (200, 200), activation="tanh").eval()
    x = (torch.rand(100, 784, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    draws = resolve_draws(vae.model, vae.guide, (x,), {}, 5000, "auto", None, None)
    assert draws.particle_chunk == sizing.CHUNK_BYTES // (100 * 784 * 4) == 40
