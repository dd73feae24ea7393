"""The rate–distortion diagnostics of a run's evaluation: its pair on the evaluated data
(:func:`pyro_vae.evaluate.rate_distortion.rate_distortion`) and, for the package's VAEs on
images, the prior draws that fell into holes of the aggregate posterior, decoded."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pyro_vae.core.protocol import data_plate_name
from pyro_vae.evaluate.rate_distortion import (
    RateDistortion,
    RateDistortionOptions,
    rate_distortion,
)

#: at most this many decoded prior holes in the figure
MAX_HOLE_IMAGES = 64
LATENT_SITE = "z"


def holes_file(label: str) -> str:
    """The file name of the decoded prior holes of an evaluation labelled ``label``."""
    return f"holes-{label}.png"


def run_rate_distortion(
    run: Any, source: Any, options: RateDistortionOptions, batch_size: int, chunk: int, seed: int
) -> RateDistortion:
    """:func:`rate_distortion` of the run's pair on ``source`` with ``options``, batches of
    ``batch_size``, particle chunks of ``chunk`` and ``seed`` (on a fork of the random state;
    the caller holds the param-store scope and the validation setting)."""
    return rate_distortion(
        run.model.model,
        run.model.guide,
        source,
        batch_size=batch_size,
        particle_chunk=chunk,
        data_plate=data_plate_name(run.model),
        seed=seed,
        **asdict(options),
    )


def _decodable(run: Any, codes: dict[str, torch.Tensor] | None) -> bool:
    """Whether the hole codes are images of the run: a pair of the package's families on the
    built-in images with one latent site ``z`` decoded by ``observation_mean(decoder(z))``."""
    model = run.model
    return (
        codes is not None
        and set(codes) == {LATENT_SITE}
        and codes[LATENT_SITE].shape[0] > 0
        and run.dataset is not None
        and not getattr(model, "conditional", False)
        and callable(getattr(model, "observation_mean", None))
        and isinstance(getattr(model, "decoder", None), torch.nn.Module)
        and codes[LATENT_SITE].dim() == 2
    )


def holes_figure(run: Any, result: RateDistortion, label: str) -> dict[str, Any]:
    """The ``figures`` entry of :func:`~pyro_vae.evaluate.save_evaluation` for the decoded
    prior holes (the first :data:`MAX_HOLE_IMAGES`), or none where they are not images."""
    surgery = result.surgery
    codes = None if surgery is None else surgery.hole_codes
    if not _decodable(run, codes):
        return {}
    import matplotlib.pyplot as plt

    from pyro_vae.runs.plots import DPI, plot_grid

    model = run.model
    z = codes[LATENT_SITE][:MAX_HOLE_IMAGES]
    param = next(model.parameters())
    with torch.no_grad():
        images = model.observation_mean(model.decoder(z.to(param.device, param.dtype))).cpu()
    ncols = max(1, int(round(len(images) ** 0.5)))
    title = (
        f"{len(images)} of {codes[LATENT_SITE].shape[0]} prior draws in holes "
        f"(log q(z) below percentile {surgery.hole_percentile:g})"
    )

    def write(path: Path) -> None:
        figure = plot_grid(images, run.dataset.image_shape, ncols, title)
        figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight")
        plt.close(figure)

    return {"holes": (holes_file(label), write)}
