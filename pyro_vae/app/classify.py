r"""What a conditional VAE enables: generative classification, the marginal p(x), style transfer.

For every image x and every candidate label c the evaluator's importance-weighted estimate of the
CVAE's joint is

.. math::

    \log \hat p_K(x, c) = \log \hat p_K(x \mid c) + \log \pi_c ,

computed by encoding x under c. The classifier is :math:`\hat y = \arg\max_c \log \hat p_K(x, c)`,
the class posterior :math:`p(c \mid x) = \operatorname{softmax}_c \log \hat p_K(x, c)` and the
marginal :math:`\log \hat p(x) = \operatorname{logsumexp}_c \log \hat p_K(x, c)`, comparable with
a plain VAE's :math:`\log \hat p_K(x)` on the same images. Labels and particles are vectorized
together: each image is repeated once per label along the data plate, so there is no Python loop
over classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.models.cvae import CVAE
from pyro_vae.runs import EvalConfig
from pyro_vae.util.errors import ConfigError
from pyro_vae.util.io import write_json


@torch.no_grad()
def class_log_joint(
    model: CVAE,
    images: torch.Tensor,
    *,
    num_particles: int,
    batch_size: int = EvalConfig.batch_size,
    particle_chunk: int | None = EvalConfig.particle_chunk,
) -> torch.Tensor:
    """``[N, C]`` estimates log p̂_K(x_n, c) for every image and every label c."""
    if not getattr(model, "conditional", False):
        raise ConfigError(
            "generative classification needs a conditional model (pyro-vae train --model cvae)"
        )
    n, num_classes = images.shape[0], model.num_classes
    labels = torch.arange(num_classes, device=images.device).repeat(n)
    repeated = images.repeat_interleave(num_classes, dim=0)
    rows_per_batch = max(1, batch_size // num_classes) * num_classes
    result = evaluate_dataset(
        model.model,
        model.guide,
        (repeated, labels),
        num_particles=num_particles,
        batch_size=rows_per_batch,
        particle_chunk=particle_chunk,
        khat=False,
    )
    return result.log_px.reshape(n, num_classes)


@dataclass
class Classification:
    """Per-image class log-joints and what follows from them (all on the CPU)."""

    log_joint: torch.Tensor
    labels: torch.Tensor
    num_particles: int

    @property
    def num_classes(self) -> int:
        return self.log_joint.shape[1]

    @property
    def predicted(self) -> torch.Tensor:
        return self.log_joint.argmax(dim=1)

    @property
    def posterior(self) -> torch.Tensor:
        """p(y | x) for every image, ``[N, C]``."""
        return torch.softmax(self.log_joint, dim=1)

    @property
    def log_marginal(self) -> torch.Tensor:
        """log p̂(x) = logsumexp_c log p̂_K(x, c), ``[N]``."""
        return torch.logsumexp(self.log_joint, dim=1)

    @property
    def accuracy(self) -> float:
        return (self.predicted == self.labels).double().mean().item()

    def confusion_matrix(self) -> torch.Tensor:
        """``[C, C]`` counts: row = true label, column = predicted label."""
        c = self.num_classes
        return torch.bincount(self.labels * c + self.predicted, minlength=c * c).reshape(c, c)

    def per_class_accuracy(self) -> list[float | None]:
        matrix = self.confusion_matrix().double()
        totals = matrix.sum(1)
        return [
            (matrix[i, i] / totals[i]).item() if totals[i] > 0 else None
            for i in range(self.num_classes)
        ]

    def summary(self) -> dict[str, Any]:
        marginal = self.log_marginal.double()
        n = marginal.shape[0]
        return {
            "num_datapoints": n,
            "num_particles": self.num_particles,
            "accuracy": self.accuracy,
            "per_class_accuracy": self.per_class_accuracy(),
            "confusion_matrix": self.confusion_matrix().tolist(),
            "log_px": {
                "mean": marginal.mean().item(),
                "stderr": (marginal.std() / n**0.5).item() if n > 1 else None,
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary and, per image: true and predicted label, p(y | x) (``posterior``),
        log p̂_K(x, y) for every y (``log_joint``) and log p̂(x) (``log_px``)."""
        return {
            "summary": self.summary(),
            "labels": self.labels.tolist(),
            "predicted": self.predicted.tolist(),
            "posterior": self.posterior.tolist(),
            "log_joint": self.log_joint.tolist(),
            "log_px": self.log_marginal.tolist(),
        }


def classify(
    model: CVAE,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_particles: int,
    batch_size: int = EvalConfig.batch_size,
    particle_chunk: int | None = EvalConfig.particle_chunk,
) -> Classification:
    """Classify ``images`` by ŷ = argmax_c log p̂_K(x, c) and score against ``labels``."""
    model.check_labels(labels, images.shape[0])
    log_joint = class_log_joint(
        model,
        images,
        num_particles=num_particles,
        batch_size=batch_size,
        particle_chunk=particle_chunk,
    )
    return Classification(log_joint.cpu(), labels.cpu(), num_particles)


def format_classification(summary: dict[str, Any]) -> str:
    c = len(summary["per_class_accuracy"])
    lines = [
        f"{summary['num_datapoints']} images, K = {summary['num_particles']} particles per label",
        f"accuracy {summary['accuracy']:.2%}",
        f"log p(x) = logsumexp_y log p_K(x, y): {summary['log_px']['mean']:.4f}"
        + ("" if summary["log_px"]["stderr"] is None else f" ± {summary['log_px']['stderr']:.4f}")
        + " nats",
        "per-class accuracy: "
        + ", ".join(
            f"{i}: {'n/a' if a is None else f'{a:.0%}'}"
            for i, a in enumerate(summary["per_class_accuracy"])
        ),
        "confusion matrix (rows: true label, columns: predicted)",
        "      " + "".join(f"{j:>6}" for j in range(c)),
    ]
    for i, row in enumerate(summary["confusion_matrix"]):
        lines.append(f"{i:>6}" + "".join(f"{v:>6}" for v in row))
    return "\n".join(lines)


def plot_confusion(matrix: torch.Tensor, path: str | Path) -> Path:
    from pyro_vae.runs.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, label="images")
    c = matrix.shape[0]
    dark = matrix.max().item() / 2  # white counts on the darker half of the colour scale
    for i in range(c):
        for j in range(c):
            ax.text(
                j,
                i,
                int(matrix[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if matrix[i, j] > dark else "black",
            )
    ax.set_xticks(range(c))
    ax.set_yticks(range(c))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title("generative classification")
    return save_figure(fig, path)


def save_classification(
    result: Classification, folder: str | Path, split: str, metadata: dict | None = None
) -> dict[str, Path]:
    """Write ``classify-<split>.json`` (``metadata``'s entries first, such as the checkpoint's
    epoch) and ``confusion-<split>.png`` into ``folder``."""
    folder = Path(folder)
    paths = {
        "json": folder / f"classify-{split}.json",
        "confusion": folder / f"confusion-{split}.png",
    }
    write_json(paths["json"], {**(metadata or {}), **result.to_dict()})
    plot_confusion(result.confusion_matrix(), paths["confusion"])
    return paths
