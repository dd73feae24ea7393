"""Small Lightning runs of the package's pairs, shared by tests/train/test_lightning.py and its
two-process runs: ``python lightning_runs.py OUT_DIR [fa|vae]`` trains the factor-analysis pair
(``fa``, the default) or the built-in VAE on digits (``vae``) with ``Trainer(devices=2,
strategy="ddp", accelerator="cpu")`` (Lightning starts the second rank by running this script
again); each rank saves its trained weights (``pair0.pt``, ``pair1.pt``) and rank 0 the logged
losses (``losses.json``) in ``OUT_DIR``."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader, TensorDataset
from user_models import FactorAnalysis, fa_data

from pyro_vae.lightning import PairModule

FA_TRAIN, FA_TEST = 400, 100
#: the estimator, epochs, batch size (one process) and learning rate of every factor-analysis run
FA_RUN = dict(elbo="iwae", importance_samples=5, epochs=30, batch_size=100, lr=0.05)
SEED = 0


def fa_split() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(fa_data(FA_TRAIN + FA_TEST))
    return x[:FA_TRAIN], x[FA_TRAIN:]


class EpochMetrics(lightning.Callback):
    """What the module logged, epoch by epoch (``train_loss``, ``beta``, ``val_log_px``, ...)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, module) -> None:
        self.rows.append({name: float(v) for name, v in trainer.callback_metrics.items()})

    def __getitem__(self, name: str) -> list[float]:
        return [row[name] for row in self.rows]


def train(
    pair: torch.nn.Module,
    data: torch.Tensor,
    epochs: int,
    batch_size: int,
    devices: int = 1,
    strategy: str = "auto",
    val_data: torch.Tensor | None = None,
    callbacks: tuple = (),
    **module_options,
) -> tuple[PairModule, EpochMetrics]:
    """``pair`` trained by a CPU Trainer on shuffled batches of ``data`` (per process)."""
    module = PairModule(pair, **module_options)
    metrics = EpochMetrics()
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_checkpointing=any(
            isinstance(c, lightning.pytorch.callbacks.ModelCheckpoint) for c in callbacks
        ),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[metrics, *callbacks],
    )
    val = None if val_data is None else DataLoader(TensorDataset(val_data), batch_size=batch_size)
    with warnings.catch_warnings():  # a run without held-out data has no validation
        warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no")
        trainer.fit(
            module, DataLoader(TensorDataset(data), batch_size=batch_size, shuffle=True), val
        )
    return module, metrics


def train_fa(
    devices: int = 1, strategy: str = "auto", seed: int = SEED
) -> tuple[PairModule, EpochMetrics]:
    """The factor-analysis pair trained as :data:`FA_RUN` says, the batch shared out among
    ``devices`` processes (each takes batch_size / devices per step)."""
    lightning.seed_everything(seed, verbose=False)
    options = dict(FA_RUN)
    epochs, batch_size = options.pop("epochs"), options.pop("batch_size")
    return train(
        FactorAnalysis(), fa_split()[0], epochs, batch_size // devices, devices, strategy, **options
    )


#: the built-in VAE's runs: its size, images (train, held out), epochs, batch size, learning rate
VAE_RUN = dict(latent_dim=2, hidden=(32,), train=400, test=100, epochs=8, batch_size=100, lr=0.03)


def vae_split() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits binarized once, with a fixed seed: the training and the held-out images."""
    from pyro_vae import load_digits

    count = VAE_RUN["train"] + VAE_RUN["test"]
    images = load_digits().train.images[:count]
    binary = torch.bernoulli(images, generator=torch.Generator().manual_seed(SEED))
    return binary[: VAE_RUN["train"]], binary[VAE_RUN["train"] :]


def make_vae() -> torch.nn.Module:
    from pyro_vae import VAE

    return VAE(64, latent_dim=VAE_RUN["latent_dim"], hidden=VAE_RUN["hidden"])


def train_vae(
    devices: int = 1, strategy: str = "auto", seed: int = SEED
) -> tuple[PairModule, EpochMetrics]:
    """The built-in VAE trained as :data:`VAE_RUN` says (meanfield), the batch shared out among
    ``devices`` processes."""
    lightning.seed_everything(seed, verbose=False)
    batch_size = VAE_RUN["batch_size"] // devices
    return train(
        make_vae(),
        vae_split()[0],
        VAE_RUN["epochs"],
        batch_size,
        devices,
        strategy,
        lr=VAE_RUN["lr"],
    )


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run = train_vae if sys.argv[2:] == ["vae"] else train_fa
    module, metrics = run(devices=2, strategy="ddp")
    torch.save(module.pair.state_dict(), out / f"pair{module.global_rank}.pt")
    if module.global_rank == 0:
        (out / "losses.json").write_text(json.dumps(metrics["train_loss"]))
