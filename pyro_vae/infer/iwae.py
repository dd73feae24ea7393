"""``iwae``: the K-sample importance-weighted bound (Burda, Grosse and Salakhutdinov 2016), see
:class:`ImportanceWeightedELBO`."""

from __future__ import annotations

from pyro_vae.infer.elbo import ELBOEstimator


class ImportanceWeightedELBO(ELBOEstimator):
    r"""The importance-weighted bound (IWAE; Burda, Grosse and Salakhutdinov 2016) per datapoint:

    .. math::

        \mathcal L_K = \mathbb E\Bigl[\log \tfrac1K \textstyle\sum_{k=1}^K w_k\Bigr],
        \qquad \log w_k = \log p(x|z_k) + \beta(\log p(z_k) - \log q(z_k|x)),
        \quad z_{1:K} \sim q(z|x),

    with the logsumexp over the K draws of each datapoint (inside the data plate), then summed
    over datapoints and averaged over P independent sets of K draws. β weights the rate part
    inside each log-weight; at β = 1 the bound lies below log p(x), rises with K and tends to
    it. K = 1 is :class:`TraceELBO`. The gradient is the reparameterization gradient of the
    bound, Σ_k w̃_k ∇ log w_k with normalized weights w̃_k = w_k / Σ_j w_j.
    """

    name = "iwae"
    sums_enumerated = True
