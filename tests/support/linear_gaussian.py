"""A linear-Gaussian latent model (probabilistic PCA) with everything known in closed form.

Generative model, for each datapoint n in ``pyro.plate("data", N)``::

    z_n ~ N(0, I_d),        x_n | z_n ~ N(W z_n + b, σ² I_D)

Closed forms used as ground truth by the tests:

* marginal      p(x) = N(x; b, W Wᵀ + σ² I_D)
* posterior     p(z | x) = N(m, S),  S = (I_d + Wᵀ W / σ²)⁻¹,  m = S Wᵀ (x − b) / σ²
* KL(q ‖ p(z|x)) between the guide and the posterior (both Gaussian).

The guide is configurable: ``guide="full"`` uses the posterior's full covariance, ``"diagonal"``
only its diagonal (the posterior's marginal variances). Either can be made deliberately wrong with
``loc_shift`` (added to the mean) and ``scale_factor`` (multiplies the standard deviations /
the Cholesky factor's rows). ``LinearGaussian.random(...)`` with the defaults gives the exact
posterior guide, for which every importance weight equals p(x).

Parameters are ordinary ``nn.Parameter``\\ s of this module, never in Pyro's global param store.
The guide is computed from the model's current parameters, so the ``"full"`` guide with no shift
and unit scale factor stays exact as ``weight``, ``bias`` or ``noise_scale`` change (gradients
flow into the guide through them).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import MultivariateNormal, kl_divergence

DATA_PLATE = "data"
GUIDE_FAMILIES = ("full", "diagonal")


class LinearGaussian(nn.Module):
    """Probabilistic PCA as a Pyro model/guide pair (sites ``"z"`` and ``"x"``).

    :param weight: ``W``, shape ``[D, d]``.
    :param bias: ``b``, shape ``[D]``.
    :param noise_scale: ``σ > 0`` (scalar).
    :param guide: ``"full"`` or ``"diagonal"`` covariance, see the module docstring.
    :param loc_shift: added to the guide's mean (scalar or ``[d]``).
    :param scale_factor: multiplies the guide's standard deviations (scalar or ``[d]``, > 0).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        noise_scale: float | torch.Tensor,
        guide: str = "full",
        loc_shift: float | torch.Tensor = 0.0,
        scale_factor: float | torch.Tensor = 1.0,
    ):
        super().__init__()
        if guide not in GUIDE_FAMILIES:
            raise ValueError(f"guide must be one of {GUIDE_FAMILIES}, got {guide!r}")
        if weight.dim() != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(
                f"weight must be [D, d] and bias [D]; got {list(weight.shape)} and "
                f"{list(bias.shape)}"
            )
        like = dict(dtype=weight.dtype, device=weight.device)
        latent_dim = weight.shape[1]
        scale_factor = torch.as_tensor(scale_factor, **like)
        if (scale_factor <= 0).any() or torch.as_tensor(noise_scale) <= 0:
            raise ValueError("noise_scale and scale_factor must be positive")
        self.guide_family = guide
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone())
        self.log_noise_scale = nn.Parameter(torch.as_tensor(noise_scale, **like).log())
        self.loc_shift = nn.Parameter(torch.as_tensor(loc_shift, **like).expand(latent_dim).clone())
        self.log_scale_factor = nn.Parameter(scale_factor.log().expand(latent_dim).clone())

    @classmethod
    def random(
        cls,
        data_dim: int,
        latent_dim: int,
        *,
        noise_scale: float = 0.5,
        guide: str = "full",
        loc_shift: float | torch.Tensor = 0.0,
        scale_factor: float | torch.Tensor = 1.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> LinearGaussian:
        """A model with ``W`` and ``b`` drawn from N(0, 1) by a private, seeded generator."""
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(data_dim, latent_dim, generator=generator, dtype=dtype)
        bias = torch.randn(data_dim, generator=generator, dtype=dtype)
        return cls(weight, bias, noise_scale, guide, loc_shift, scale_factor)

    @property
    def data_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def noise_scale(self) -> torch.Tensor:
        return self.log_noise_scale.exp()

    @property
    def scale_factor(self) -> torch.Tensor:
        return self.log_scale_factor.exp()

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """p(z) p(x | z) for the rows of ``x`` ([N, D]), inside ``pyro.plate("data", N)``."""
        with pyro.plate(DATA_PLATE, x.shape[0]):
            prior = dist.Normal(x.new_zeros(()), 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample("z", prior)
            loc = z @ self.weight.T + self.bias
            return pyro.sample("x", dist.Normal(loc, self.noise_scale).to_event(1), obs=x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """q(z | x): :meth:`guide_distribution` as Pyro site ``"z"`` in the same plate."""
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample("z", self.guide_distribution(x))

    def _posterior_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m [N, d], S [d, d])."""
        variance = self.noise_scale**2
        eye = torch.eye(self.latent_dim, dtype=x.dtype, device=x.device)
        cov = torch.linalg.inv(eye + self.weight.T @ self.weight / variance)
        cov = (cov + cov.T) / 2
        loc = (x - self.bias) @ self.weight @ cov / variance
        return loc, cov

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The exact posterior p(z | x_n), batch shape ``[N]``, event shape ``[d]``."""
        loc, cov = self._posterior_params(x)
        return MultivariateNormal(loc, covariance_matrix=cov)

    def guide_distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x_n), batch shape ``[N]``, event shape ``[d]`` (a Pyro distribution)."""
        loc, cov = self._posterior_params(x)
        loc = loc + self.loc_shift
        if self.guide_family == "full":
            scale_tril = self.scale_factor[:, None] * torch.linalg.cholesky(cov)
            return dist.MultivariateNormal(loc, scale_tril=scale_tril)
        scale = self.scale_factor * cov.diagonal().sqrt()
        return dist.Normal(loc, scale.expand_as(loc)).to_event(1)

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x_n), shape ``[N]``."""
        eye = torch.eye(self.data_dim, dtype=x.dtype, device=x.device)
        cov = self.weight @ self.weight.T + self.noise_scale**2 * eye
        return MultivariateNormal(self.bias, covariance_matrix=cov).log_prob(x)

    def kl_guide_to_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """Exact KL(q(z|x_n) ‖ p(z|x_n)), shape ``[N]``; zero iff the guide is exact."""
        q = self.guide_distribution(x)
        if self.guide_family == "diagonal":
            q = MultivariateNormal(q.base_dist.loc, scale_tril=torch.diag_embed(q.base_dist.scale))
        return kl_divergence(q, self.posterior(x))

    def sample(self, num_data: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_data`` draws x ~ p(x), shape ``[num_data, D]`` (uses ``generator`` if given)."""
        like = dict(dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            z = torch.randn(num_data, self.latent_dim, generator=generator, **like)
            noise = torch.randn(num_data, self.data_dim, generator=generator, **like)
            return z @ self.weight.T + self.bias + self.noise_scale * noise
