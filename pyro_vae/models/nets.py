"""Plain ``torch.nn`` networks: no Pyro calls, no training logic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}
MIN_SCALE = 1e-5


def activation_class(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def mlp(
    sizes: Sequence[int], activation: str = "softplus", final_activation: bool = False
) -> nn.Sequential:
    """Linear layers between consecutive ``sizes`` with ``activation`` between them (and after
    the last one with ``final_activation``)."""
    act = activation_class(activation)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2 or final_activation:
            layers.append(act())
    return nn.Sequential(*layers)


def positive(raw: torch.Tensor, scale_fn: str) -> torch.Tensor:
    """``softplus(raw)`` or ``exp(raw)``, plus a small floor that keeps scales strictly positive."""
    if scale_fn == "softplus":
        return F.softplus(raw) + MIN_SCALE
    if scale_fn == "exp":
        return raw.exp() + MIN_SCALE
    raise ValueError(f"scale_fn must be 'softplus' or 'exp', got {scale_fn!r}")


class _MLPEncoder(nn.Module):
    """The shared part of the encoders: an MLP body (``activation`` after every hidden layer)
    and one linear head with ``head_dim`` raw outputs. State-dict keys: ``body.*``, ``head.*``."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        latent_dim: int,
        head_dim: int,
        scale_fn: str,
        activation: str,
    ):
        super().__init__()
        positive(torch.zeros(()), scale_fn)
        self.scale_fn = scale_fn
        self.latent_dim = latent_dim
        self.body = mlp([input_dim, *hidden], activation, final_activation=True)
        self.head = nn.Linear(hidden[-1] if hidden else input_dim, head_dim)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class GaussianEncoder(_MLPEncoder):
    """x ↦ (loc, scale) of a diagonal Gaussian over the latent code."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        latent_dim: int,
        scale_fn: str = "softplus",
        activation: str = "softplus",
    ):
        super().__init__(input_dim, hidden, latent_dim, 2 * latent_dim, scale_fn, activation)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.raw(x).chunk(2, dim=-1)
        return loc, positive(raw_scale, self.scale_fn)


class FullCovarianceEncoder(_MLPEncoder):
    """x ↦ (loc, scale_tril) of a full-covariance Gaussian, Σ = L Lᵀ.

    L is lower-triangular with a positive diagonal (``scale_fn`` of the raw diagonal) and
    unconstrained entries below it, so z = loc + L ε with ε ~ N(0, I).
    """

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        latent_dim: int,
        scale_fn: str = "softplus",
        activation: str = "softplus",
    ):
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        super().__init__(
            input_dim, hidden, latent_dim, 2 * latent_dim + rows.shape[0], scale_fn, activation
        )
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.latent_dim
        out = self.raw(x)
        loc, raw_diag, below = out[..., :d], out[..., d : 2 * d], out[..., 2 * d :]
        scale_tril = torch.diag_embed(positive(raw_diag, self.scale_fn))
        scale_tril[..., self._rows, self._cols] = below
        return loc, scale_tril


class Decoder(nn.Module):
    """z ↦ the likelihood's parameter per pixel (Bernoulli logits or Gaussian means): an MLP
    mirroring the encoder."""

    def __init__(
        self, latent_dim: int, hidden: Sequence[int], output_dim: int, activation: str = "softplus"
    ):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden), output_dim], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def set_output_bias(self, bias: torch.Tensor) -> None:
        """Set the last layer's bias, e.g. to logit(mean pixel) so training starts at the data's
        marginals."""
        with torch.no_grad():
            self.net[-1].bias.copy_(bias)


class ObservationScale(nn.Module):
    """A learned, shared standard deviation σ = exp(log_scale) of a Gaussian likelihood."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(float(init)).log())

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp()
