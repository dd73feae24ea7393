import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from references import per_datapoint_elbo
from torch import nn
from torch.distributions import kl_divergence

from pyro_vae import VAE, ConfigError, ModelConfig, TrainConfig, fit
from pyro_vae.data.builtin import build_model, evaluation_images, model_args, prepare_data
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.infer import CLASSES, ESTIMATORS, make_estimator
from pyro_vae.models.vae2 import VAE2

#: the estimators that take one importance sample (every one but vimco, which needs two)
ONE_SAMPLE = tuple(name for name in ESTIMATORS if CLASSES[name].min_importance_samples == 1)

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
    reference = kl_divergence(
        q,
        dist.MultivariateNormal(
            torch.zeros(LATENT, dtype=torch.float64), scale_tril=torch.eye(LATENT).double()
        ),
    )
    assert torch.allclose(ours, reference, atol=1e-12)
    z = q.sample((20000,))
    log_ratio = q.log_prob(z) - prior.log_prob(z)
    assert ((log_ratio.mean(0) - ours).abs() < 4 * log_ratio.std(0) / 20000**0.5).all()


def test_full_covariance_kl_gradient_matches_its_formula():
    """∂KL/∂μ = μ and ∂KL/∂L = L − diag(1/L_jj) for KL(N(μ, LLᵀ) ‖ N(0, I)) =
    ½[tr(LLᵀ) + μᵀμ − d − 2 Σ log L_jj] (tolerance: float64 rounding)."""
    generator = torch.Generator().manual_seed(4)
    loc = torch.randn(5, LATENT, generator=generator, dtype=torch.float64).requires_grad_()
    tril = torch.randn(5, LATENT, LATENT, generator=generator, dtype=torch.float64).tril()
    tril.diagonal(dim1=-2, dim2=-1).copy_(torch.rand(5, LATENT, generator=generator) + 0.3)
    tril.requires_grad_()
    prior = dist.Normal(torch.zeros(5, LATENT, dtype=torch.float64), 1.0).to_event(1)
    kl = kl_divergence(dist.MultivariateNormal(loc, scale_tril=tril), prior).sum()
    grad_loc, grad_tril = torch.autograd.grad(kl, [loc, tril])
    expected = tril.detach() - torch.diag_embed(1 / tril.detach().diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(grad_loc, loc.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_tril, expected, rtol=0, atol=1e-12)


class _FixedNoiseLoss(nn.Module):
    """An estimator's loss for ``vae`` on the same random draws at every call (so it is a smooth
    function of the parameters, which ``torch.func.functional_call`` can replace)."""

    def __init__(self, vae: VAE, name: str, **options):
        super().__init__()
        self.vae = vae
        self.estimator = make_estimator(name, max_plate_nesting=1, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pyro.set_rng_seed(0)
        with pyro.validation_enabled(False):
            return self.estimator.differentiable_loss(self.vae.model, self.vae.guide, x)


def _full_guide_vae() -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE(6, LATENT, (5,), guide="full").double()
    x = torch.bernoulli(
        torch.full((4, 6), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1)
    )
    return vae, x


@pytest.mark.parametrize(
    "name, options",
    [
        ("trace", dict(num_particles=3)),
        ("meanfield", dict(num_particles=3)),
        ("iwae", dict(importance_samples=3)),
    ],
)
def test_full_covariance_guide_gradient_matches_finite_differences(name, options):
    """The gradient through ``MultivariateNormal(scale_tril=L)`` (z = μ + Lε, its log-density
    and its closed-form KL) against central finite differences (``torch.autograd.gradcheck``,
    float64) with respect to every output of the encoder's last layer: μ, diag L and the entries
    below the diagonal. Pyro's JIT path is known to get this gradient wrong; ours must not."""
    vae, x = _full_guide_vae()
    loss = _FixedNoiseLoss(vae, name, **options)
    names = ("vae.encoder.head.weight", "vae.encoder.head.bias")

    def as_function(weight, bias):
        return torch.func.functional_call(loss, dict(zip(names, (weight, bias))), (x,))

    inputs = tuple(
        dict(loss.named_parameters())[n].detach().clone().requires_grad_() for n in names
    )
    assert torch.autograd.gradcheck(as_function, inputs)


def test_stl_drops_exactly_the_full_covariance_guides_score():
    """STL's gradient = the trace estimator's − ∂_φ log q_φ(z) at the drawn z held fixed (the
    score term), with log q the full-covariance density computed here from the encoder."""
    vae, x = _full_guide_vae()
    params = list(vae.encoder.parameters())
    grads = {}
    for name in ("trace", "stl"):
        grads[name] = torch.autograd.grad(_FixedNoiseLoss(vae, name)(x), params)
    pyro.set_rng_seed(0)
    z = poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"].detach()
    loc, tril = vae.encoder(x)
    score = torch.autograd.grad(
        dist.MultivariateNormal(loc, scale_tril=tril).log_prob(z).sum(), params
    )
    for stl, trace, s in zip(grads["stl"], grads["trace"], score):
        torch.testing.assert_close(stl, trace - s)


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
            pyro.plate("_pyro_vae_particles", 4000, dim=-2)(vae.guide)
        ).get_trace(x)
        z = guide_trace.nodes["z"]["value"]
        mc = (q.log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z).sum(-1)).sum(-1)
    # same particles: the reconstruction terms cancel, the difference is closed-form − MC KL
    assert meanfield_loss - trace_loss == pytest.approx((closed - mc.mean()).item(), abs=1e-3)


