import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae import ConfigError
from pyro_vae.core.log_probs import vectorized_log_probs
from pyro_vae.core.traces import compact_distribution, detach_distribution, site_log_prob


def conjugate_pair(mask=None):
    """z ~ N(0, 1), x | z ~ N(z, 1) per datapoint; the guide is the exact posterior N(x/2, 1/2)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            with poutine.mask(mask=mask) if mask is not None else poutine.block(hide=[]):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))

    return model, guide


def test_exact_posterior_gives_constant_weights_equal_to_the_marginal():
    x = torch.tensor([-1.0, 0.0, 2.5], dtype=torch.float64)
    model, guide = conjugate_pair()
    out = vectorized_log_probs(model, guide, x, num_particles=50)
    exact = dist.Normal(0.0, 2**0.5).log_prob(x)
    assert out.log_weights.shape == (50, 3)
    assert torch.allclose(out.log_weights, exact.expand(50, 3), atol=1e-12)


def test_a_false_mask_removes_the_observation():
    x = torch.tensor([0.5, 1.0])
    model, guide = conjugate_pair(mask=False)
    out = vectorized_log_probs(model, guide, x, num_particles=4)
    z = out.guide_trace.nodes["z"]["value"]
    assert torch.allclose(out.log_p, dist.Normal(0.0, 1.0).log_prob(z), atol=1e-6)


def test_model_latents_left_to_the_prior_cancel_from_the_weight():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("u", dist.Normal(x.new_zeros(()), 3.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    _, guide = conjugate_pair()
    x = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    out = vectorized_log_probs(model, guide, x, num_particles=20)
    assert torch.allclose(out.log_weights, dist.Normal(0.0, 2**0.5).log_prob(x).expand(20, 2))


def test_batch_dimensions_outside_any_plate_are_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros((3, 1, x.shape[0])), 1.0))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros((3, 1, x.shape[0])), 1.0))

    with pytest.raises(ConfigError, match="more dimensions than"):
        vectorized_log_probs(model, guide, torch.zeros(2), num_particles=2, max_plate_nesting=1)


def test_detached_distribution_passes_gradient_to_the_value_only():
    loc = torch.tensor(0.3, requires_grad=True)
    value = torch.tensor(1.0, requires_grad=True)
    detach_distribution(dist.Normal(loc, 1.0)).log_prob(value).backward()
    assert loc.grad is None and value.grad == pytest.approx(-(1.0 - 0.3))


def test_a_guide_latent_the_model_lacks_is_a_config_error_naming_it():
    model, _ = conjugate_pair()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5))
            pyro.sample("extra_latent", dist.Normal(x, 1.0))

    with pytest.raises(
        ConfigError,
        match=r"guide sample sites \['extra_latent'\] are not latent "
        r"sample sites of the model",
    ):
        vectorized_log_probs(model, guide, torch.zeros(3), num_particles=2)


def test_compact_log_densities_equal_the_expanded_ones_bit_for_bit():
    mask = torch.tensor([True, False, True, True, False])

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([3]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1), 0.5), obs=x)
            with poutine.mask(mask=mask):
                # No dependence on z: the value and the parameters are both compact here.
                pyro.sample("c", dist.Normal(x.new_tensor(0.2), 2.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            loc = x[:, None].expand(-1, 3) / 2
            pyro.sample("z", dist.Normal(loc, torch.full_like(loc, 0.7)).to_event(1))

    x = torch.randn(5, dtype=torch.float64)
    with torch.no_grad():
        out = vectorized_log_probs(model, guide, x, num_particles=40)
    sites = [
        site
        for trace in (out.model_trace, out.guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    assert len(sites) == 4
    for site in sites:
        full = site_log_prob(site)
        assert full.shape == (40, 5)
        assert torch.equal(site_log_prob(site, compact=True), full), site["name"]
    guide_fn = out.guide_trace.nodes["z"]["fn"]
    assert guide_fn.base_dist.scale.shape == (40, 5, 3)
    assert compact_distribution(guide_fn).base_dist.scale.shape == (1, 5, 3)
    assert compact_distribution(guide_fn).batch_shape == guide_fn.batch_shape

    # Same seed, same draws: the log-weights agree bit for bit with the uncompacted path.
    weights = []
    for flag in (False, True):
        pyro.set_rng_seed(1)
        with torch.no_grad():
            weights.append(
                vectorized_log_probs(
                    model, guide, x, num_particles=40, compact=flag, max_plate_nesting=1
                ).log_weights
            )
    assert torch.equal(*weights)


def test_compact_distribution_leaves_other_families_alone():
    class MyNormal(dist.Normal):
        pass

    logits = torch.zeros(3).expand(4, 3)
    for fn in (
        dist.Bernoulli(logits=logits),
        MyNormal(logits, 1.0),
        dist.Normal(torch.zeros(4, 3), torch.ones(4, 3)).to_event(1),
    ):
        assert compact_distribution(fn) is fn
