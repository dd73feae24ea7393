"""The package against another checkout of itself, side by side: CPU seconds of the same work
in the two source trees, in interleaved rounds, one thread each, each measurement in a fresh
process that imports its tree (``PYTHONPATH``).

The work, on the built-in VAE (64-128-8 on the bundled digits, Bernoulli):

``step_<estimator>``  one training step through :func:`pyro_vae.fit` (batch 128), eager:
                      ``fused`` (the built-in VAE's fused loss) and ``traced`` (``fused=False``,
                      through Pyro's traces: the path of every user's pair);
``evaluate``          :func:`pyro_vae.evaluate.evaluate_dataset` at K = 500 on 300 images
                      (batch 100, chunk 500), seconds per call.

Each process warms up (one epoch or call), then measures ``time.process_time``: the median
epoch of 10 (per step: 10 steps an epoch), or the mean of three calls; a round runs every
measurement once in each tree, in an order that rotates.
The report gives, per measurement, each round's ratio (this tree / the other) and their median,
min and max: read 0.95–1.05 as a tie on a quiet machine.

    git worktree add /tmp/old <revision>
    python benchmarks/bench_revisions.py --old /tmp/old --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent

MEASURE = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from pyro_vae import fit
from pyro_vae.train import Callback
from pyro_vae.data.images import load_digits
from pyro_vae.models.vae import VAE
what = sys.argv[1]
data = load_digits().train.images
torch.manual_seed(0)
if what == "evaluate":
    from pyro_vae.evaluate import evaluate_dataset
    vae = VAE(64, 8, (128,))
    x = (data[:300] > 0.5).float()
    def work():
        evaluate_dataset(vae.model, vae.guide, x, num_particles=500, khat=False)
    work()
    start = time.process_time()
    for _ in range(3):
        work()
    print(json.dumps((time.process_time() - start) / 3))
else:
    _, elbo, path = what.split("_")
    x = (data[:1280] > 0.5).float()
    marks = []

    class Mark(Callback):
        def on_epoch_end(self, loop):
            marks.append(time.process_time())

    fit(VAE(64, 8, (128,)), x, epochs=12, batch_size=128, elbo=elbo, lr=1e-3, progress=False,
        final_particles=0, fused=path == "fused", seed=0, callbacks=[Mark()])
    epochs = sorted(b - a for a, b in zip(marks[1:], marks[2:]))  # the first epoch warms up
    print(json.dumps(epochs[len(epochs) // 2] / 10))  # the median epoch, per step
"""

WORK = [
    "step_trace_fused",
    "step_trace_traced",
    "step_meanfield_fused",
    "step_meanfield_traced",
    "evaluate",
]


def _measure(tree: Path, what: str) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, what],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the other checkout's root folder")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", nargs="+", default=WORK, choices=WORK)
    parser.add_argument("--out", help="write the rounds as JSON")
    args = parser.parse_args(argv)
    trees = {"this": HERE, "old": Path(args.old).resolve()}
    ratios: dict[str, list[float]] = {what: [] for what in args.work}
    for index in range(args.rounds):
        order = list(trees) if index % 2 == 0 else list(reversed(trees))
        for what in args.work:
            seconds = {name: _measure(trees[name], what) for name in order}
            ratios[what].append(seconds["this"] / seconds["old"])
            print(
                f"round {index}: {what:<22} this {seconds['this'] * 1e3:8.2f} ms  "
                f"old {seconds['old'] * 1e3:8.2f} ms  ratio {ratios[what][-1]:.3f}",
                flush=True,
            )
    print(f"\n{'work':<22}{'median':>8}{'min':>8}{'max':>8}   (this / old, CPU time)")
    for what, values in ratios.items():
        print(f"{what:<22}{statistics.median(values):>8.3f}{min(values):>8.3f}{max(values):>8.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"old": str(trees["old"]), "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
