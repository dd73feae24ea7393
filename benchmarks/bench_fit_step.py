"""The compiled step through :func:`pyro_vae.fit` against NumPyro's jitted step, one process.

A user's 64-128-8 VAE (:class:`step_pairs.UserVAE`, no fused path), ``meanfield``, Adam,
``fit(..., compile=True)`` on ``--steps`` batches of B random binary images per epoch: each
epoch is one round, and right after it (in an epoch-end callback, outside the epoch) NumPyro's
``SVI.update`` under ``jax.jit`` on a batch of the same size runs as many steps. The ratio of
the two CPU times per step is taken per round; the first epoch (the compile) is not a round.
What fit adds around the compiled graph (batches, β, the loss total, callbacks) is in its time.

    python benchmarks/bench_fit_step.py --batch-sizes 20 128 --rounds 11 --threads 1

``--calls`` counts instead of timing: the Python-level calls per step (cProfile's count, which
does not depend on the machine's load) of the bare compiled step and of an epoch through fit,
for whichever copy of the package is imported (``PYTHONPATH``).

    python benchmarks/bench_fit_step.py --calls --batch-sizes 20
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step
import harness
import step_pairs

from pyro_vae import fit
from pyro_vae.train import Callback


class Profiled(Callback):
    """cProfile over the second epoch (the first compiles)."""

    def __init__(self):
        import cProfile

        self.profile = cProfile.Profile()

    def on_epoch_end(self, loop) -> None:
        if loop.epoch == 1:
            self.profile.enable()
        elif loop.epoch == 2:
            self.profile.disable()


def _calls(profile) -> int:
    import pstats

    return sum(entry[1] for entry in pstats.Stats(profile).stats.values())


def count_calls(batch: int, config: argparse.Namespace) -> dict:
    """Python calls per step: the bare compiled step on one batch, and one epoch of fit."""
    import cProfile

    from pyro_vae.infer import make_estimator
    from pyro_vae.train.compiled import CompiledStep
    from pyro_vae.train.fused import training_loss
    from pyro_vae.train.step import svi_step

    g = torch.Generator().manual_seed(config.seed)
    data = torch.bernoulli(torch.full((batch * config.steps, 64), 0.3), generator=g)
    torch.manual_seed(config.seed)
    pair = step_pairs.UserVAE()
    estimator = make_estimator("meanfield", max_plate_nesting=None)
    loss = training_loss(pair, estimator)
    optimizer = torch.optim.Adam(pair.parameters(), lr=config.lr)

    def eager(a, k, n):
        return svi_step(lambda: loss(*a, **k), n, optimizer)

    step = CompiledStep(pair, estimator, optimizer, loss, eager, log=lambda line: None)
    x = data[:batch]
    profile = cProfile.Profile()
    with pyro.validation_enabled(False):
        for _ in range(20):
            step((x,), {}, batch)
        profile.enable()
        for _ in range(config.steps):
            step((x,), {}, batch)
        profile.disable()
    compiled = step.disabled is None and step.eager_steps == 0
    timer = Profiled()
    fit(
        step_pairs.UserVAE(),
        data,
        batch_size=batch,
        epochs=2,
        lr=config.lr,
        elbo="meanfield",
        compile=True,
        progress=False,
        final_particles=0,
        callbacks=[timer],
    )
    return {
        "batch": batch,
        "compiled": compiled,
        "step_calls": _calls(profile) / config.steps,
        "fit_calls": _calls(timer.profile) / config.steps,
    }


class Interleaved(Callback):
    """After each epoch: the epoch's CPU time per step, then NumPyro's for as many steps."""

    def __init__(self, numpyro_step, steps: int):
        self.numpyro_step, self.steps = numpyro_step, steps
        self.fit, self.numpyro, self.last = [], [], None

    def on_fit_start(self, loop) -> None:
        self.last = time.process_time()

    def on_epoch_end(self, loop) -> None:
        now = time.process_time()
        if loop.epoch > 1:  # the first epoch compiles
            self.fit.append((now - self.last) / self.steps)
            start = time.process_time()
            for _ in range(self.steps):
                self.numpyro_step()
            self.numpyro.append((time.process_time() - start) / self.steps)
        self.last = time.process_time()


def run(batch: int, config: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(config.seed)
    data = torch.bernoulli(torch.full((batch * config.steps, 64), 0.3), generator=g)
    pyro.clear_param_store()
    problem = bench_step.Problem("64-128-8", batch, "meanfield", None, (data[:batch],))
    problem.net = "64-128-8"
    numpyro_step = bench_step.numpyro_step(problem, None, config)
    if numpyro_step is None:
        raise SystemExit(bench_step.NUMPYRO_SKIPPED)
    for _ in range(5):
        numpyro_step()
    timer = Interleaved(numpyro_step, config.steps)
    torch.manual_seed(config.seed)
    result = fit(
        step_pairs.UserVAE(),
        data,
        batch_size=batch,
        epochs=config.rounds + 1,
        lr=config.lr,
        elbo="meanfield",
        seed=config.seed,
        compile=True,
        progress=False,
        final_particles=0,
        callbacks=[timer],
    )
    ratio = harness.paired_ratio(timer.fit, timer.numpyro)
    compiled = result.compiled
    return {
        "batch": batch,
        "fit_ms": [t * 1e3 for t in timer.fit],
        "numpyro_ms": [t * 1e3 for t in timer.numpyro],
        "ratio": ratio,
        "compiled": compiled.disabled is None and compiled.eager_steps == 0,
        "compile_s": compiled.compile_seconds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], parents=[harness.parent_parser(rounds=11)]
    )
    p.add_argument("--batch-sizes", nargs="+", type=harness.positive_int, default=[20, 128])
    p.add_argument("--steps", type=harness.positive_int, default=400, help="steps per epoch")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--calls", action="store_true", help="count Python calls per step instead")
    config = p.parse_args(argv)
    harness.set_threads(config.threads)
    if config.calls:
        import pyro_vae

        for batch in config.batch_sizes:
            row = count_calls(batch, config)
            print(
                f"{pyro_vae.__file__}, B = {batch}: Python calls per step (cProfile) "
                f"{row['step_calls']:.1f} for the compiled step, {row['fit_calls']:.1f} "
                f"through fit (compiled: {row['compiled']})"
            )
        return 0
    session = harness.Session()
    rows = []
    print(f"load average at start: {harness.load_average()}")
    for batch in config.batch_sizes:
        row = run(batch, config)
        rows.append(row)
        fit_ms = sorted(row["fit_ms"])[len(row["fit_ms"]) // 2]
        np_ms = sorted(row["numpyro_ms"])[len(row["numpyro_ms"]) // 2]
        print(
            f"B = {batch}: fit(compile=True) {fit_ms:.3f} ms/step, NumPyro jit {np_ms:.3f} "
            f"ms/step (CPU medians); fit / NumPyro per round {harness.format_ratio(row['ratio'])}"
            f" over {len(row['fit_ms'])} rounds; compiled {row['compiled']}, compile "
            f"{row['compile_s']:.1f} s; load {harness.load_average()}"
        )
    session.finish()
    print(f"load average at end: {session.load_end}")
    if config.out:
        harness.write_json(config.out, session.report(rows=rows, command=" ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
