"""Training throughput of 1 vs several data-parallel processes (CPU/gloo or GPU/NCCL), in one run.

Each configuration trains the same VAE with :func:`pyro_vae.fit` (no run folder, no final
estimate) in freshly started processes that get torchrun's environment variables
(``MASTER_ADDR=127.0.0.1``, a free port), ``--threads`` intra-op threads each. With
``--device cpu`` (the default) the processes use gloo; with ``--device cuda`` they use NCCL and
process r the GPU ``cuda:r`` (``LOCAL_RANK``), so ``--world-size N`` needs N visible GPUs and
``--world-size 1`` times one GPU alone. The epochs' own
wall-clock seconds (``History.seconds``: the SVI steps, the gradient all-reduces and the sharded
per-epoch test ELBO, without start-up) are read back from rank 0; the first ``--warmup-epochs``
are dropped. Configurations:

``W=1``
    one process, ``--batch-size`` B per step;
``W=N, same per-rank batch``
    N processes with B each (effective batch N·B, 1/N of the steps per epoch on each rank);
``W=N, same effective batch``
    N processes with B/N each: the same number of steps per epoch and the same effective batch
    as one process, the fair comparison for optimization.

Rounds interleave the configurations so that they share the machine's noise; the median over
``--rounds`` is reported, with the ratio to ``W=1`` (``--world-size 1`` runs ``W=1`` alone).

``--compare-ddp`` measures something else: the cost of a training step with the package's
gradient averaging (:func:`pyro_vae.train.svi_step`: backward, then one flattened all-reduce)
against :class:`~torch.nn.parallel.DistributedDataParallel` wrapping the same networks (a module
whose ``forward`` returns the step's loss; DDP all-reduces gradient buckets while the backward
pass runs). Both run in the same N processes on the same batches and noise, in interleaved
blocks of ``--steps`` steps after a warm-up block each; the median milliseconds per step over
``--rounds`` blocks are printed with their ratio, and the largest difference between the two
copies' parameters at the end (they take the same steps up to float rounding). ``--device``
applies to it as well.

    python benchmarks/bench_distributed.py                      # digits, W = 1 vs 2
    python benchmarks/bench_distributed.py --world-size 4 --epochs 10 --out bench.json
    python benchmarks/bench_distributed.py --compare-ddp --dataset mnist --data-dir DIR
    python benchmarks/bench_distributed.py --device cuda --world-size 1   # one GPU alone
    python benchmarks/bench_distributed.py --device cuda                  # 1 vs 2 GPUs
    python benchmarks/bench_distributed.py --device cuda --compare-ddp    # 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORKER_FLAG = "--worker"
RESULT_PREFIX = "RESULT "
LAUNCH_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(raw: str) -> None:
    """One rank: train and, on rank 0, print the epochs' seconds."""
    import torch

    from pyro_vae import RunOptions, TrainConfig, fit
    from pyro_vae.util.distributed import current_context

    spec = json.loads(raw)
    torch.set_num_threads(spec["threads"])
    if spec.get("mode") == "ddp":
        _ddp_worker(spec)
        return
    config = TrainConfig(
        dataset=spec["dataset"],
        data_dir=spec["data_dir"],
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        final_particles=0,
        device=spec["device"],
    )
    result = fit(config=config, options=RunOptions(progress=False, dist_timeout=LAUNCH_TIMEOUT_S))
    if current_context().is_main:
        print(
            RESULT_PREFIX
            + json.dumps(
                {"seconds": result.history.seconds, "train_loss": result.history.train_loss}
            ),
            flush=True,
        )


