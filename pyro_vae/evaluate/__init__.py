r"""Evaluation from traces: importance-weighted log p̂(x), ELBO, gap, ESS and PSIS k-hat.

For any Pyro model/guide pair whose sample sites all lie in one data plate, K particles
z_k ~ q(z|x) give per-datapoint log-weights log w_k = log p(x, z_k) − log q(z_k|x)
(:func:`pyro_vae.core.log_probs.vectorized_log_probs`). From them, for every datapoint:

.. math::

    \log \hat p_K(x) = \operatorname{logsumexp}_k \log w_k - \log K, \qquad
    \mathrm{ELBO}(x) = \tfrac1K \textstyle\sum_k \log w_k, \qquad
    \mathrm{gap}(x) = \log \hat p_K(x) - \mathrm{ELBO}(x),

the self-consistency ``var_log_w`` = (1/K) Σ_k (log w_k − ELBO)², the normalized effective sample
size (Σ w)² / (K Σ w²) and the Pareto k-hat of the weights' right tail (Vehtari et al., 2024,
"Pareto smoothed importance sampling", JMLR 25(72)), the estimate of :func:`arviz.psislw`.

Memory stays bounded: particles are drawn in chunks of ``particle_chunk`` and datapoints in
batches of ``batch_size`` (:func:`evaluate_dataset` sizes the chunk from the pair by default,
``particle_chunk="auto"``: as many particles per call as keep the largest sample-site tensor
near 12 MiB, :mod:`pyro_vae.evaluate.sizing`, so the elementwise passes run in cache); log p̂,
ELBO, variance and ESS are accumulated over chunks with a streaming logsumexp; k-hat needs only
the M + 1 largest weights of each datapoint (M = ceil(min(K/5, 3√K))), kept as a running top-M,
so memory does not grow with K; the full ``[K, N]`` log-weights are kept only on request.
Before anything is drawn, the arrays that grow with K (a chunk's log-weights, the top-M, the
kept log-weights) are sized and refused with :class:`~pyro_vae.util.memory.MemoryLimitError`
when they exceed the free memory (or
:func:`pyro_vae.util.memory.limit`); the pair's own activations are not measured here.

Random numbers come from torch's global generator in a fixed order (batch by batch, chunk by
chunk), so a run is reproducible for a given seed, ``batch_size`` and ``particle_chunk`` (the
automatic chunk depends only on the pair's shapes and the batch size, not on the machine). With
``batch_seed`` (as :func:`evaluate_run` does) each batch is instead drawn from its own seed, made
from ``batch_seed`` and the batch's index, so its numbers do not depend on which process
evaluates it: that is what lets ranks under torchrun share the batches out and still reproduce a
single process exactly. Within a batch, a datapoint's log-weights depend only on its own data
and its slice of the draws: changing another datapoint leaves them unchanged, bit for bit. Other
batch or chunk sizes draw different particles with the same distribution (one vectorized draw
per chunk covers the whole batch, so a datapoint's particles depend on its batch): the results
agree in distribution, and exactly (to rounding) when the guide is the exact posterior, where
every log-weight equals log p(x).

Pyro's distribution validation, when enabled, runs once per model/guide call or batch, on a
one-particle call on a copy of the random state (so every batch's data are checked and the
draws are unchanged); the particle chunks run unvalidated, as they see the same data and
parameters. A first chunk of a few particles is validated itself instead of after a separate
call, and one particle is drawn without a particle plate and without the vectorization probe.
The probe (whether the pair's networks may see a particle dimension,
:mod:`pyro_vae.core.vectorization`) runs once per call, on the first chunk: its first and last
particles are replayed one at a time on a fork of the random state, and the chunk is kept when
they agree (otherwise it is drawn again, one particle per call, from the same random state).
Non-finite log-weights raise :class:`EvaluationError`.
"""

from pyro_vae.evaluate.chunks import log_weights
from pyro_vae.evaluate.dataset import evaluate_dataset
from pyro_vae.evaluate.khat import KHAT_GOOD, KHAT_OK, MIN_KHAT_PARTICLES, khat_reading, pareto_khat
from pyro_vae.evaluate.rate_distortion import (
    RateDistortion,
    format_rate_distortion,
    rate_distortion,
)
from pyro_vae.evaluate.results import (
    INFERENCE_DATA_GROUP,
    METRICS,
    EvaluationResult,
    format_table,
    save_evaluation,
)
from pyro_vae.evaluate.surgery import Surgery
from pyro_vae.evaluate.weights import EvaluationError, evaluate, weight_statistics

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "INFERENCE_DATA_GROUP",
    "KHAT_GOOD",
    "KHAT_OK",
    "METRICS",
    "MIN_KHAT_PARTICLES",
    "RateDistortion",
    "Surgery",
    "evaluate",
    "evaluate_dataset",
    "format_rate_distortion",
    "format_table",
    "khat_reading",
    "log_weights",
    "pareto_khat",
    "rate_distortion",
    "save_evaluation",
    "weight_statistics",
]