def test_learned_gaussian_scale_reaches_its_optimum_for_fixed_networks():
    """For fixed encoder and decoder the ELBO is maximized at σ*² = (1/D) E‖x − f(z)‖².

    With the noise fixed (same seed, same P particles) the Monte Carlo objective is
    A/(2σ²) + N·D·log σ + const with A the particle average of Σ‖x − f(z)‖², whose minimizer is
    the empirical σ*² = A/(N·D) over those particles. Its gradient there vanishes to float64
    rounding (a sum of 2·N·D·P terms of size about one, each rounded to eps), and training
    log σ alone (L-BFGS) reaches σ*² to √eps relative precision, the accuracy to which the
    minimizer of a smooth function is determined.
    """
    particles = 50
    vae = VAE(D, LATENT, (16,), likelihood="gaussian").double()
    x = torch.rand(50, D, dtype=torch.float64)
    for p in list(vae.encoder.parameters()) + list(vae.decoder.parameters()):
        p.requires_grad_(False)
    elbo = make_estimator("trace", num_particles=particles, max_plate_nesting=1)

    def loss():
        pyro.set_rng_seed(5)
        return elbo.differentiable_loss(vae.model, vae.guide, x)

    pyro.set_rng_seed(5)
    with torch.no_grad():
        z = pyro.plate("_pyro_vae_particles", particles, dim=-2)(
            poutine.trace(vae.guide).get_trace
        )(x).nodes["z"]["value"]
        sigma2_star = (x - vae.decoder(z)).pow(2).mean()
        vae.obs_scale.log_scale.fill_(0.5 * sigma2_star.log())
    (grad,) = torch.autograd.grad(loss(), vae.obs_scale.log_scale)
    eps = torch.finfo(torch.float64).eps
    assert abs(grad.item()) <= eps * 2 * x.numel() * particles

    with torch.no_grad():
        vae.obs_scale.log_scale.fill_(0.0)
    optimizer = torch.optim.LBFGS(
        [vae.obs_scale.log_scale],
        line_search_fn="strong_wolfe",
        tolerance_grad=0.0,
        tolerance_change=0.0,
        max_iter=50,
    )

    def closure():
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    optimizer.step(closure)
    assert vae.obs_scale().pow(2).item() == pytest.approx(sigma2_star.item(), rel=eps**0.5)


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


def _coupled_vae2() -> VAE2:
    """A VAE2 whose layers are tightly coupled: q(z2 | z1) ≈ δ(z2 − z1[:2]) and
    p(z1 | z2) = N([z2, 0], (0.13)²), so log p(z1 | z2) depends strongly on whether z2 was drawn
    from the same z1 (the two-layer ELBO) or from another one."""
    torch.manual_seed(0)
    vae = VAE2(12, 3, (16,), latent2_dim=2, hidden2=())
    with torch.no_grad():
        for head, scale_from in ((vae.top_encoder.head, 2), (vae.prior_net.head, 3)):
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, 0] = head.weight[1, 1] = 1.0
            head.bias[scale_from:] = -2.0
    return vae


