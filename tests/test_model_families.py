import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch.distributions import kl_divergence

from pyro_vae import ConfigError, ModelConfig, TrainConfig, VAE, train
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.objectives import make_estimator
from pyro_vae.vae2 import VAE2

D, LATENT = 10, 3


def test_full_covariance_kl_matches_the_closed_form_and_monte_carlo():
    """KL(N(μ, LLᵀ) ‖ N(0, I)) against torch's Gaussian-to-Gaussian KL (tolerance: float64
    rounding) and against a Monte Carlo average (tolerance: 4 standard errors)."""
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(5, LATENT, generator=generator, dtype=torch.float64)
    tril = torch.randn(5, LATENT, LATENT, generator=generator, dtype=torch.float64).tril()
    tril.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(5, LATENT, generator=generator) + 0.3)
    q = dist.MultivariateNormal(loc, scale_tril=tril)
    prior = dist.Normal(torch.zeros(5, LATENT, dtype=torch.float64), 1.0).to_event(1)
    ours = kl_divergence(q, prior)
    reference = kl_divergence(q, dist.MultivariateNormal(torch.zeros(LATENT, dtype=torch.float64),
                                                         scale_tril=torch.eye(LATENT).double()))
    assert torch.allclose(ours, reference, atol=1e-12)
    z = q.sample((20000,))
    log_ratio = q.log_prob(z) - prior.log_prob(z)
    assert ((log_ratio.mean(0) - ours).abs() < 4 * log_ratio.std(0) / 20000 ** 0.5).all()


def test_full_covariance_guide_is_lower_triangular_and_meanfield_uses_the_closed_form():
    vae = VAE(D, LATENT, (16,), guide="full")
    x = torch.bernoulli(torch.full((4, D), 0.4))
    loc, tril = vae.encoder(x)
    assert torch.equal(tril, tril.tril()) and (tril.diagonal(dim1=-2, dim2=-1) > 0).all()
    kwargs = dict(num_particles=4000, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    trace_loss = make_estimator("trace", **kwargs).loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(1)
    meanfield_loss = make_estimator("meanfield", **kwargs).loss(vae.model, vae.guide, x)
    with torch.no_grad():
        q = dist.MultivariateNormal(loc, scale_tril=tril)
        closed = kl_divergence(q, dist.Normal(torch.zeros(LATENT), 1.0).to_event(1)).sum()
        pyro.set_rng_seed(1)
        guide_trace = poutine.trace(
            pyro.plate("_pyro_vae_particles", 4000, dim=-2)(vae.guide)).get_trace(x)
        z = guide_trace.nodes["z"]["value"]
        mc = (q.log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z).sum(-1)).sum(-1)
    # same particles: the reconstruction terms cancel, the difference is closed-form − MC KL
    assert meanfield_loss - trace_loss == pytest.approx((closed - mc.mean()).item(), abs=1e-3)


def test_learned_gaussian_scale_reaches_its_optimum_for_fixed_networks():
    """For fixed encoder and decoder the ELBO is maximized at σ*² = (1/D) E‖x − f(z)‖².

    With the noise fixed (same seed, same particles) the Monte Carlo objective's maximizer is the
    same average over those particles, so the gradient there vanishes to float rounding; Adam on
    log σ alone then converges to it.
    """
    vae = VAE(D, LATENT, (16,), likelihood="gaussian").double()
    x = torch.rand(50, D, dtype=torch.float64)
    for p in list(vae.encoder.parameters()) + list(vae.decoder.parameters()):
        p.requires_grad_(False)
    elbo = make_estimator("trace", num_particles=200, max_plate_nesting=1)

    def loss():
        pyro.set_rng_seed(5)
        return elbo.differentiable_loss(vae.model, vae.guide, x)

    pyro.set_rng_seed(5)
    with torch.no_grad():
        z = pyro.plate("_pyro_vae_particles", 200, dim=-2)(
            poutine.trace(vae.guide).get_trace)(x).nodes["z"]["value"]
        sigma2_star = (x - vae.decoder(z)).pow(2).mean()
    with torch.no_grad():
        vae.obs_scale.log_scale.fill_(0.5 * sigma2_star.log())
    (grad,) = torch.autograd.grad(loss(), vae.obs_scale.log_scale)
    assert abs(grad.item()) < 1e-8 * x.numel() * 200

    with torch.no_grad():
        vae.obs_scale.log_scale.fill_(0.0)
    optimizer = torch.optim.Adam([vae.obs_scale.log_scale], lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert vae.obs_scale().pow(2).item() == pytest.approx(sigma2_star.item(), rel=1e-3)


def test_fixed_gaussian_scale_is_not_learned():
    vae = VAE(D, LATENT, (16,), likelihood="gaussian", obs_scale=0.5)
    assert vae.obs_scale is None
    fn = poutine.trace(vae.model).get_trace(torch.rand(3, D)).nodes["x"]["fn"]
    assert torch.allclose(fn.base_dist.scale, torch.tensor(0.5))


def test_two_layer_vae_has_the_papers_shape():
    vae = VAE2(784, 100, (200, 200), latent2_dim=50, hidden2=(100, 100), activation="tanh")
    x = torch.bernoulli(torch.full((2, 784), 0.2))
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    assert guide_trace.nodes["z1"]["value"].shape == (2, 100)
    assert guide_trace.nodes["z2"]["value"].shape == (2, 50)
    linear = [m.out_features for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert linear == [200, 200, 200]  # 200-200 hidden, then loc and scale of z1 (2 × 100)
    assert any(isinstance(m, torch.nn.Tanh) for m in vae.modules())


FAMILIES = [
    ("vae-full", ModelConfig(guide="full"), "dynamic"),
    ("vae-gaussian-learned", ModelConfig(likelihood="gaussian"), "none"),
    ("vae-gaussian-fixed", ModelConfig(likelihood="gaussian", obs_scale=0.2), "none"),
    ("vae2", ModelConfig(family="vae2"), "dynamic"),
    ("cvae-full-gaussian", ModelConfig(family="cvae", guide="full", likelihood="gaussian"),
     "none"),
]


@pytest.mark.parametrize("name, model_config, binarize", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_trains_and_its_gap_is_nonnegative(name, model_config, binarize):
    config = TrainConfig(model=model_config, binarize=binarize, epochs=6, batch_size=128,
                         eval_particles=4, final_particles=0)
    result = train(config, progress=False)
    elbo = result.history.test_elbo
    assert elbo[-1] > elbo[0] + 0.3, elbo
    from pyro_vae.data import load_digits

    images = load_digits().test.images[:100]
    if binarize != "none":
        images = torch.bernoulli(images, generator=torch.Generator().manual_seed(0))
    labels = load_digits().test.labels[:100]
    args = (images, labels) if result.model.conditional else (images,)
    with pyro.validation_enabled(False):
        out = evaluate_dataset(result.model.model, result.model.guide, args, num_particles=200,
                               khat=False)
    gap = out.gap.double()
    assert gap.mean() > -3 * gap.std() / gap.numel() ** 0.5


@pytest.mark.parametrize("changes, message", [
    ({"model": ModelConfig(likelihood="gaussian")}, "Gaussian one needs the intensities"),
    ({"binarize": "none"}, "Bernoulli likelihood needs binary data"),
])
def test_likelihood_and_binarization_must_agree(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_vae2_refuses_a_full_guide():
    with pytest.raises(ConfigError, match="vae2"):
        ModelConfig(family="vae2", guide="full")
