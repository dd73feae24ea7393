"""The VAE as a Pyro model/guide pair.

``model`` and ``guide`` are twins: the same latent site ``"z"`` inside the same
``pyro.plate("data", N)`` with ``.to_event(1)`` over the latent dimension. Tensors are created from
the input, so the pair runs wherever its data and parameters live.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.params import param_with_module_name
from torch import nn

from .config import ModelConfig
from .errors import ConfigError
from .nets import GaussianEncoder, LogitDecoder

DATA_PLATE = "data"
LATENT_SITE = "z"
OBS_SITE = "x"


def register_module(name: str, module: nn.Module) -> None:
    """Register ``module``'s parameters with Pyro's param store (as ``pyro.module`` does).

    Unlike ``pyro.module`` it never binds the name to parameters that another module put in the
    store first: entries under ``name`` always point at this module's own tensors, so two models
    with one name never silently share (or swap) parameters; the one that ran last is registered.
    """
    store = pyro.get_param_store()
    for param_name, value in module.named_parameters():
        full_name = param_with_module_name(name, param_name)
        if pyro.param(full_name, value) is not value:
            del store[full_name]
            pyro.param(full_name, value)


def forget_params(name: str) -> None:
    """Drop the param-store entries registered under ``name`` (and only those)."""
    store = pyro.get_param_store()
    for key in [key for key in store.keys() if key.startswith(f"{name}.")]:
        del store[key]


class VAE(nn.Module):
    """Variational autoencoder with a N(0, I) prior, a Bernoulli decoder on logits and a
    diagonal-Gaussian encoder.

    Generative model (``model``)::

        z_n ~ N(0, I_d),   x_n | z_n ~ Bernoulli(sigmoid(decoder(z_n)))     for n in plate "data"

    Guide (``guide``)::

        z_n | x_n ~ N(loc(x_n), diag scale(x_n)²)

    Parameters are registered with Pyro's param store under ``name`` so the pair works with
    ``pyro.infer.SVI``; they are ordinary ``nn.Module`` parameters too, so any torch optimizer works.
    The module owns them: the store's entries always point at the tensors of the model that ran
    last under ``name`` (see :func:`register_module`).
    """

    conditional = False

    def __init__(self, input_dim: int, latent_dim: int = 8, hidden: Sequence[int] = (128,),
                 scale_fn: str = "softplus", name: str = "vae"):
        super().__init__()
        if input_dim < 1:
            raise ConfigError(f"input_dim must be >= 1, got {input_dim}")
        self.config = ModelConfig(latent_dim=latent_dim, hidden=tuple(hidden), scale_fn=scale_fn)
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.name = name
        self.encoder = GaussianEncoder(input_dim, self.config.hidden, latent_dim, scale_fn)
        self.decoder = LogitDecoder(latent_dim, self.config.hidden, input_dim)

    def set_output_bias(self, mean_image: torch.Tensor) -> None:
        """Start the decoder at the data's pixel marginals (see :class:`LogitDecoder`)."""
        self.decoder.set_output_bias(mean_image)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def model(self, x: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """p(z) p(x|z). With ``x=None`` it samples ``num_data`` new images (default 1)."""
        register_module(f"{self.name}.decoder", self.decoder)
        if x is None:
            n = 1 if num_data is None else num_data
            zeros = torch.zeros((), device=self._device())
        else:
            n = x.shape[0]
            zeros = x.new_zeros(())
        with pyro.plate(DATA_PLATE, n):
            prior = dist.Normal(zeros, 1.0).expand([self.latent_dim]).to_event(1)
            z = pyro.sample(LATENT_SITE, prior)
            logits = self.decoder(z)
            return pyro.sample(OBS_SITE, dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> torch.Tensor:
        """q(z|x), a diagonal Gaussian from the encoder."""
        register_module(f"{self.name}.encoder", self.encoder)
        with pyro.plate(DATA_PLATE, x.shape[0]):
            loc, scale = self.encoder(x)
            return pyro.sample(LATENT_SITE, dist.Normal(loc, scale).to_event(1))

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """New images: z ~ N(0, I), then the decoder's mean (``mean=True``) or a Bernoulli draw."""
        z = torch.randn(num_samples, self.latent_dim, device=self._device(), generator=generator)
        probs = torch.sigmoid(self.decoder(z))
        return probs if mean else torch.bernoulli(probs, generator=generator)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The guide's (loc, scale) for each row of ``x``."""
        return self.encoder(x)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, sample_latent: bool = False) -> torch.Tensor:
        """Decoder mean at the guide's mean (or at a draw z ~ q(z|x) with ``sample_latent``)."""
        loc, scale = self.encoder(x)
        z = loc + scale * torch.randn_like(loc) if sample_latent else loc
        return torch.sigmoid(self.decoder(z))
