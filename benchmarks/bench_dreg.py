"""Cost of one ``dreg`` step against ``iwae``'s at the same K, and against ``dreg`` with its
second run of the model forced (a subclass with ``draw_view = None``, no gradient gate).

The three steps (loss, backward, Adam) run on the same network and batch in one process, in
interleaved rounds whose order rotates (:mod:`harness`), one thread by default; the median CPU
seconds per step over the rounds is reported, and each ratio is the median over the rounds of
the ratio of two steps timed in the same round (its range in the JSON's ``ratios``). The
networks are Burda et al.'s MNIST models (``--layers 1``: 784-200-200-50; ``--layers 2``:
latents 100 and 50) on random binary images, or ``--family vampprior`` (one layer, whose prior
uses the encoder). Before timing, the single
and the two-run step are checked to give the same loss and gradients on the same random
numbers (to 1e-5 relative, float32).

    python benchmarks/bench_dreg.py --layers 1 --k 50 --batch-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
from mnist_table import NETWORKS, build_network

from pyro_vae.infer import DoublyReparameterizedELBO, make_estimator

IMPLEMENTATIONS = ("iwae", "dreg", "dreg two runs")


class TwoRunDReG(DoublyReparameterizedELBO):
    """``dreg`` without the gate that rescales its one run's path gradients: the model runs a
    second time on the detached draws."""

    draw_view = None


def _estimator(name: str, k: int):
    if name == "dreg two runs":
        return TwoRunDReG(importance_samples=k)
    return make_estimator(name, importance_samples=k)


def _step(name: str, estimator, pair, x: torch.Tensor, optimizer) -> torch.Tensor:
    optimizer.zero_grad(set_to_none=True)
    loss = estimator.differentiable_loss(pair.model, pair.guide, x)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _gradients(name: str, estimator, pair, x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    loss = estimator.differentiable_loss(pair.model, pair.guide, x)
    return [loss.detach(), *torch.autograd.grad(loss, list(pair.parameters()))]


def run(args: argparse.Namespace) -> dict:
    harness.set_threads(args.threads)
    torch.manual_seed(args.seed)
    x = (torch.rand(args.batch_size, 784) < 0.3).float()
    network = NETWORKS[args.layers]
    if args.family == "vampprior":
        network = dataclasses.replace(network, family="vampprior", pseudo_inputs=args.pseudo_inputs)
    pair = build_network(network, x)
    estimators = {name: _estimator(name, args.k) for name in IMPLEMENTATIONS}
    single, two = (
        _gradients(name, estimators["dreg"], pair, x, args.seed)
        for name in ("dreg", "dreg two runs")
    )
    worst = max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(single, two)
    )
    if worst > 1e-5:
        raise SystemExit(f"dreg's single run and two runs disagree: relative difference {worst:g}")
    optimizer = torch.optim.Adam(pair.parameters(), lr=1e-4)
    contenders = {
        name: functools.partial(_step, name, estimators[name], pair, x, optimizer)
        for name in IMPLEMENTATIONS
    }
    session = harness.Session()
    timings = harness.interleave(contenders, args.rounds, args.warmup, calls=args.steps)
    median = {name: timings.median(name) for name in IMPLEMENTATIONS}
    return session.report(
        timings,
        baseline="iwae",
        layers=args.layers,
        family=args.family,
        k=args.k,
        batch_size=args.batch_size,
        threads=args.threads,
        steps_per_round=args.steps,
        gradient_check_relative=worst,
        cpu_seconds_per_step=median,
        dreg_over_iwae=harness.paired_ratio(timings.cpu["dreg"], timings.cpu["iwae"])["median"],
        two_runs_over_single=harness.paired_ratio(
            timings.cpu["dreg two runs"], timings.cpu["dreg"]
        )["median"],
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], parents=[harness.parent_parser(rounds=5, warmup=3)]
    )
    p.add_argument("--layers", type=int, choices=(1, 2), default=1)
    p.add_argument("--family", choices=("vae", "vampprior"), default="vae")
    p.add_argument("--pseudo-inputs", type=int, default=500)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--steps", type=harness.positive_int, default=5, help="steps per implementation per round"
    )
    args = p.parse_args(argv)
    if args.family == "vampprior" and args.layers != 1:
        p.error("--family vampprior is the one-layer model: use --layers 1")
    harness.check_out(p, args.out)
    result = run(args)
    for name in IMPLEMENTATIONS:
        print(f"{name:>14}: {1000 * result['cpu_seconds_per_step'][name]:8.1f} ms/step (CPU)")
    print(
        f"dreg / iwae = {result['dreg_over_iwae']:.2f}; "
        f"dreg two runs / dreg = {result['two_runs_over_single']:.2f}"
    )
    if args.out is not None:
        harness.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
