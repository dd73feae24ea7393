"""Model/guide pairs written the way a user writes them, defined only for the tests, with the
data they train on. Factories here are also loaded by the command line (``--model-factory
tests/support/user_models.py:NAME``)."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

FA_DIM, FA_FACTORS = 5, 2
SEQ_MAX_LEN, SEQ_LATENT = 6, 2


class FactorAnalysis(nn.Module):
    """x = W z + μ + ε, z ~ N(0, I), ε ~ N(0, diag ψ); the guide q(z|x) = N(A x + b, L Lᵀ) is
    linear with a full covariance, so it holds the exact posterior."""

    def __init__(self, dim: int = FA_DIM, factors: int = FA_FACTORS, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(0.1 * torch.randn(dim, factors, generator=g, dtype=dtype))
        self.mu = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.raw_psi = nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.A = nn.Parameter(torch.zeros(factors, dim, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(factors, dtype=dtype))
        self.raw_tril = nn.Parameter(torch.zeros(factors, factors, dtype=dtype))

    @property
    def psi(self) -> torch.Tensor:
        return softplus(self.raw_psi) + 1e-4

    def model(self, x):
        pyro.module("fa", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(
                "z", dist.Normal(x.new_zeros(x.shape[0], self.W.shape[1]), 1.0).to_event(1)
            )
            pyro.sample(
                "x", dist.Normal(z @ self.W.T + self.mu, self.psi.sqrt()).to_event(1), obs=x
            )

    def guide(self, x):
        pyro.module("fa", self)
        tril = self.raw_tril.tril(-1) + torch.diag(softplus(self.raw_tril.diagonal()) + 1e-4)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ self.A.T + self.b, scale_tril=tril))

    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + torch.diag(self.psi)
        return dist.MultivariateNormal(self.mu, cov).log_prob(x)


def make_fa() -> FactorAnalysis:
    return FactorAnalysis()


def fa_data(num: int = 400, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    loadings = rng.normal(size=(FA_DIM, FA_FACTORS))
    noise = rng.uniform(0.2, 0.6, size=FA_DIM)
    z = rng.normal(size=(num, FA_FACTORS))
    return (z @ loadings.T + 1.5 + rng.normal(size=(num, FA_DIM)) * np.sqrt(noise)).astype(
        np.float32
    )


class Sequences(Dataset):
    """Variable-length sequences x_t = c_t · z + noise, t < T_i."""

    def __init__(self, num: int = 60, seed: int = 0):
        loadings = torch.randn(SEQ_MAX_LEN, SEQ_LATENT, generator=torch.Generator().manual_seed(7))
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(num):
            length = int(torch.randint(2, SEQ_MAX_LEN + 1, (), generator=g))
            z = torch.randn(SEQ_LATENT, generator=g)
            self.items.append(loadings[:length] @ z + 0.3 * torch.randn(length, generator=g))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


def pad_collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of the batch; the mask marks the real steps."""
    lengths = torch.tensor([len(item) for item in items])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return {"x": pad_sequence(items, batch_first=True), "mask": mask}


class LinearSequenceModel(nn.Module):
    """z ~ N(0, I), x_t ~ N(c_t · z, σ²) for the unmasked steps. The guide is the exact
    posterior N(Σ Cᵀx/σ², Σ), Σ = (I + CᵀC/σ²)⁻¹ over each sequence's own steps, so every
    log-weight is exactly log p(x)."""

    def __init__(self):
        super().__init__()
        self.loadings = nn.Parameter(
            torch.randn(SEQ_MAX_LEN, SEQ_LATENT, generator=torch.Generator().manual_seed(1))
        )
        self.raw_noise = nn.Parameter(torch.zeros(()))

    @property
    def noise(self) -> torch.Tensor:
        return softplus(self.raw_noise) + 1e-3

    def model(self, x, mask):
        pyro.module("seq", self)
        loadings = self.loadings[: x.shape[1]]
        with pyro.plate("sequences", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], SEQ_LATENT), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ loadings.T, self.noise).mask(mask).to_event(1), obs=x)

    def posterior(self, x, mask):
        c = self.loadings[: x.shape[1]] * mask[..., None]  # [B, T, k], padded rows 0
        precision = torch.eye(SEQ_LATENT) + c.transpose(1, 2) @ c / self.noise**2
        cov = torch.linalg.inv(precision)
        loc = (cov @ (c.transpose(1, 2) @ (x * mask)[..., None]))[..., 0] / self.noise**2
        return loc, cov

    def guide(self, x, mask):
        pyro.module("seq", self)
        loc, cov = self.posterior(x, mask)
        with pyro.plate("sequences", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=cov))

    def exact_log_likelihood(self, x, mask):
        out = []
        for row, keep in zip(x, mask):
            c = self.loadings[: int(keep.sum())]
            cov = c @ c.T + self.noise**2 * torch.eye(c.shape[0])
            out.append(
                dist.MultivariateNormal(torch.zeros(c.shape[0]), cov).log_prob(row[: c.shape[0]])
            )
        return torch.stack(out)


def make_sequence_model() -> LinearSequenceModel:
    return LinearSequenceModel()


def sequence_data():
    """A (train, test) pair of Datasets whose batches the pair's collate function pads."""
    from torch.utils.data import DataLoader

    return (
        DataLoader(Sequences(60, seed=0), batch_size=16, shuffle=True, collate_fn=pad_collate),
        DataLoader(Sequences(20, seed=1), batch_size=16, collate_fn=pad_collate),
    )


class Regression(nn.Module):
    """A conditional latent-variable regression: z ~ N(0, I), y ~ N(w_x·x + w_z·z, σ²), with
    float inputs x and outputs y as keyword arguments; guide q(z | x, y)."""

    def __init__(self, x_dim: int = 3, latent: int = 2):
        super().__init__()
        self.decoder = nn.Linear(x_dim + latent, 1)
        self.encoder = nn.Linear(x_dim + 1, 2 * latent)
        self.latent = latent

    def model(self, x, y):
        pyro.module("regression", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            inputs = torch.cat([x.expand(*z.shape[:-1], x.shape[-1]), z], -1)
            loc = self.decoder(inputs)[..., 0]
            pyro.sample("y", dist.Normal(loc, 0.5), obs=y)

    def guide(self, x, y):
        pyro.module("regression", self)
        loc, raw = self.encoder(torch.cat([x, y[..., None]], -1)).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, softplus(raw) + 1e-3).to_event(1))


def regression_data(num: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(num, generator=g)
    return {"x": x, "y": y}


def fa_model(x):
    """Factor analysis as two plain Pyro functions: every parameter a ``pyro.param`` entry."""
    loadings = pyro.param("loadings", lambda: 0.1 * torch.randn(x.shape[-1], FA_FACTORS))
    mean = pyro.param("mean", lambda: torch.zeros(x.shape[-1]))
    noise = pyro.param("noise", lambda: torch.ones(()), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], FA_FACTORS), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ loadings.T + mean, noise).to_event(1), obs=x)


def fa_guide(x):
    weight = pyro.param("encoder_weight", lambda: torch.zeros(FA_FACTORS, x.shape[-1]))
    scale = pyro.param(
        "encoder_scale", lambda: torch.ones(FA_FACTORS), constraint=dist.constraints.positive
    )
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ weight.T, scale).to_event(1))


def make_fa_functions():
    """The plain-function factor analysis, as a ``(model, guide)`` factory."""
    return fa_model, fa_guide