@pytest.mark.parametrize("name", ONE_SAMPLE)
def test_every_estimator_estimates_the_two_layer_bound_the_evaluator_computes(name):
    """Each estimator's value on a VAE2 against the evaluator, an independent computation: the
    ELBO (trace, meanfield, stl; K = 1) or the K = 5 importance-weighted bound (iwae, dreg).

    Five images are repeated R times; the estimator's loss is minus the sum of N = 5R
    independent draws of the bound, the evaluator gives N more, one per row. The tolerance is 4
    standard errors of the difference of the two means, each from the evaluator's per-image
    variances (meanfield's closed-form terms can only lower its variance). Every parameter
    group gets a finite gradient, and a non-zero one.
    """
    vae = _coupled_vae2()
    k = 5 if name in ("iwae", "dreg") else 1
    images = torch.bernoulli(torch.full((5, 12), 0.4), generator=torch.Generator().manual_seed(1))
    repeats = 400
    x = images.repeat(repeats, 1)
    estimator = make_estimator(name, importance_samples=k, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    with pyro.validation_enabled(False):
        loss = estimator.differentiable_loss(vae.model, vae.guide, x)
        reference = evaluate_dataset(vae.model, vae.guide, x, num_particles=k, khat=False)
    per_row = reference.log_px.double().reshape(repeats, 5)
    stderr = (per_row.var(0).sum() / repeats).sqrt() / 5
    difference = -loss.item() / x.shape[0] - per_row.mean().item()
    assert abs(difference) < 4 * 2**0.5 * stderr, (difference, stderr)
    for part in (vae.encoder, vae.top_encoder, vae.prior_net, vae.decoder):
        grads = torch.autograd.grad(loss, list(part.parameters()), retain_graph=True)
        assert all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


FAMILIES = [
    ("vae-full", ModelConfig(guide="full"), "dynamic"),
    ("vae-gaussian-learned", ModelConfig(likelihood="gaussian"), "none"),
    ("vae-gaussian-fixed", ModelConfig(likelihood="gaussian", obs_scale=0.2), "none"),
    ("vae2", ModelConfig(family="vae2"), "dynamic"),
    ("cvae", ModelConfig(family="cvae"), "dynamic"),
    ("cvae-full-gaussian", ModelConfig(family="cvae", guide="full", likelihood="gaussian"), "none"),
]


@pytest.mark.parametrize("name, model_config, binarize", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_each_family_trains_and_its_gap_is_nonnegative(name, model_config, binarize):
    """Six epochs on digits raise the test ELBO above the untrained model's (the same
    initialization ``train`` starts from), and the gap log p̂_K(x) − ELBO is ≥ 0 within error.

    Both are per-image paired differences with a tolerance of 3 standard errors of their mean.
    The gap subtracts the ``trace`` estimator's ELBO (other draws, other code) from the
    evaluator's log p̂_K: the evaluator's own gap uses one set of log-weights and is ≥ 0 by
    Jensen's inequality whatever they are, whereas this one goes negative if the evaluator's
    log-weights miss a density term that lowers them.
    """
    config = TrainConfig(
        model=model_config,
        binarize=binarize,
        epochs=6,
        batch_size=128,
        eval_particles=4,
        final_particles=0,
    )
    result = fit(config=config, progress=False)
    dataset = prepare_data(config, torch.device("cpu"))
    pyro.set_rng_seed(config.seed)
    initial = build_model(dataset, config)
    initial.initialize_from_data(dataset.train.images)
    images = evaluation_images(dataset, "test", config)[:100]
    args = model_args(initial, images, dataset.test.labels[:100])

    def evaluated(module):
        with pyro.validation_enabled(False):
            return evaluate_dataset(module.model, module.guide, args, num_particles=200, khat=False)

    def significantly_positive(values: torch.Tensor) -> bool:
        values = values.double()
        return values.mean() > 3 * values.std() / values.numel() ** 0.5

    before, after = evaluated(initial), evaluated(result.model)
    assert significantly_positive(after.elbo - before.elbo)
    gap = after.log_px.double() - per_datapoint_elbo(result.model, args, particles=50)
    assert gap.mean() > -3 * gap.std() / gap.numel() ** 0.5


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": ModelConfig(likelihood="gaussian")}, "Gaussian one needs the intensities"),
        ({"binarize": "none"}, "Bernoulli likelihood needs binary data"),
    ],
)
def test_likelihood_and_binarization_must_agree(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


def test_vae2_refuses_a_full_guide():
    with pytest.raises(ConfigError, match="vae2"):
        ModelConfig(family="vae2", guide="full")
