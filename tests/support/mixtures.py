"""Discrete-latent pairs with closed-form log-likelihoods: a Gaussian mixture, whose log p(x) is
a log-sum of Gaussian densities, and a mixture of factor analysers, whose log p(x) is a log-sum
of Gaussian densities with low-rank covariances; both with the class summed out by the guide
(marked for enumeration) or sampled."""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

C, D, LATENT = 3, 2, 1


class GaussianMixture(nn.Module):
    """y ~ Categorical(π), x ~ N(μ_y, σ² I); the guide q(y | x) is any classifier."""

    def __init__(self, enumerate_y: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.logits = nn.Parameter(torch.randn(C, generator=g))
        self.means = nn.Parameter(3 * torch.randn(C, D, generator=g))
        self.classifier = nn.Linear(D, C)
        self.scale = 0.7
        self.enumerate_y = enumerate_y

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.logits.expand(x.shape[0], C)))
            pyro.sample("x", dist.Normal(self.means[y], self.scale).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            infer = {"enumerate": "parallel"} if self.enumerate_y else {}
            pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer=infer)

    def exact_log_likelihood(self, x):
        components = dist.Normal(self.means, self.scale).to_event(1).log_prob(x[:, None, :])
        return torch.logsumexp(components + self.logits.log_softmax(-1), -1)


class MixtureOfFactorAnalysers(nn.Module):
    """y ~ Categorical(π), z ~ N(0, 1), x ~ N(W_y z + μ_y, ψ I); guide q(y|x) q(z|x, y) with
    q(z|x, y) the exact posterior of z given y with its standard deviation widened 1.5 times
    (a good guide, not a perfect one) and q(y|x) uniform."""

    def __init__(self, enumerate_y: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.logits = torch.randn(C, generator=g)
        self.W = torch.randn(C, D, LATENT, generator=g)
        self.mu = 2 * torch.randn(C, D, generator=g)
        self.psi = 0.3
        self.enumerate_y = enumerate_y

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.logits.expand(x.shape[0], C)))
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], LATENT), 1.0).to_event(1))
            loc = (self.W[y] @ z[..., None])[..., 0] + self.mu[y]
            pyro.sample("x", dist.Normal(loc, self.psi**0.5).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            infer = {"enumerate": "parallel"} if self.enumerate_y else {}
            y = pyro.sample("y", dist.Categorical(logits=x.new_zeros(x.shape[0], C)), infer=infer)
            w = self.W[y]  # [..., N, D, 1]
            var = 1.0 / (1.0 + (w * w).sum((-2, -1)) / self.psi)  # [..., N]
            loc = var[..., None] * ((x - self.mu[y])[..., None, :] @ w)[..., 0, :] / self.psi
            pyro.sample("z", dist.Normal(loc, 1.5 * var[..., None].sqrt()).to_event(1))

    def exact_log_likelihood(self, x):
        cov = self.W @ self.W.transpose(1, 2) + self.psi * torch.eye(D)
        components = dist.MultivariateNormal(self.mu, cov).log_prob(x[:, None, :])
        return torch.logsumexp(components + self.logits.log_softmax(-1), -1)


def points(n=40, seed=2):
    return 3 * torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def mixture_data():
    g = torch.Generator().manual_seed(3)
    centers = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    return centers[torch.randint(0, C, (600,), generator=g)] + 0.7 * torch.randn(
        600, D, generator=g
    )


class LearnedFactorAnalysers(MixtureOfFactorAnalysers):
    """The mixture of factor analysers with a guide q(z | x, y) that has parameters: a shift of
    its mean per class and a log-factor on its standard deviation; ``exact=True`` starts them
    at the exact posterior p(z | x, y). ``buffers=False`` keeps the model's constants as plain
    tensor attributes."""

    def __init__(self, exact: bool, buffers: bool = True):
        super().__init__()
        if buffers:  # the model's constants as buffers (what a compiled step needs)
            for name in ("logits", "W", "mu"):
                value = getattr(self, name)
                delattr(self, name)
                self.register_buffer(name, value)
        self.shift = nn.Parameter(
            torch.zeros(C, LATENT) if exact else torch.tensor([[0.4], [-0.3], [0.2]])
        )
        self.log_widen = nn.Parameter(torch.tensor(0.0 if exact else math.log(1.5)))

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample(
                "y",
                dist.Categorical(logits=x.new_zeros(x.shape[0], C)),
                infer={"enumerate": "parallel"},
            )
            w = self.W[y]
            var = 1.0 / (1.0 + (w * w).sum((-2, -1)) / self.psi)
            loc = var[..., None] * ((x - self.mu[y])[..., None, :] @ w)[..., 0, :] / self.psi
            scale = var[..., None].sqrt() * self.log_widen.exp()
            pyro.sample("z", dist.Normal(loc + self.shift[y], scale).to_event(1))
