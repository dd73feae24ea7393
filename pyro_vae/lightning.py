"""Lightning for the package's pairs at a short name: ``pyro_vae.lightning.PairModule`` is
:class:`pyro_vae.train.lightning.PairModule`. The ``lightning`` package is imported when the
class is first used, and its absence is one line saying what to install."""

from __future__ import annotations

from typing import Any

from pyro_vae.train.lightning import INSTALL, require_lightning

__all__ = ["INSTALL", "PairModule", "require_lightning"]  # noqa: F822 (made on first use)


def __getattr__(name: str) -> Any:
    if name != "PairModule":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from pyro_vae.train.lightning import PairModule

    return PairModule
