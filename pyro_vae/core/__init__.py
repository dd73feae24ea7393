"""The trace core: how the package reads a Pyro model/guide pair, on Pyro's own poutines.

Pairs in every form (:mod:`~pyro_vae.core.pairs`), traces and plates
(:mod:`~pyro_vae.core.traces`), enumeration (:mod:`~pyro_vae.core.enumeration`), the particles
and their log-densities (:mod:`~pyro_vae.core.particles`, :mod:`~pyro_vae.core.log_probs`), the
check that networks broadcast over the particle dimension
(:mod:`~pyro_vae.core.vectorization`) and the probe of a user's pair
(:mod:`~pyro_vae.core.protocol`). The estimators (:mod:`pyro_vae.infer`) and the evaluator
(:mod:`pyro_vae.evaluate`) stand on it.
"""
