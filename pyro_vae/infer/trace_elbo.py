"""``trace``: the reparameterized Monte Carlo ELBO (Pyro's ``Trace_ELBO`` on a reparameterized
guide), see :class:`TraceELBO`."""

from __future__ import annotations

from .elbo import ELBOEstimator


class TraceELBO(ELBOEstimator):
    r"""The reparameterized Monte Carlo ELBO:

    .. math::

        \mathcal L_\beta = \mathbb E_{q}\bigl[\log p(x|z) + \beta(\log p(z) - \log q(z|x))\bigr],
        \qquad \widehat{\mathcal L} = \tfrac1P \textstyle\sum_p \log w_\beta(z_p).

    Its gradient is the full reparameterization gradient (path and score terms). At β = 1,
    with no model latent left out of the guide, this is the quantity of Pyro's ``Trace_ELBO``
    on a reparameterized guide (the tests compare values and gradients on the same draws).
    """

    name = "trace"
    sums_enumerated = True
    importance_hint = "use --elbo iwae (or dreg) for importance samples inside it"