def _ddp_worker(spec: dict[str, Any]) -> None:
    """One rank of ``--compare-ddp``: time the package's step and DDP's, alternately. On CUDA each
    block ends with :func:`torch.cuda.synchronize`, so that it times the GPU's work, not the
    queueing of it."""
    import copy

    import torch
    from torch.nn.parallel import DistributedDataParallel

    from pyro_vae import TrainConfig
    from pyro_vae.data.builtin import build_model
    from pyro_vae.data.images import fixed_binarization, load_dataset
    from pyro_vae.infer import make_estimator
    from pyro_vae.train import make_optimizer, svi_step
    from pyro_vae.train.fused import training_loss
    from pyro_vae.util.distributed import all_gather_objects, barrier, init_distributed

    cuda = spec["device"] == "cuda"
    dist = init_distributed(spec["device"], LAUNCH_TIMEOUT_S)  # CUDA: selects cuda:LOCAL_RANK
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    config = TrainConfig(dataset=spec["dataset"], data_dir=spec["data_dir"], device=spec["device"])
    dataset = load_dataset(config.dataset, config.data_dir)
    images = fixed_binarization(dataset.train.images, config.seed).to(device)
    batch, world = spec["batch_size"], dist.world_size
    torch.manual_seed(config.seed)
    ours = build_model(dataset, config)
    ours.initialize_from_data(dataset.train.images)
    ours.to(device)
    theirs = copy.deepcopy(ours)
    elbo = make_estimator("meanfield", max_plate_nesting=1)

    class StepLoss(torch.nn.Module):
        """The mean loss of a batch as a module's forward, which is what DDP wraps."""

        def __init__(self, vae: torch.nn.Module):
            super().__init__()
            self.vae = vae
            self.loss = training_loss(vae, elbo)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.loss(x) / x.shape[0]

    ddp = DistributedDataParallel(StepLoss(theirs), device_ids=[device] if cuda else None)
    optimizers = {
        "ours": make_optimizer(ours.parameters(), config.lr),
        "ddp": make_optimizer(theirs.parameters(), config.lr),
    }
    done = {"ours": 0, "ddp": 0}
    loss_ours = training_loss(ours, elbo)

    def step(name: str) -> None:
        index = (done[name] * world + dist.rank) * batch % (images.shape[0] - batch)
        x = images[index : index + batch]
        torch.manual_seed(config.seed + done[name] * world + dist.rank)
        if name == "ours":
            svi_step(lambda: loss_ours(x), batch, optimizers[name], dist)
        else:
            optimizers[name].zero_grad(set_to_none=True)
            ddp(x).backward()
            optimizers[name].step()
        done[name] += 1

    def synchronize() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def block(name: str, steps: int) -> float:
        synchronize()
        barrier(dist, "starting a block")
        start = time.perf_counter()
        for _ in range(steps):
            step(name)
        synchronize()
        barrier(dist, "ending a block")
        return (time.perf_counter() - start) / steps

    times: dict[str, list[float]] = {"ours": [], "ddp": []}
    for name in times:
        block(name, spec["warmup_steps"])
    for round_index in range(spec["rounds"]):
        for name in ("ours", "ddp") if round_index % 2 == 0 else ("ddp", "ours"):
            times[name].append(block(name, spec["steps"]))
    gap = max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters()))
    gaps = all_gather_objects(gap, dist, "gathering the parameter differences")
    if dist.is_main:
        print(
            RESULT_PREFIX
            + json.dumps(
                {
                    "seconds_per_step": times,
                    "max_param_diff": max(gaps),
                    "steps_each": done["ours"],
                    "num_params": sum(p.numel() for p in ours.parameters()),
                }
            ),
            flush=True,
        )


def _launch(world_size: int, spec: dict[str, Any]) -> dict[str, Any]:
    port = str(_free_port())
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    processes = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(spec["threads"])}
        if world_size > 1:
            env.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
            )
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, WORKER_FLAG, json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                text=True,
            )
        )
    try:
        output, _ = processes[0].communicate(timeout=LAUNCH_TIMEOUT_S)
        codes = [process.wait(timeout=LAUNCH_TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    if codes != [0] * world_size:
        raise SystemExit(f"a rank failed (exit codes {codes})")
    line = next(line for line in output.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX) :])


def _processes(args: argparse.Namespace) -> str:
    """How the processes run, for the header: backend and GPU model, or threads and cores."""
    if args.device == "cuda":
        import torch

        return f"processes on a {torch.cuda.get_device_name(0)} GPU each (nccl)"
    return f"processes with {args.threads} thread(s) each (gloo), {os.cpu_count()} CPU cores"


