"""The bottom layer: what every other layer uses and that knows nothing of models or inference.

Errors (:mod:`~pyro_vae.util.errors`), atomic files and bounded reads (:mod:`~pyro_vae.util.io`,
:mod:`~pyro_vae.util.files`, :mod:`~pyro_vae.util.tempnames`), memory and time estimates
(:mod:`~pyro_vae.util.memory`, :mod:`~pyro_vae.util.budget`), modules' running statistics
(:mod:`~pyro_vae.util.module_state`), torch.distributed (:mod:`~pyro_vae.util.distributed`) and
calling a user's code (:mod:`~pyro_vae.util.usercode`).
"""
