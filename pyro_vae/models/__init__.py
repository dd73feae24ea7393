"""The package's own model families, each a Pyro model/guide pair in one :class:`torch.nn.Module`.

:class:`VAE` (:mod:`~pyro_vae.models.vae`), :class:`CVAE` (:mod:`~pyro_vae.models.cvae`),
:class:`VAE2` (:mod:`~pyro_vae.models.vae2`) and :class:`VampPriorVAE`
(:mod:`~pyro_vae.models.vampprior`), built from the networks of :mod:`~pyro_vae.models.nets` and
configured by :class:`~pyro_vae.models.config.ModelConfig`.
"""

from pyro_vae.models.cvae import CVAE
from pyro_vae.models.vae import VAE
from pyro_vae.models.vae2 import VAE2
from pyro_vae.models.vampprior import VampPriorVAE

__all__ = ["CVAE", "VAE", "VAE2", "VampPriorVAE"]
