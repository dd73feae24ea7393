"""One rank of the distributed tests: ``python distributed_worker.py SCENARIO OUT_DIR``.

tests/train/test_distributed.py starts one process per rank with torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``) and reads what each rank
saved under ``OUT_DIR``. The step fixture is shared with the test, which runs the single-process
reference on the combined batch.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from pathlib import Path

import pyro
import torch

from pyro_vae import ModelConfig, TrainConfig, fit
from pyro_vae.app.cli import main
from pyro_vae.data.images import fixed_binarization, load_digits
from pyro_vae.infer import make_estimator
from pyro_vae.models.vae import VAE
from pyro_vae.runs import evaluate_run
from pyro_vae.train import svi_step
from pyro_vae.util.distributed import (
    SINGLE,
    DistributedContext,
    average_gradients,
    init_distributed,
    main_first,
    shard_indices,
)

HALF_BATCH = 16
STEPS = 3
STEP_LR = 1e-2
COLLECTIVE_TIMEOUT_S = 120.0
HANG_TIMEOUT_S = 5.0
HANG_SLEEP_S = 120.0
FAIL_AT_STEP = 3
DRIFT_AT_STEP = 2
DRIFT_GRAD = 1.0
DRIFT_EPOCHS = 2
MAIN_FIRST_DELAY_S = 1.0
READY_POLL_S = 0.05
CONFIG = TrainConfig(
    epochs=2,
    batch_size=128,
    eval_particles=2,
    final_particles=10,
    device="cpu",
    model=ModelConfig(latent_dim=2, hidden=(16,)),
)
EVAL = dict(particles=30, limit=50, batch_size=8, particle_chunk=16, device="cpu")


def step_fixture() -> tuple[VAE, torch.Tensor, torch.optim.Optimizer]:
    """A small VAE (the same on every process), 2 × ``HALF_BATCH`` binary digits, and Adam."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(64, latent_dim=2, hidden=(16,))
    images = fixed_binarization(load_digits().train.images[: 2 * HALF_BATCH], seed=0)
    return vae, images, torch.optim.Adam(vae.parameters(), lr=STEP_LR)


def run_steps(
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    parts: list[tuple[int, torch.Tensor]],
    dist: DistributedContext = SINGLE,
) -> None:
    """``STEPS`` steps of :func:`svi_step` on the batch made of ``parts``; part ``key`` of step
    s draws its noise from seed ``1000 s + key``, so a datapoint sees the same ε whichever
    process holds it."""
    elbo = make_estimator("meanfield", max_plate_nesting=1)
    for step in range(STEPS):

        def loss_fn() -> torch.Tensor:
            total = torch.zeros(())
            for key, images in parts:
                torch.manual_seed(1000 * step + key)  # noqa: B023 (called at once)
                total = total + elbo.differentiable_loss(vae.model, vae.guide, images)
            return total

        svi_step(loss_fn, sum(images.shape[0] for _, images in parts), optimizer, dist)


def _main_scenario(dist: DistributedContext, out: Path) -> None:
    marker = out / "written by rank 0"
    with main_first(dist, "testing main_first"):
        if dist.is_main:
            time.sleep(MAIN_FIRST_DELAY_S)
            marker.touch()
        saw_marker = marker.exists()
    vae, images, optimizer = step_fixture()
    mine = images[dist.rank * HALF_BATCH : (dist.rank + 1) * HALF_BATCH]
    run_steps(vae, optimizer, [(dist.rank, mine)], dist)
    orders, shards = [], []

    def recording_shard_indices(order: torch.Tensor, context: DistributedContext) -> torch.Tensor:
        shard = shard_indices(order, context)
        orders.append(order.clone())
        shards.append(shard.clone())
        return shard

    # what fit() calls once per epoch: full epochs 1, 2; part epoch 1; resumed epoch 2
    _replace_in("pyro_vae.data.batches", "shard_indices", recording_shard_indices)
    full = fit(config=CONFIG, run_dir=out / "full", progress=False)
    fit(config=CONFIG.replace(epochs=1), run_dir=out / "part", progress=False)
    resumed = fit(config=CONFIG, run_dir=out / "part", resume=True, progress=False)
    result = evaluate_run(out / "full", out=out / "eval", **EVAL)
    torch.save(
        {
            "step": vae.state_dict(),
            "full": full.model.state_dict(),
            "resumed": resumed.model.state_dict(),
            "history": full.history.to_dict(),
            "resumed_history": resumed.history.to_dict(),
            "log_px": result.log_px,
            "elbo": result.elbo,
            "ess": result.ess,
            "khat": result.khat,
            "saw_marker": saw_marker,
            "orders": orders,
            "shards": shards,
        },
        out / f"rank{dist.rank}.pt",
    )


