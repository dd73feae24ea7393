"""``miwae``: the average of M importance-weighted bounds of K draws each (Rainforth, Kosiorek,
Le, Maddison, Igl, Wood and Teh 2018), see :class:`MultipleImportanceWeightedELBO`."""

from __future__ import annotations

from pyro_vae.infer.iwae import ImportanceWeightedELBO


class MultipleImportanceWeightedELBO(ImportanceWeightedELBO):
    r"""MIWAE(M, K) (Rainforth, Kosiorek, Le, Maddison, Igl, Wood and Teh 2018, "Tighter
    variational bounds are not necessarily better"): the average of M independent IWAE bounds
    of K draws each, for the model's and the guide's parameters alike,

    .. math::

        \mathrm{MIWAE}(M, K) = \frac1M \sum_{m=1}^M
        \log \frac1K \sum_{k=1}^K w_{mk}, \qquad z_{mk} \sim q(z \mid x),

    with M = ``num_particles`` outside the log and K = ``importance_samples`` inside it. This is
    what :class:`ImportanceWeightedELBO` computes with ``num_particles=M`` and
    ``importance_samples=K``, value and gradient, draw for draw; ``miwae`` names it, as the
    paper does. M trades the guide gradient's signal-to-noise ratio (which grows as √M) against
    the tightness of the bound (which grows with K): MIWAE(1, K) is IWAE_K, MIWAE(M, 1) the ELBO
    of M particles. K ≥ 2 (with K = 1 it is ``trace`` with ``num_particles=M``).
    """

    name = "miwae"
    min_importance_samples = 2
    single_particle_is = "iwae"