def _compare_ddp(args: argparse.Namespace) -> int:
    spec = {
        "mode": "ddp",
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "rounds": args.rounds,
        "device": args.device,
    }
    result = _launch(args.world_size, spec)
    ours, ddp = (statistics.median(result["seconds_per_step"][name]) for name in ("ours", "ddp"))
    print(
        f"{args.dataset}: W={args.world_size} {_processes(args)}, B={args.batch_size} per rank, "
        f"{result['num_params']} parameters, median of {args.rounds} blocks of {args.steps} "
        f"steps, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'gradient reduction':<44}{'ms/step':>10}{'blocks':>16}{'ratio':>8}")
    for label, name, median in (
        ("svi_step + average_gradients (package)", "ours", ours),
        ("DistributedDataParallel, same networks", "ddp", ddp),
    ):
        blocks = result["seconds_per_step"][name]
        spread = f"{1e3 * min(blocks):.2f}-{1e3 * max(blocks):.2f}"
        print(f"{label:<44}{1e3 * median:>10.2f}{spread:>16}{median / ours:>8.2f}")
    print(
        f"after {result['steps_each']} steps each, the two copies' parameters differ by at most "
        f"{result['max_param_diff']:.2e}"
    )
    if args.out is not None:
        from pyro_vae.util.io import write_json

        write_json(
            args.out,
            {
                **spec,
                "world_size": args.world_size,
                "machine": platform.platform(),
                "cpu_count": os.cpu_count(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                **result,
            },
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--data-dir", help="folder with the MNIST IDX files")
    parser.add_argument("--world-size", type=int, default=2, help="N processes (default 2)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cpu: gloo (default); cuda: NCCL, one GPU per process",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="B of one process (default 64)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument(
        "--compare-ddp",
        action="store_true",
        help="time a step of the package's gradient averaging against "
        "DistributedDataParallel instead",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=200,
        help="steps per timed block of --compare-ddp (default 200)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=50,
        help="untimed steps of each approach before the first block (default 50)",
    )
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup_epochs:
        parser.error("--epochs must exceed --warmup-epochs")
    if (
        min(args.world_size, args.batch_size, args.rounds, args.threads, args.steps) < 1
        or args.warmup_steps < 0
    ):
        parser.error(
            "--world-size, --batch-size, --rounds, --threads and --steps must be >= 1, "
            "--warmup-steps >= 0"
        )
    if args.compare_ddp and args.world_size < 2:
        parser.error("--compare-ddp needs --world-size >= 2")
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < args.world_size:
            parser.error(
                f"--device cuda runs each process on a GPU of its own: --world-size "
                f"{args.world_size} needs {args.world_size} CUDA GPU(s), "
                f"{gpus} visible here"
            )
    from pyro_vae.data.images import load_dataset
    from pyro_vae.util.errors import PyroVAEError

    try:
        num_train = len(load_dataset(args.dataset, args.data_dir).train)
    except PyroVAEError as exc:
        parser.error(str(exc))
    if args.compare_ddp:
        return _compare_ddp(args)
    n = args.world_size
    configs = {f"W=1, B={args.batch_size}": (1, args.batch_size)}
    if n > 1:
        configs.update(
            {
                f"W={n}, B={args.batch_size} per rank (effective {n * args.batch_size})": (
                    n,
                    args.batch_size,
                ),
                f"W={n}, B={args.batch_size // n} per rank (effective {args.batch_size})": (
                    n,
                    max(1, args.batch_size // n),
                ),
            }
        )
    epochs_per_s: dict[str, list[float]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        names = list(configs)
        names = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in names:
            world_size, batch_size = configs[name]
            spec = {
                "dataset": args.dataset,
                "data_dir": args.data_dir,
                "epochs": args.epochs,
                "batch_size": batch_size,
                "threads": args.threads,
                "device": args.device,
            }
            seconds = _launch(world_size, spec)["seconds"][args.warmup_epochs :]
            epochs_per_s[name].append(len(seconds) / sum(seconds))
    baseline = statistics.median(epochs_per_s[next(iter(configs))])
    rows = []
    print(
        f"{args.dataset}: {num_train} training images, {args.epochs - args.warmup_epochs} timed "
        f"epochs, median of {args.rounds} rounds, {_processes(args)}, load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    print(f"{'configuration':<44}{'epochs/s':>10}{'images/s':>11}{'ratio':>8}")
    for name, values in epochs_per_s.items():
        rate = statistics.median(values)
        rows.append(
            {
                "configuration": name,
                "world_size": configs[name][0],
                "batch_per_rank": configs[name][1],
                "epochs_per_s": rate,
                "images_per_s": rate * num_train,
                "ratio": rate / baseline,
                "rounds": values,
            }
        )
        print(f"{name:<44}{rate:>10.2f}{rate * num_train:>11.0f}{rate / baseline:>8.2f}")
    if args.out is not None:
        from pyro_vae.util.io import write_json

        write_json(
            args.out,
            {
                "dataset": args.dataset,
                "device": args.device,
                "threads": args.threads,
                "epochs": args.epochs,
                "warmup_epochs": args.warmup_epochs,
                "machine": platform.platform(),
                "cpu_count": os.cpu_count(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "results": rows,
            },
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == WORKER_FLAG:
        _worker(sys.argv[2])
    else:
        sys.exit(main())
