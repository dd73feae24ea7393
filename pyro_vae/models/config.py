"""The model side's defaults: the families' architecture (:class:`ModelConfig`) and the names
the command line and the training config check against. It imports no estimator; the training
run's config, which names one, is :class:`pyro_vae.train.TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from pyro_vae.util.errors import ConfigError, check_count

DATASETS = ("digits", "mnist")
BINARIZATIONS = ("dynamic", "fixed", "none")
DEVICES = ("auto", "cpu", "cuda")
SCALE_FNS = ("softplus", "exp")
MODEL_FAMILIES = ("vae", "cvae", "vae2", "vampprior")
LIKELIHOODS = ("bernoulli", "gaussian")
GUIDES = ("diagonal", "full")
ACTIVATION_NAMES = ("softplus", "tanh", "relu")
SEED_LIMIT = 2**32


def check_seed(seed: int) -> int:
    """``seed`` if torch, numpy and Python's ``random`` all accept it (0 ≤ seed < 2³²)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"seed must be a whole number in 0..{SEED_LIMIT - 1}, got {seed!r}")
    return seed


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a model family (:func:`pyro_vae.train.build_model`).

    ``family``: ``"vae"``, ``"cvae"`` (conditioned on the label), ``"vae2"`` (two stochastic
    layers) or ``"vampprior"`` (the prior a mixture of the guide at ``pseudo_inputs`` learned
    inputs). ``hidden`` lists the widths of the encoder's hidden layers; the decoder mirrors them.
    ``likelihood``: ``"bernoulli"`` (binary pixels) or ``"gaussian"`` with a fixed standard
    deviation ``obs_scale`` or, with ``obs_scale=None``, a learned one shared by all pixels.
    ``guide``: ``"diagonal"`` or ``"full"`` covariance. ``scale_fn`` maps raw encoder outputs to
    standard deviations. ``latent2_dim`` and ``hidden2`` size the second stochastic layer of
    ``vae2`` (z1 → z2).
    """

    family: str = "vae"
    latent_dim: int = 8
    hidden: tuple[int, ...] = (128,)
    scale_fn: str = "softplus"
    likelihood: str = "bernoulli"
    obs_scale: float | None = None
    guide: str = "diagonal"
    activation: str = "softplus"
    latent2_dim: int = 4
    hidden2: tuple[int, ...] = (64,)
    pseudo_inputs: int = 500

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        object.__setattr__(self, "hidden2", tuple(int(h) for h in self.hidden2))
        checks = [
            (
                self.family in MODEL_FAMILIES,
                f"model must be one of {MODEL_FAMILIES}, got {self.family!r}",
            ),
            (self.latent_dim >= 1, f"latent_dim must be >= 1, got {self.latent_dim}"),
            (self.latent2_dim >= 1, f"latent2_dim must be >= 1, got {self.latent2_dim}"),
            (
                all(h >= 1 for h in self.hidden + self.hidden2),
                "hidden layer sizes must be >= 1, got "
                f"{list(self.hidden)} and {list(self.hidden2)}",
            ),
            (
                self.scale_fn in SCALE_FNS,
                f"scale_fn must be one of {SCALE_FNS}, got {self.scale_fn!r}",
            ),
            (
                self.likelihood in LIKELIHOODS,
                f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}",
            ),
            (self.guide in GUIDES, f"guide must be one of {GUIDES}, got {self.guide!r}"),
            (
                self.activation in ACTIVATION_NAMES,
                f"activation must be one of {ACTIVATION_NAMES}, got {self.activation!r}",
            ),
            (
                self.obs_scale is None or self.obs_scale > 0,
                f"obs_scale must be > 0 (or None to learn it), got {self.obs_scale}",
            ),
            (
                self.obs_scale is None or self.likelihood == "gaussian",
                "obs_scale is the Gaussian likelihood's standard deviation: it needs "
                'likelihood="gaussian"',
            ),
            (
                self.family != "vae2" or self.guide == "diagonal",
                'the two-layer vae2 has diagonal Gaussian layers only: use guide="diagonal"',
            ),
            (
                self.family != "vampprior" or self.guide == "diagonal",
                'the vampprior\'s prior mixes diagonal Gaussians: use guide="diagonal"',
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        check_count("pseudo_inputs", self.pseudo_inputs)
