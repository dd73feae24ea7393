"""PNG figures of a run: prior samples, reconstructions, the latent space and training curves.

Figures are drawn with matplotlib's Agg backend (no display needed) and saved atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pyro_vae.util.errors import ConfigError
from pyro_vae.util.io import atomic_path

if TYPE_CHECKING:
    from pyro_vae.data.images import Dataset
    from pyro_vae.models.vae import VAE
    from pyro_vae.runs import History

SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
LATENT_PNG = "latent.png"
CURVES_PNG = "curves.png"
NUM_RECONSTRUCTIONS = 16


DPI = 120
#: inches per image of a grid, and the smallest side of a grid's figure
INCHES_PER_IMAGE, MIN_INCHES = 0.5, 3.0
#: pixels matplotlib's Agg canvas may have on a side
MAX_SIDE_PIXELS = 2**16 - 1
#: bytes per pixel of a grid's figure while it is drawn and saved (the RGBA canvas, the image
#: resampled in floating point, the PNG encoder's copy): about 23 measured, with a margin
FIGURE_BYTES_PER_PIXEL = 32


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def image_grid(
    images: torch.Tensor, image_shape: Sequence[int], ncols: int, pad: int = 1
) -> np.ndarray:
    """Tile ``images`` ``[N, H*W]`` into one ``[rows*(H+pad), ncols*(W+pad)]`` array."""
    h, w = image_shape
    images = images.detach().cpu().reshape(-1, h, w).numpy()
    rows = -(-len(images) // ncols)
    grid = np.ones((rows * (h + pad) - pad, ncols * (w + pad) - pad), dtype=np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = image
    return grid


def _figsize(nrows: int, ncols: int) -> tuple[float, float]:
    return (max(MIN_INCHES, INCHES_PER_IMAGE * ncols), max(MIN_INCHES, INCHES_PER_IMAGE * nrows))


def grid_bytes(nrows: int, ncols: int, image_shape: Sequence[int], what: str) -> float:
    """The memory a grid of ``nrows × ncols`` images takes to draw and save (the tiled array
    and the figure's pixels); a figure wider or taller than matplotlib can draw is refused
    (:class:`~pyro_vae.util.errors.ConfigError` naming ``what``)."""
    width, height = (round(side * DPI) for side in _figsize(nrows, ncols))
    if max(width, height) > MAX_SIDE_PIXELS:
        raise ConfigError(
            f"{what} would be a figure of {width:,} × {height:,} pixels, more "
            f"than the {MAX_SIDE_PIXELS:,} a side may have: ask for fewer images"
        )
    h, w = image_shape
    return nrows * (h + 1) * ncols * (w + 1) * 4 + width * height * FIGURE_BYTES_PER_PIXEL


def label_rows_layout(per_label: int, max_cols: int = 16) -> tuple[int, int]:
    """``(rows per label, columns)`` of :func:`plot_label_rows`."""
    rows_per_label = -(-per_label // max_cols)
    return rows_per_label, -(-per_label // rows_per_label)


def plot_grid(
    images: torch.Tensor,
    image_shape: Sequence[int],
    ncols: int,
    title: str,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
) -> plt.Figure:
    grid = image_grid(images, image_shape, ncols)
    fig, ax = plt.subplots(figsize=_figsize(-(-len(images) // ncols), ncols))
    ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title)
    h, w = image_shape
    if row_labels is not None:
        ax.set_yticks([(h + 1) * i + h / 2 - 0.5 for i in range(len(row_labels))], row_labels)
    else:
        ax.set_yticks([])
    if col_labels is not None:
        ax.set_xticks([(w + 1) * i + w / 2 - 0.5 for i in range(len(col_labels))], col_labels)
    else:
        ax.set_xticks([])
    return fig


def plot_label_rows(
    images: torch.Tensor,
    labels: Sequence[int],
    per_label: int,
    image_shape: Sequence[int],
    title: str,
    max_cols: int = 16,
) -> plt.Figure:
    """A grid of ``per_label`` images for each of ``labels`` (``images`` label-major), one row
    per label, each row tick naming its label. More than ``max_cols`` images per label wrap
    onto several equal rows (all ticked with the label), so one label of 64 images is a 4 × 16
    block rather than a single row of 64."""
    rows_per_label, ncols = label_rows_layout(per_label, max_cols)
    h, w = image_shape
    blank = images.new_zeros(rows_per_label * ncols - per_label, images.shape[-1])
    blocks = [
        torch.cat([images[i * per_label : (i + 1) * per_label], blank]) for i in range(len(labels))
    ]
    row_labels = [str(label) for label in labels for _ in range(rows_per_label)]
    return plot_grid(torch.cat(blocks), (h, w), ncols, title, row_labels=row_labels)


def plot_reconstructions(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    image_shape: Sequence[int],
    inputs: torch.Tensor | None = None,
) -> plt.Figure:
    """Test images above their reconstructions (decoder mean at the guide mean); with
    ``inputs`` (the binarized images the model was given, when they differ from the
    originals) a row of them between the two, each row named by its tick."""
    rows = [("test images", originals)]
    if inputs is not None and not torch.equal(inputs, originals):
        rows.append(("binarized inputs", inputs))
    rows.append(("reconstructions", reconstructions))
    return plot_grid(
        torch.cat([images for _, images in rows]),
        image_shape,
        ncols=originals.shape[0],
        row_labels=[name for name, _ in rows],
        title=", ".join(name for name, _ in rows) + " (top to bottom)",
    )


def project_2d(points: torch.Tensor) -> tuple[np.ndarray, str]:
    """The points themselves if 2-D, otherwise their projection on the first two principal axes."""
    points = points.detach().cpu().double()
    if points.shape[1] == 1:
        return torch.cat([points, torch.zeros_like(points)], 1).numpy(), "z"
    if points.shape[1] == 2:
        return points.numpy(), "z"
    centred = points - points.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ v[:2].T).numpy(), "PCA of z"


def plot_latent(locs: torch.Tensor, labels: torch.Tensor) -> plt.Figure:
    """Guide means of the test set coloured by label (the aggregate posterior's clusters)."""
    xy, axis = project_2d(locs)
    labels = labels.detach().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    colours = plt.get_cmap("tab10" if labels.max(initial=0) < 10 else "tab20")
    for label in np.unique(labels):  # one colour per label, named in a legend
        chosen = labels == label
        ax.scatter(
            xy[chosen, 0],
            xy[chosen, 1],
            color=colours(int(label) % colours.N),
            s=6,
            alpha=0.8,
            label=str(label),
        )
    ax.legend(
        title="label", markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
    )
    ax.set_xlabel(f"{axis} 1")
    ax.set_ylabel(f"{axis} 2")
    ax.set_title("latent means of the test set")
    return fig


def plot_curves(history: History) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history.epoch, [-v for v in history.train_loss], label="train ELBO (estimator)")
    if len(history.test_elbo) == len(history.epoch):
        ax.plot(history.epoch, history.test_elbo, label="test ELBO")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def write_run_plots(
    run_dir: str | Path,
    model: VAE,
    dataset: Dataset | None,
    history: History,
    test_images: torch.Tensor | None,
    seed: int = 0,
) -> list[Path]:
    """Write samples, reconstructions, latent and curves PNGs into ``run_dir`` (only the curves
    for a model without ``sample``, ``encode`` and ``reconstruct`` methods, or for data that
    are not the built-in images: ``dataset=None``)."""
    run_dir = Path(run_dir)
    if (
        dataset is None
        or test_images is None
        or not all(
            callable(getattr(model, name, None)) for name in ("sample", "encode", "reconstruct")
        )
    ):
        return [save_figure(plot_curves(history), run_dir / CURVES_PNG)]
    generator = torch.Generator(device=test_images.device).manual_seed(seed)
    labels = dataset.test.labels
    inputs = test_images[:NUM_RECONSTRUCTIONS]
    originals = dataset.test.images[:NUM_RECONSTRUCTIONS].to(inputs)
    if getattr(model, "conditional", False):
        classes = torch.arange(model.num_classes, device=labels.device)
        samples = model.sample(
            8 * model.num_classes, generator=generator, labels=classes.repeat_interleave(8)
        )
        samples_fig = plot_label_rows(
            samples,
            range(model.num_classes),
            8,
            dataset.image_shape,
            "samples per label (decoder mean)",
        )
        locs, _ = model.encode(test_images, labels)
        recon = model.reconstruct(inputs, labels[:NUM_RECONSTRUCTIONS])
    else:
        samples = model.sample(64, generator=generator)
        samples_fig = plot_grid(
            samples, dataset.image_shape, 8, "samples from the prior (decoder mean)"
        )
        locs, _ = model.encode(test_images)
        recon = model.reconstruct(inputs)
    return [
        save_figure(samples_fig, run_dir / SAMPLES_PNG),
        save_figure(
            plot_reconstructions(originals, recon, dataset.image_shape, inputs),
            run_dir / RECONSTRUCTIONS_PNG,
        ),
        save_figure(plot_latent(locs, labels), run_dir / LATENT_PNG),
        save_figure(plot_curves(history), run_dir / CURVES_PNG),
    ]
