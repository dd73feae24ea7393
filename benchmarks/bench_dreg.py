"""Cost of one ``dreg`` step against ``iwae``'s at the same K, and against ``dreg`` with its
second run of the model forced (a subclass with ``draw_view = None``, no gradient gate).

The three steps (loss, backward, Adam) run on the same network and batch in one process, in
interleaved rounds whose order rotates, one thread by default; the median CPU seconds per step
over the rounds is reported with the ratios. The networks are Burda et al.'s MNIST models
(``--layers 1``: 784-200-200-50; ``--layers 2``: latents 100 and 50) on random binary images,
or ``--family vampprior`` (one layer, whose prior uses the encoder). Before timing, the single
and the two-run step are checked to give the same loss and gradients on the same random
numbers (to 1e-5 relative, float32).

    python benchmarks/bench_dreg.py --layers 1 --k 50 --batch-size 128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x = (torch.rand(args.batch_size, 784) < 0.3).float()
    network = NETWORKS[args.layers]
    if args.family == "vampprior":
        network = dataclasses.replace(network, family="vampprior",
                                      pseudo_inputs=args.pseudo_inputs)
    pair = build_network(network, x)
    estimators = {name: _estimator(name, args.k) for name in IMPLEMENTATIONS}
    single, two = (_gradients(name, estimators["dreg"], pair, x, args.seed)
                   for name in ("dreg", "dreg two runs"))
    worst = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                for a, b in zip(single, two))
    if worst > 1e-5:
        raise SystemExit(f"dreg's single run and two runs disagree: relative difference {worst:g}")
    optimizer = torch.optim.Adam(pair.parameters(), lr=1e-4)
    for name in IMPLEMENTATIONS:
        for _ in range(args.warmup_steps):
            _step(name, estimators[name], pair, x, optimizer)
    seconds: dict[str, list[float]] = {name: [] for name in IMPLEMENTATIONS}
    for round_ in range(args.rounds):
        order = IMPLEMENTATIONS[round_ % 3:] + IMPLEMENTATIONS[:round_ % 3]
        for name in order:
            start = time.process_time()
            for _ in range(args.steps):
                _step(name, estimators[name], pair, x, optimizer)
            seconds[name].append((time.process_time() - start) / args.steps)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"layers": args.layers, "family": args.family, "k": args.k,
            "batch_size": args.batch_size, "threads": args.threads, "rounds": args.rounds,
            "steps_per_round": args.steps, "gradient_check_relative": worst,
            "cpu_seconds_per_step": median,
            "dreg_over_iwae": median["dreg"] / median["iwae"],
            "two_runs_over_single": median["dreg two runs"] / median["dreg"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, choices=(1, 2), default=1)
    p.add_argument("--family", choices=("vae", "vampprior"), default="vae")
    p.add_argument("--pseudo-inputs", type=int, default=500)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per implementation per round")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.family == "vampprior" and args.layers != 1:
        p.error("--family vampprior is the one-layer model: use --layers 1")
    result = run(args)
    for name in IMPLEMENTATIONS:
        print(f"{name:>14}: {1000 * result['cpu_seconds_per_step'][name]:8.1f} ms/step (CPU)")
    print(f"dreg / iwae = {result['dreg_over_iwae']:.2f}; "
          f"dreg two runs / dreg = {result['two_runs_over_single']:.2f}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
