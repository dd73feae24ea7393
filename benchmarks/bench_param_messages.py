"""Is skipping unobserved ``pyro.param`` messages worth reaching into Pyro's internals?

Up to pyro-vae 0.1.0, :func:`pyro_vae.models.vae.register_module` skipped the module's
``pyro.param`` messages when the store already held its tensors and no effect handler would see
them (the evaluator and the estimators hide param messages with ``poutine.block``). It found
that out from Pyro 1.9's private effect-handler stack (``_PYRO_STACK``, ``Message``,
``BlockMessenger``) and ``ParamStoreDict._params``. This benchmark times three registrations in
one process, in interleaved rounds whose order rotates, by swapping the function that
``VAE.model``/``VAE.guide`` call:

``internals``
    The skipping version (a copy of the old code, kept here for the comparison).
``public``
    The package's own :func:`pyro_vae.models.vae.register_module`: Pyro's public API only, one
    ``pyro.param`` per tensor, re-registered when the store holds another module's tensor
    under the name.
``pyro.module``
    Plain ``pyro.module(name, module)`` on every call.

Two workloads on the built-in VAE (digits network, random weights, binarized digits):
``evaluate`` is :func:`pyro_vae.evaluate.evaluate_dataset` with K particles, ``step`` one
traced training step (the ``trace`` estimator's ``loss_and_grads`` on ``model``/``guide``,
then Adam) on a batch of B images. The median of the per-round CPU seconds (user + system,
steadier than the wall clock on a shared machine) and of the wall seconds is reported, with
the ratio of each registration to ``internals``.

    python benchmarks/bench_param_messages.py                     # one thread, K = 100, B = 20
    python benchmarks/bench_param_messages.py --particles 1000 --batch-size 128 --rounds 15
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch
from pyro.params import param_with_module_name
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

import pyro_vae.models.vae as models
from pyro_vae import VAE, load_digits
from pyro_vae.data.images import fixed_binarization
from pyro_vae.evaluate import evaluate_dataset

try:
    from pyro_vae.infer import make_estimator
except ImportError:  # a tree from before pyro_vae/infer/
    from pyro_vae.objectives import make_estimator


def _internals_register_module() -> Callable[[str, nn.Module], None] | None:
    """The skipping ``register_module`` of pyro-vae 0.1.0 (``None`` where this Pyro lacks the
    internals it reads)."""
    try:
        from pyro.poutine.block_messenger import BlockMessenger
        from pyro.poutine.broadcast_messenger import BroadcastMessenger
        from pyro.poutine.indep_messenger import IndepMessenger
        from pyro.poutine.plate_messenger import PlateMessenger
        from pyro.poutine.runtime import _PYRO_STACK, Message
        from pyro.poutine.subsample_messenger import SubsampleMessenger
    except ImportError:
        return None
    transparent = (PlateMessenger, SubsampleMessenger, IndepMessenger, BroadcastMessenger)
    real = torch.distributions.constraints.real

    def unobserved(named: list[tuple[str, torch.Tensor]]) -> bool:
        if not _PYRO_STACK:
            return True
        probe = Message(
            type="param",
            name=None,
            fn=pyro.get_param_store().get_param,
            is_observed=False,
            args=(),
            kwargs={},
            value=None,
            scale=1.0,
            mask=None,
            cond_indep_stack=(),
            done=False,
            stop=False,
            continuation=None,
            infer={},
        )
        for messenger in reversed(_PYRO_STACK):
            if type(messenger) is BlockMessenger:
                hidden = [
                    messenger.hide_fn({**probe, "name": name, "args": (name, value)})
                    for name, value in named
                ]
                if all(hidden):
                    return True
                if any(hidden):
                    return False
            elif type(messenger) not in transparent:
                return False
        return True

    def register_module(name: str, module: nn.Module) -> None:
        store = pyro.get_param_store()
        named = [
            (param_with_module_name(name, key), value) for key, value in module.named_parameters()
        ]
        if all(
            store._params.get(full) is value and store._constraints.get(full) is real
            for full, value in named
        ) and unobserved(named):
            return
        for full_name, value in named:
            if pyro.param(full_name, value) is not value:
                del store[full_name]
                pyro.param(full_name, value)

    return register_module


def plain_pyro_module(name: str, module: nn.Module) -> None:
    pyro.module(name, module)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], parents=[harness.parent_parser(rounds=9, warmup=0)]
    )
    p.add_argument(
        "--particles", type=harness.positive_int, default=100, help="K of the evaluator (100)"
    )
    p.add_argument(
        "--num-data", type=harness.positive_int, default=300, help="test images evaluated (300)"
    )
    p.add_argument(
        "--batch-size", type=harness.positive_int, default=20, help="B of the training step (20)"
    )
    p.add_argument(
        "--steps", type=harness.positive_int, default=200, help="training steps per round (200)"
    )
    p.add_argument(
        "--evaluations", type=harness.positive_int, default=3, help="evaluations per round (3)"
    )
    args = p.parse_args(argv)
    harness.check_out(p, args.out)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    args = _parse(argv)
    harness.set_threads(args.threads)
    variants = {
        "internals": _internals_register_module(),
        "public": models.register_module,
        "pyro.module": plain_pyro_module,
    }
    variants = {name: fn for name, fn in variants.items() if fn is not None}
    dataset = load_digits()
    images = fixed_binarization(dataset.test.images[: args.num_data], args.seed)
    batch = fixed_binarization(dataset.train.images[: args.batch_size], args.seed)
    torch.manual_seed(args.seed)
    vae = VAE(dataset.input_dim, 8, (128,))
    vae.decoder.set_output_bias(dataset.train.images.mean(0))
    estimator = make_estimator("trace", max_plate_nesting=1)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-4)

    def evaluate() -> None:
        for _ in range(args.evaluations):
            evaluate_dataset(
                vae.model,
                vae.guide,
                images,
                num_particles=args.particles,
                batch_size=100,
                particle_chunk=args.particles,
                khat=False,
            )

    def train() -> None:
        with pyro.validation_enabled(False):
            for _ in range(args.steps):
                optimizer.zero_grad(set_to_none=True)
                estimator.loss_and_grads(vae.model, vae.guide, batch)
                optimizer.step()

    workloads = {"evaluate": (evaluate, args.evaluations), "step": (train, args.steps)}
    contenders = {f"{w}/{v}": fn for w, (fn, _) in workloads.items() for v in variants}

    def before(name: str, round_: int) -> None:
        models.register_module = variants[name.split("/", 1)[1]]
        pyro.set_rng_seed(args.seed + max(round_, 0))

    original = models.register_module
    session = harness.Session()
    try:
        for register in variants.values():  # a check that each one works
            models.register_module = register
            pyro.clear_param_store()
            evaluate_dataset(vae.model, vae.guide, images[:10], num_particles=10, khat=False)
            estimator.loss_and_grads(vae.model, vae.guide, batch)
        timings = harness.interleave(contenders, args.rounds, args.warmup, before=before)
    finally:
        models.register_module = original
    print(
        f"pyro {pyro.__version__}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"thread(s), {args.rounds} interleaved rounds; median ms per call "
        f"(evaluate: N = {images.shape[0]}, K = {args.particles}; step: trace estimator, "
        f"B = {args.batch_size}); ratios: per-round median (min–max)"
    )
    print(
        f"{'workload':<10}{'register':<13}{'CPU ms':>9}{'wall ms':>9}"
        f"{'CPU / internals':>24}{'wall / internals':>24}"
    )
    report = {}
    for workload, (_, calls) in workloads.items():
        for name in variants:
            key = f"{workload}/{name}"
            cpu, wall = (timings.median(key, clock) * 1e3 / calls for clock in ("cpu", "wall"))
            report[key] = {"cpu_ms": cpu, "wall_ms": wall}
            line = f"{workload:<10}{name:<13}{cpu:>9.3f}{wall:>9.3f}"
            if "internals" in variants and name != "internals":
                base = f"{workload}/internals"
                for clock in ("cpu", "wall"):
                    ratio = harness.paired_ratio(
                        getattr(timings, clock)[key], getattr(timings, clock)[base]
                    )
                    report[key][f"{clock}_over_internals"] = ratio
                    line += f"{harness.format_ratio(ratio):>24}"
            print(line)
    if args.out is not None:
        harness.write_json(args.out, session.report(timings, **report))
    return report


if __name__ == "__main__":
    main()
