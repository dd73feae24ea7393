"""KL warm-up: the rate weight β as a function of the step, :class:`LinearWarmup`."""

from __future__ import annotations

from dataclasses import dataclass

from pyro_vae.infer.elbo import check_beta
from pyro_vae.util.errors import ConfigError


@dataclass(frozen=True)
class LinearWarmup:
    r"""KL warm-up: β rises linearly from ``start`` to ``end`` over ``steps`` steps, then stays.

    ``schedule(step)`` = start + (end − start) · min(step, steps) / steps for step = 0, 1, …;
    ``steps`` of ``None`` or 0 is the constant ``end``. Set ``estimator.beta = schedule(step)``
    before each step; any estimator accepts it (β = 0 is allowed).
    """

    steps: int | None = None
    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if self.steps is not None and (isinstance(self.steps, bool)
                                       or not isinstance(self.steps, int) or self.steps < 0):
            raise ConfigError(f"warm-up steps must be an integer >= 0 or None, got "
                              f"{self.steps!r}")
        check_beta(self.start, "warm-up start")
        check_beta(self.end, "warm-up end (beta)")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ConfigError(f"step must be >= 0, got {step}")
        if not self.steps:
            return float(self.end)
        fraction = min(step, self.steps) / self.steps
        return float(self.start + (self.end - self.start) * fraction)