def _replace_in(module: str, name: str, fn) -> None:
    """Make the functions of ``module`` call ``fn`` for ``name``."""
    setattr(importlib.import_module(module), name, fn)


def _train_cli(out: Path, epochs: int, timeout_s: float) -> int:
    """``pyro-vae train`` of ``CONFIG``'s network and batch size into ``out / "run"``."""
    return main(
        [
            "train",
            "--epochs",
            str(epochs),
            "--batch-size",
            str(CONFIG.batch_size),
            "--latent-dim",
            str(CONFIG.model.latent_dim),
            "--hidden",
            ",".join(map(str, CONFIG.model.hidden)),
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(out / "run"),
            "--dist-timeout",
            f"{timeout_s:g}",
        ]
    )


def _wait_for_each_other(out: Path, rank: int, world_size: int) -> None:
    """A file barrier before joining, so that a slow start does not eat the short timeout."""
    (out / f"ready{rank}").touch()
    while not all((out / f"ready{other}").exists() for other in range(world_size)):
        time.sleep(READY_POLL_S)


def _failure_scenario(how: str, out: Path) -> int:
    """``pyro-vae train`` on every rank, where rank 1 hangs (``how="hang"``, sleeping past the
    timeout of ``HANG_TIMEOUT_S``) or dies (``how="kill"``, SIGKILL; timeout
    ``COLLECTIVE_TIMEOUT_S``) when it is about to average its ``FAIL_AT_STEP``-th gradients.
    Returns what the command line returns (the failing rank does not get that far)."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _wait_for_each_other(out, rank, world_size)
    if rank == 1:
        steps = []

        def average_gradients_then_fail(parameters, dist) -> None:
            steps.append(None)
            if len(steps) == FAIL_AT_STEP:
                print(f"rank 1: {how} at step {FAIL_AT_STEP}", flush=True)
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(HANG_SLEEP_S)
            average_gradients(parameters, dist)

        _replace_in("pyro_vae.train.step", "average_gradients", average_gradients_then_fail)
    return _train_cli(out, 3, HANG_TIMEOUT_S if how == "hang" else COLLECTIVE_TIMEOUT_S)


def _drift_scenario(out: Path) -> int:
    """``pyro-vae train`` on every rank, where rank 1 adds ``DRIFT_GRAD`` to one entry of its
    averaged gradients at its ``DRIFT_AT_STEP``-th step (a broken reduction): Adam then moves
    that one parameter value differently on rank 1, and the check after the first epoch must
    stop both ranks. Returns what the command line returns."""
    if int(os.environ["RANK"]) == 1:
        steps = []

        def average_gradients_then_drift(parameters, dist) -> None:
            parameters = list(parameters)
            average_gradients(parameters, dist)
            steps.append(None)
            if len(steps) == DRIFT_AT_STEP:
                grad = next(p.grad for p in parameters if p.grad is not None)
                grad.view(-1)[0] += DRIFT_GRAD

        _replace_in("pyro_vae.train.step", "average_gradients", average_gradients_then_drift)
    return _train_cli(out, DRIFT_EPOCHS, COLLECTIVE_TIMEOUT_S)


if __name__ == "__main__":
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    if scenario == "main":
        _main_scenario(init_distributed("cpu", COLLECTIVE_TIMEOUT_S), out_dir)
    elif scenario in ("hang", "kill"):
        sys.exit(_failure_scenario(scenario, out_dir))
    elif scenario == "drift":
        sys.exit(_drift_scenario(out_dir))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
