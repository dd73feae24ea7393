"""miwae, piwae and rws: estimators whose model parameters θ and guide parameters φ follow
different gradients. Each one's gradient against a torch-only computation of its formulas on
the same draws, in which θ and φ are two separate copies of the linear-Gaussian pair's
parameters (a parameter that both networks use gets the sum of its two parts); against
``iwae`` on the same draws; rws's guide gradient at the exact posterior and on a sampled
discrete site; their refusals; and a run through ``fit``, Pyro's SVI and the command line."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from linear_gaussian import LinearGaussian
from pyro.infer import SVI
from torch import nn
from user_models import FactorAnalysis, fa_data

from pyro_vae.app.cli import main
from pyro_vae.infer import make_estimator
from pyro_vae.util.errors import ConfigError

M, K, N = 3, 4, 5
NAMES = ("miwae", "piwae", "rws")


def _pair(**kwargs) -> tuple[LinearGaussian, torch.Tensor]:
    lg = LinearGaussian.random(3, 2, guide="diagonal", **kwargs)
    return lg, lg.sample(N, torch.Generator().manual_seed(1))


def _drawn_gradient(name, pair, x, seed=0, **kwargs):
    """The estimator's loss and gradient (one per parameter of ``pair``) on the draws of
    ``seed``, and those draws."""
    estimator = make_estimator(name, max_plate_nesting=1, **kwargs)
    pyro.set_rng_seed(seed)
    particles = estimator.draw(pair.model, pair.guide, (x,), {})
    loss = estimator.loss_of(particles)
    grads = torch.autograd.grad(loss, list(pair.parameters()))
    return loss.detach(), grads, particles.guide_trace.nodes["z"]["value"].detach()


class TwoCopies:
    """The linear-Gaussian pair's log-weights on given draws, written out in torch, with the
    model's densities read from one copy of the parameters (θ) and the guide (its draws
    z = loc + scale ε and log q) from another (φ)."""

    def __init__(self, lg: LinearGaussian, x: torch.Tensor, z: torch.Tensor, beta: float):
        self.x, self.beta = x, beta
        shared = [lg.weight, lg.bias, lg.log_noise_scale]
        self.theta = [p.detach().clone().requires_grad_() for p in shared]
        self.phi = [
            p.detach().clone().requires_grad_()
            for p in [*shared, lg.loc_shift, lg.log_scale_factor]
        ]
        with torch.no_grad():
            loc, scale = self._guide()
            self.eps = (z - loc) / scale  # the standard normals behind the draws

    def _guide(self):
        weight, bias, log_sigma, shift, log_factor = self.phi
        variance = (2 * log_sigma).exp()
        cov = torch.linalg.inv(torch.eye(weight.shape[1]) + weight.T @ weight / variance)
        loc = (self.x - bias) @ weight @ cov / variance + shift
        return loc, log_factor.exp() * cov.diagonal().sqrt()

    def parts(self, detach_draws: bool = False):
        """(log w_β, log q(sg z) with φ's gradient), each ``[M·K, N]``."""
        weight, bias, log_sigma = self.theta
        loc, scale = self._guide()
        z = loc + scale * self.eps
        if detach_draws:
            z = z.detach()
        log_lik = dist.Normal(z @ weight.T + bias, log_sigma.exp()).log_prob(self.x).sum(-1)
        log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
        score = dist.Normal(loc, scale).log_prob(z.detach()).sum(-1)
        return log_lik + self.beta * (log_prior - log_q), score

    def gradient(self, theta_bound, phi_bound):
        """The gradient of ``theta_bound`` in θ plus that of ``phi_bound`` in φ, per parameter
        of the pair, as the gradient of a loss (minus the bounds)."""
        g_theta = torch.autograd.grad(-theta_bound, self.theta, retain_graph=True)
        g_phi = torch.autograd.grad(-phi_bound, self.phi)
        return [*(a + b for a, b in zip(g_theta, g_phi[:3])), *g_phi[3:]]


def _iwae(log_w: torch.Tensor) -> torch.Tensor:
    """log mean exp over dim 1, summed over the datapoints and averaged over dim 0."""
    return (torch.logsumexp(log_w, 1) - math.log(log_w.shape[1])).sum(-1).mean()


def reference(name: str, copies: TwoCopies):
    """The loss and gradient each estimator's formulas give on the draws of ``copies``."""
    log_w, score = copies.parts(detach_draws=name == "rws")
    grouped = log_w.reshape(M, K, N)
    miwae = _iwae(grouped)
    if name == "miwae":
        return -miwae, copies.gradient(miwae, miwae)
    if name == "piwae":
        everything = _iwae(log_w.reshape(1, M * K, N))
        return -everything, copies.gradient(everything, miwae)
    normalized = torch.softmax(grouped.detach(), 1)
    wake_phi = (normalized * score.reshape(M, K, N)).sum(1).sum(-1).mean()
    return -miwae, copies.gradient(miwae, wake_phi)


@pytest.mark.parametrize("beta", [1.0, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_follow_their_formulas_on_the_same_draws(name, beta):
    lg, x = _pair(loc_shift=0.4, scale_factor=1.3)
    loss, grads, z = _drawn_gradient(name, lg, x, num_particles=M, importance_samples=K, beta=beta)
    want_loss, want = reference(name, TwoCopies(lg, x, z, beta))
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-10, atol=1e-10)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_the_two_gradients_differ_where_the_formulas_do():
    """The reference is no identity: on these draws piwae's and rws's gradients of the shared
    parameters are not miwae's (and the guide-only ones of rws are not either)."""
    lg, x = _pair(loc_shift=0.4, scale_factor=1.3)
    grads = {
        name: _drawn_gradient(name, lg, x, num_particles=M, importance_samples=K)[1]
        for name in NAMES
    }
    for name in ("piwae", "rws"):
        assert (grads[name][0] - grads["miwae"][0]).abs().max() > 1e-3, name
    assert (grads["rws"][3] - grads["miwae"][3]).abs().max() > 1e-3
    torch.testing.assert_close(grads["piwae"][3], grads["miwae"][3], rtol=0, atol=0)


def test_miwae_is_iwae_with_as_many_particles_draw_for_draw():
    lg, x = _pair(loc_shift=0.4, scale_factor=1.3)
    mine = _drawn_gradient("miwae", lg, x, num_particles=M, importance_samples=K)
    iwae = _drawn_gradient("iwae", lg, x, num_particles=M, importance_samples=K)
    assert torch.equal(mine[0], iwae[0])
    assert all(torch.equal(a, b) for a, b in zip(mine[1], iwae[1]))


def _fa_gradients(name: str, **kwargs):
    """Loss and gradients of a float64 factor-analysis pair (model W, mu, raw_psi; guide A, b,
    raw_tril: no parameter shared) on the draws of one seed."""
    pair = FactorAnalysis(dtype=torch.float64)
    with torch.no_grad():
        pair.A.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    x = torch.as_tensor(fa_data(6), dtype=torch.float64)
    loss, grads, _ = _drawn_gradient(name, pair, x, **kwargs)
    names = [n for n, _ in pair.named_parameters()]
    return loss, dict(zip(names, grads))


def test_piwae_gives_the_model_iwae_of_all_draws_and_the_guide_miwae():
    piwae = _fa_gradients("piwae", num_particles=M, importance_samples=K)
    all_draws = _fa_gradients("iwae", num_particles=1, importance_samples=M * K)
    miwae = _fa_gradients("miwae", num_particles=M, importance_samples=K)
    torch.testing.assert_close(piwae[0], all_draws[0], rtol=1e-12, atol=0)
    for name in ("W", "mu", "raw_psi"):
        torch.testing.assert_close(piwae[1][name], all_draws[1][name], rtol=1e-10, atol=1e-12)
        assert (piwae[1][name] - miwae[1][name]).abs().max() > 1e-4, name
    for name in ("A", "b", "raw_tril"):
        torch.testing.assert_close(piwae[1][name], miwae[1][name], rtol=1e-10, atol=1e-12)


def test_rws_gives_the_model_the_iwae_gradient():
    rws = _fa_gradients("rws", num_particles=M, importance_samples=K)
    iwae = _fa_gradients("iwae", num_particles=M, importance_samples=K)
    torch.testing.assert_close(rws[0], iwae[0], rtol=1e-12, atol=0)
    for name in ("W", "mu", "raw_psi"):
        torch.testing.assert_close(rws[1][name], iwae[1][name], rtol=1e-10, atol=1e-12)
    assert (rws[1]["A"] - iwae[1]["A"]).abs().max() > 1e-4


def test_rws_on_draws_of_another_estimator_replays_the_model():
    """Particles drawn without rws's detached view (here by iwae) give rws the same loss and
    gradients: the model is then replayed on the detached draws."""
    lg, x = _pair(loc_shift=0.4, scale_factor=1.3)
    rws = make_estimator("rws", num_particles=M, importance_samples=K, max_plate_nesting=1)
    iwae = make_estimator("iwae", num_particles=M, importance_samples=K, max_plate_nesting=1)
    results = []
    for drawer in (rws, iwae):
        pyro.set_rng_seed(0)
        loss = rws.loss_of(drawer.draw(lg.model, lg.guide, (x,), {}))
        results.append([loss, *torch.autograd.grad(loss, list(lg.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_rws_guide_gradient_has_mean_zero_at_the_exact_posterior():
    """With q the exact posterior every weight is p(x), w̃_k = 1/K, and wake-φ is the mean
    score Σ_k ∇ log q(z_k) / K, of expectation zero. The guide-only parameters' gradient,
    over 60 calls on 40 datapoints, lies within 4 standard errors (of those 60 calls) of 0;
    with the guide's mean shifted by +0.5 it lies more than 4 of them above 0 (the loss falls
    as the shift goes back to 0)."""
    for shift, exact in ((0.0, True), (0.5, False)):
        lg = LinearGaussian.random(3, 2, guide="full", loc_shift=shift)
        x = lg.sample(40, torch.Generator().manual_seed(2))
        draws = torch.stack(
            [
                torch.cat(_drawn_gradient("rws", lg, x, seed, importance_samples=5)[1][3:])
                for seed in range(60)
            ]
        )
        mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
        assert (stderr > 0).all()
        shift_part = mean[:2] / stderr[:2]
        if exact:
            assert (mean.abs() < 4 * stderr).all(), (mean, stderr)
        else:
            assert (shift_part > 4).all(), (mean, stderr)


class CoinPair(nn.Module):
    """c ~ Bernoulli(1/2), x | c ~ N(2c − 1, 1): the posterior's logit is 2x. The guide
    q(c | x) = Bernoulli(logits = a x + b), discrete and not reparameterizable."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.5))

    def model(self, x):
        pyro.module("coin", self)
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
            pyro.sample("x", dist.Normal(2 * c - 1, 1.0), obs=x)

    def guide(self, x):
        pyro.module("coin", self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Bernoulli(logits=self.a * x + self.b))

    def inclusive_kl(self, x):
        """Mean KL(p(c | x) ‖ q(c | x)) over the datapoints."""
        p = dist.Bernoulli(logits=2 * x)
        return torch.distributions.kl_divergence(p, dist.Bernoulli(logits=self.a * x + self.b))


def test_rws_moves_a_discrete_guide_towards_the_posterior_under_svi():
    pair = CoinPair()
    generator = torch.Generator().manual_seed(0)
    c = torch.bernoulli(torch.full((200,), 0.5), generator=generator)
    x = 2 * c - 1 + torch.randn(200, generator=generator)
    with pytest.raises(ConfigError, match="not reparameterizable"):
        make_estimator("iwae", importance_samples=5).loss(pair.model, pair.guide, x)
    before = pair.inclusive_kl(x).mean().item()
    svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": 0.05}), make_estimator("rws", 1, 5))
    losses = [svi.step(x) for _ in range(150)]
    assert all(math.isfinite(loss) for loss in losses)
    after = pair.inclusive_kl(x).mean().item()
    assert after < before / 100, (before, after)
    assert abs(pair.a.item() - 2) < 0.2 and abs(pair.b.item()) < 0.1, (pair.a, pair.b)


def _unguided(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        u = pyro.sample("u", dist.Normal(z, 1.0))
        pyro.sample("x", dist.Normal(u, 1.0), obs=x)


def _unguided_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x, 1.0))


def _global(x):
    g = pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(g, 1.0), obs=x)


def _global_guide(x):
    pyro.sample("g", dist.Normal(x.new_zeros(()), 1.0))


def _enumerated(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(x.new_tensor(0.5)))
        pyro.sample("x", dist.Normal(c, 1.0), obs=x)


def _enumerated_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("c", dist.Bernoulli(x.new_tensor(0.3)), infer={"enumerate": "parallel"})


@pytest.mark.parametrize(
    "name, pair, message",
    [
        ("piwae", (_unguided, _unguided_guide), r"piwae needs every model latent .* \['u'\]"),
        ("rws", (_unguided, _unguided_guide), r"rws needs every model latent .* \['u'\]"),
        ("piwae", (_global, _global_guide), r"\['g'\] lie outside the data plate"),
        ("rws", (_global, _global_guide), r"\['g'\] lie outside the data plate"),
        ("piwae", (_enumerated, _enumerated_guide), "piwae cannot sum out"),
        ("rws", (_enumerated, _enumerated_guide), "rws cannot sum out"),
    ],
)
def test_pairs_they_cannot_weigh_are_refused_in_one_line(name, pair, message):
    estimator = make_estimator(name, 2, importance_samples=2, max_plate_nesting=1)
    x = torch.randn(4)
    for call in (estimator.loss, estimator.differentiable_loss):
        with pytest.raises(ConfigError, match=message) as raised, pyro.validation_enabled(False):
            call(*pair, x)
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("name", NAMES)
def test_one_importance_sample_is_refused(name):
    with pytest.raises(ConfigError, match=f"{name} needs importance_samples >= 2 \\(got 1\\)"):
        make_estimator(name, num_particles=4)


@pytest.mark.parametrize("name", ["miwae", "piwae"])
def test_one_particle_is_refused_as_iwae(name):
    # with M = 1 both are iwae draw for draw: asking for them so trains something else
    with pytest.raises(ConfigError, match=f"{name} with num_particles=1 is iwae, draw for draw"):
        make_estimator(name, importance_samples=4)


def test_fit_reaches_the_maximum_likelihood_factor_analysis():
    """FA's guide holds the exact posterior, so piwae's and rws's trained pairs come within
    0.01 nats per datapoint (exact log-likelihood) of scikit-learn's maximum-likelihood fit
    (EM to convergence). (miwae is iwae, draw for draw.)"""
    from sklearn.decomposition import FactorAnalysis as SkFA

    from pyro_vae import fit

    x = fa_data(400)
    best = SkFA(n_components=2, tol=1e-5, max_iter=20000).fit(x).score(x)
    for name in ("piwae", "rws"):
        pair = FactorAnalysis()
        fit(pair, x, elbo=name, particles=4, importance_samples=4, epochs=400,
            batch_size=400, lr=0.05, final_particles=0, progress=False)  # fmt: skip
        exact = pair.exact_log_likelihood(torch.as_tensor(x)).mean().item()
        assert best - 0.01 <= exact <= best + 1e-3, (name, exact, best)


def test_the_command_line_trains_with_piwae(tmp_path, capsys):
    from tiny_runs import TINY

    out = tmp_path / "run"
    assert main(["train", *TINY, "--elbo", "piwae", "--importance-samples", "2",
                 "--particles", "2", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "history.json").exists()
    assert main(["train", *TINY, "--elbo", "rws", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--importance-samples" in err, err
    assert not (tmp_path / "bad").exists()


class TwoSites(nn.Module):
    """z1 ~ N(0, 1), z2 | z1 ~ N(a z1, 1), x | z2 ~ N(z2, 1); the guide draws z1 and then z2
    given z1, so rws's log q(sg z) comes from a replay of the guide."""

    def __init__(self):
        super().__init__()
        self.a, self.m, self.r = (nn.Parameter(torch.tensor(v)) for v in (0.5, 0.2, 0.3))

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(()), 1.0))
            z2 = pyro.sample("z2", dist.Normal(self.a * z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(self.m * x, 1.0))
            pyro.sample("z2", dist.Normal(self.r * (z1 + x), 0.8))


def test_rws_on_a_hierarchical_guide_follows_its_formulas():
    pair, x = TwoSites().double(), torch.linspace(-1, 2, N, dtype=torch.float64)
    estimator = make_estimator("rws", num_particles=2, importance_samples=3)
    pyro.set_rng_seed(0)
    particles = estimator.draw(pair.model, pair.guide, (x,), {})
    loss = estimator.loss_of(particles)
    grads = torch.autograd.grad(loss, [pair.a, pair.m, pair.r])
    z1, z2 = (particles.guide_trace.nodes[s]["value"].detach() for s in ("z1", "z2"))
    log_q = dist.Normal(pair.m * x, 1.0).log_prob(z1) + dist.Normal(
        pair.r * (z1 + x), 0.8
    ).log_prob(z2)
    log_p = (
        dist.Normal(0.0, 1.0).log_prob(z1)
        + dist.Normal(pair.a * z1, 1.0).log_prob(z2)
        + dist.Normal(z2, 1.0).log_prob(x)
    )
    log_w = (log_p - log_q.detach()).reshape(2, 3, N)
    bound = _iwae(log_w)
    wake_phi = (torch.softmax(log_w.detach(), 1) * log_q.reshape(2, 3, N)).sum(1).sum(-1).mean()
    want = [
        *torch.autograd.grad(-bound, [pair.a], retain_graph=True),
        *torch.autograd.grad(-wake_phi, [pair.m, pair.r]),
    ]
    torch.testing.assert_close(loss, -bound.detach(), rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
