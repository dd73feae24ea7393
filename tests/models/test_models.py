import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE, ConfigError
from pyro_vae.core.log_probs import vectorized_log_probs

D, LATENT, N = 12, 3, 5


@pytest.fixture
def vae_and_data():
    vae = VAE(D, latent_dim=LATENT, hidden=(16,))
    x = torch.bernoulli(torch.full((N, D), 0.3))
    return vae, x


def test_model_and_guide_are_twins(vae_and_data):
    vae, x = vae_and_data
    guide_trace = pyro.poutine.trace(vae.guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(vae.model, guide_trace)).get_trace(x)
    z_guide, z_model = guide_trace.nodes["z"], model_trace.nodes["z"]
    assert torch.equal(z_guide["value"], z_model["value"])
    assert z_guide["value"].shape == (N, LATENT)
    for site in (z_guide, z_model, model_trace.nodes["x"]):
        assert [f.name for f in site["cond_indep_stack"]] == ["data"]
        assert site["fn"].event_dim == 1


def test_closed_form_kl_matches_monte_carlo_kl(vae_and_data):
    """TraceMeanField_ELBO's analytic KL vs Trace_ELBO's Monte Carlo KL on the same draws.

    With the same seed both estimators see the same particles, so the reconstruction terms cancel
    and the difference of the losses is KL_analytic − mean_k[log q(z_k) − log p(z_k)], summed over
    the batch; its standard error is std(log q − log p)/sqrt(K). Tolerance: 4 standard errors.
    """
    vae, x = vae_and_data
    particles = 20000
    kwargs = dict(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    loss_trace = Trace_ELBO(**kwargs).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    loss_meanfield = TraceMeanField_ELBO(**kwargs).loss(vae.model, vae.guide, x)

    with torch.no_grad():
        loc, scale = vae.encoder(x)
        closed_form = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum()
        pyro.set_rng_seed(1)
        draws = vectorized_log_probs(
            vae.model, vae.guide, x, num_particles=particles, max_plate_nesting=1
        )
        prior_log_prob = dist.Normal(0.0, 1.0).log_prob(draws.guide_trace.nodes["z"]["value"])
        mc_kl = (draws.log_q - prior_log_prob.sum(-1)).sum(-1)
    standard_error = mc_kl.std() / particles**0.5
    assert abs((loss_meanfield - loss_trace) - (closed_form - mc_kl.mean())) < 1e-2
    assert abs(closed_form - mc_kl.mean()) < 4 * standard_error
    assert abs(loss_meanfield - loss_trace) < 4 * standard_error + 1e-2


@pytest.mark.parametrize("elbo_class", [Trace_ELBO, TraceMeanField_ELBO])
def test_pyro_svi_lowers_the_loss(vae_and_data, elbo_class):
    vae, x = vae_and_data
    elbo = elbo_class(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.02}), elbo)
    before = elbo.loss(vae.model, vae.guide, x)
    for _ in range(150):
        svi.step(x)
    pyro.set_rng_seed(2)
    after = elbo.loss(vae.model, vae.guide, x)
    assert after < before - 1.0
    assert len(pyro.get_param_store()) == len(list(vae.parameters()))


def test_predictive_and_sampling_shapes(vae_and_data):
    vae, x = vae_and_data
    samples = Predictive(vae.model, guide=vae.guide, num_samples=4)(x)
    assert samples["z"].shape == (4, N, LATENT)
    assert samples["x"].shape == (4, N, D)
    prior_draws = Predictive(vae.model, num_samples=3)(None, num_data=7)
    assert prior_draws["x"].shape == (3, 7, D)
    assert set(prior_draws["x"].unique().tolist()) <= {0.0, 1.0}
    means = vae.sample(6)
    assert means.shape == (6, D) and ((means > 0) & (means < 1)).all()
    assert vae.reconstruct(x).shape == (N, D)


def test_sampling_is_reproducible_with_a_generator(vae_and_data):
    vae, _ = vae_and_data
    a = vae.sample(4, mean=False, generator=torch.Generator().manual_seed(3))
    b = vae.sample(4, mean=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_two_models_with_one_name_never_share_parameters(vae_and_data):
    vae, x = vae_and_data
    other = VAE(D, latent_dim=LATENT, hidden=(16,))
    before = {name: p.detach().clone() for name, p in vae.named_parameters()}
    vae.guide(x)
    svi = SVI(
        other.model, other.guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(max_plate_nesting=1)
    )
    other_before = other.encoder.head.weight.detach().clone()
    for _ in range(3):
        svi.step(x)
    for name, p in vae.named_parameters():
        assert torch.equal(p, before[name]), name
    assert not torch.equal(other.encoder.head.weight, other_before)
    store = pyro.get_param_store()
    assert store["vae.encoder$$$head.weight"] is other.encoder.head.weight
    vae.guide(x)
    assert store["vae.encoder$$$head.weight"] is vae.encoder.head.weight


def test_bad_model_arguments():
    with pytest.raises(ConfigError, match="latent_dim"):
        VAE(D, latent_dim=0)
    with pytest.raises(ConfigError, match="scale_fn"):
        VAE(D, scale_fn="relu")


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda x: x[0], f"images must have shape [N, {D}] (one image: x[None]), got [{D}]"),
        (
            lambda x: x[:, :-1],
            f"images must have shape [N, {D}] (one image: x[None]), got [{N}, {D - 1}]",
        ),
        (lambda x: x[None], f"got [1, {N}, {D}]"),
        (lambda x: x.long(), "images must be floating point, got torch.int64"),
        (lambda x: x[:0], "got an empty batch of images"),
        (lambda x: torch.where(x > 0, torch.nan, x), "images contain NaN or infinite values"),
    ],
)
@pytest.mark.parametrize("family", ["vae", "cvae", "vae2"])
def test_model_and_guide_refuse_bad_images_through_pyros_svi(family, bad, message):
    """A single image without its batch dimension would otherwise be read as D datapoints."""
    from pyro_vae.models.cvae import CVAE
    from pyro_vae.models.vae2 import VAE2
    from pyro_vae.util.errors import DataError

    pyro.clear_param_store()
    x = torch.bernoulli(torch.full((N, D), 0.3))
    if family == "cvae":
        pair = CVAE(D, num_classes=3, latent_dim=LATENT, hidden=(16,))
        args = (bad(x), torch.zeros(N, dtype=torch.long))  # the images' check comes first
    else:
        pair = (VAE if family == "vae" else VAE2)(D, latent_dim=LATENT, hidden=(16,))
        args = (bad(x),)
    svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    with pytest.raises(DataError) as info:
        svi.step(*args)
    assert message in str(info.value)
    with pytest.raises(DataError, match="shape|floating|empty|NaN"):
        pair.model(*args)
