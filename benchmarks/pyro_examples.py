"""Pyro's own examples through the package, side by side with Pyro's SVI on the same data.

Each example is written as Pyro's examples and tutorials write it (small sizes, synthetic
data), trained twice from the same seed for the same steps with Adam at the same learning rate:
by Pyro's ``SVI`` with the ELBO the example uses, and by :func:`pyro_vae.fit` with the
estimator that computes the same quantity; then both trained pairs are scored by the same
numbers: Pyro's own loss averaged over many draws, and the package's evaluator (the dataset
ELBO, and log p̂ where the weights allow it).

``mixture``  the Gaussian-mixture tutorial: assignments enumerated in the model, ``AutoDelta``
             on the weights, locations and scale; ``TraceEnum_ELBO`` against ``trace``.
``hmm``      a hidden Markov model as ``examples/hmm.py`` writes its first model: Dirichlet
             transition and emission probabilities (``AutoDelta``), the hidden state of every
             step enumerated along ``pyro.markov`` in a plate of sequences;
             ``TraceEnum_ELBO`` against ``trace`` with ``data_plate="sequences"``.
``sparse_gamma_def``  the sparse gamma deep exponential family (two layers): Gamma weights and
             latents, a guide with a parameter per datapoint; ``TraceMeanField_ELBO`` against
             ``meanfield`` on the whole data set as one batch.

    python benchmarks/pyro_examples.py --steps 300 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.ops.indexing import Vindex
from torch.nn.functional import softplus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pyro_example_models as nets
from conformance import mixture_model

from pyro_vae import fit
from pyro_vae.core.pairs import PyroPair
from pyro_vae.evaluate import evaluate
from pyro_vae.evaluate.ais import ais
from pyro_vae.util.errors import PyroVAEError


@dataclass
class Example:
    """``build(seed)`` gives (model, guide, data); ``pyro_elbo`` the ELBO the example trains
    with; ``estimator`` the package's estimator of the same quantity."""

    name: str
    build: Callable[[], tuple[Callable, Callable, torch.Tensor]]
    pyro_elbo: Callable[[], pyro.infer.ELBO]
    estimator: str
    lr: float
    data_plate: str | None = None


def _mixture():
    data = torch.tensor([0.0, 1.0, 10.0, 11.0, 12.0])

    def init(site):
        return {
            "weights": torch.ones(2) / 2,
            "scale": torch.tensor(5.0),
            "locs": data[torch.tensor([0, 2])],
        }[site["name"]]

    guide = AutoDelta(
        poutine.block(mixture_model, expose=["weights", "scale", "locs"]), init_loc_fn=init
    )
    return mixture_model, guide, data


def _hmm():
    states, steps, sequences = 2, 12, 8
    g = torch.Generator().manual_seed(0)
    hidden = torch.zeros(sequences, steps, dtype=torch.long)
    for t in range(1, steps):
        stay = torch.rand(sequences, generator=g) < 0.85
        hidden[:, t] = torch.where(stay, hidden[:, t - 1], 1 - hidden[:, t - 1])
    tones = torch.bernoulli(torch.tensor([0.15, 0.8])[hidden], generator=g)

    def model(tones):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(states) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.5, 0.5).expand([states]).to_event(1))
        with pyro.plate("sequences", tones.shape[0]):
            x = 0
            for t in pyro.markov(range(tones.shape[1])):
                x = pyro.sample(
                    f"x_{t}", dist.Categorical(Vindex(probs_x)[x]), infer={"enumerate": "parallel"}
                )
                pyro.sample(f"y_{t}", dist.Bernoulli(Vindex(probs_y)[x]), obs=tones[:, t])

    guide = AutoDelta(poutine.block(model, expose=["probs_x", "probs_y"]))
    return model, guide, tones


def _sparse_gamma_def():
    top, mid, pixels, rows = 3, 2, 6, 20
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(3 * torch.rand(rows, pixels, generator=g), generator=g)

    def model(x):
        w_top = pyro.sample("w_top", dist.Gamma(0.1, 0.3).expand([top, mid]).to_event(2))
        w_obs = pyro.sample("w_obs", dist.Gamma(0.1, 0.3).expand([mid, pixels]).to_event(2))
        with pyro.plate("data", x.shape[0]):
            z_top = pyro.sample("z_top", dist.Gamma(0.1, 0.1).expand([top]).to_event(1))
            z_mid = pyro.sample("z_mid", dist.Gamma(0.1, 0.1 / (z_top @ w_top)).to_event(1))
            pyro.sample("x", dist.Poisson(z_mid @ w_obs).to_event(1), obs=x)

    def guide(x):
        def gamma(name, shape, event):
            alpha = pyro.param(f"alpha_{name}", lambda: 0.5 + 0.1 * torch.randn(shape))
            mean = pyro.param(f"mean_{name}", lambda: 0.1 * torch.randn(shape))
            alpha, mean = softplus(alpha), softplus(mean)
            return dist.Gamma(alpha, alpha / mean).to_event(event)

        pyro.sample("w_top", gamma("w_top", (top, mid), 2))
        pyro.sample("w_obs", gamma("w_obs", (mid, pixels), 2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_top", gamma("z_top", (x.shape[0], top), 1))
            pyro.sample("z_mid", gamma("z_mid", (x.shape[0], mid), 1))

    return model, guide, counts


EXAMPLES = [
    Example("mixture", _mixture, lambda: TraceEnum_ELBO(max_plate_nesting=1), "trace", 0.1),
    Example(
        "hmm",
        _hmm,
        lambda: TraceEnum_ELBO(max_plate_nesting=1),
        "trace",
        0.05,
        data_plate="sequences",
    ),
    Example(
        "sparse_gamma_def",
        _sparse_gamma_def,
        lambda: TraceMeanField_ELBO(max_plate_nesting=1),
        "meanfield",
        0.05,
    ),
    Example("vae", nets.vae, lambda: Trace_ELBO(max_plate_nesting=1), "trace", 0.01),
    Example(
        "ss_vae_M2", nets.ss_vae_m2, lambda: TraceEnum_ELBO(max_plate_nesting=1), "trace", 0.01
    ),
    Example(
        "ss_vae_M2_labelled",
        nets.ss_vae_m2_labelled,
        lambda: TraceEnum_ELBO(max_plate_nesting=1),
        "trace",
        0.01,
    ),
    Example("cvae", nets.cvae, lambda: Trace_ELBO(max_plate_nesting=1), "trace", 0.01),
    Example("dmm", nets.dmm, lambda: Trace_ELBO(max_plate_nesting=1), "trace", 0.01),
    Example(
        "lda",
        nets.lda,
        lambda: TraceEnum_ELBO(max_plate_nesting=2),
        "trace",
        0.05,
        data_plate="documents",
    ),
    Example(
        "prodlda", nets.prodlda, lambda: TraceMeanField_ELBO(max_plate_nesting=1), "meanfield", 0.01
    ),
    Example("scanvi", nets.scanvi, lambda: TraceEnum_ELBO(max_plate_nesting=1), "trace", 0.01),
    Example("air", nets.air, lambda: TraceGraph_ELBO(max_plate_nesting=1), "trace", 0.01),
]


def _arguments(data) -> tuple:
    return data if isinstance(data, tuple) else (data,)


def _scores(
    example: Example, model: Callable, guide: Callable, data, draws: int
) -> dict[str, float]:
    """Pyro's loss of the trained pair, −(its mean over ``draws`` draws), and the package's
    evaluator on it (K = ``draws``): the dataset ELBO (``TraceEnum_ELBO``'s where the guide
    enumerates) and, without global latents, the data set's log p̂."""
    elbo, args = example.pyro_elbo(), _arguments(data)
    with torch.no_grad():
        losses = [elbo.loss(model, guide, *args) for _ in range(draws)]
    scored = evaluate(
        model, guide, *args, num_particles=draws, khat=False, data_plate=example.data_plate
    )
    local = scored.trace_enum_elbo if scored.trace_enum_elbo is not None else scored.elbo
    local = float(local.sum())
    return {
        "pyro_elbo": -statistics.mean(losses),
        "evaluator_elbo": local if scored.global_term is None else local + scored.global_term.mean,
        "log_px": float(scored.log_px.sum()) if scored.global_term is None else None,
        "vectorized": scored.vectorized,
    }


def run(
    example: Example, steps: int, seed: int, draws: int = 200, ais_steps: int = 0, chains: int = 8
) -> dict[str, dict]:
    """Both trainings of one example from one seed, and their scores (``initial``: Pyro's
    ELBO of the untrained pair); with ``ais_steps``, AIS on the pair ``fit`` trained
    (``chains`` chains)."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        elbo, args = example.pyro_elbo(), _arguments(data)
        with torch.no_grad(), poutine.block():
            out["initial"] = -statistics.mean(elbo.loss(model, guide, *args) for _ in range(draws))
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": example.lr}), example.pyro_elbo())
        for _ in range(steps):
            svi.step(*_arguments(data))
        out["pyro_svi"] = _scores(example, model, guide, data, draws)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        pair = PyroPair(model, guide, data_plate=example.data_plate)
        fit(
            pair,
            data,
            elbo=example.estimator,
            batch_size=len(_arguments(data)[0]),
            epochs=steps,
            lr=example.lr,
            seed=seed,
            progress=False,
            final_particles=0,
        )
        out["pyro_vae_fit"] = _scores(example, pair.model, pair.guide, data, draws)
    if ais_steps:
        out["ais"] = anneal(example, pair.model, pair.guide, data, ais_steps, chains)
    return out


#: The estimators tried on every example (with K importance samples where they take them).
ESTIMATORS = ("trace", "meanfield", "iwae", "stl", "dreg", "vimco")
K = 4


def _attempt(thunk: Callable[[], str]) -> str:
    """``thunk()``'s line, or the one-line refusal (``refused: ...``), or a crash."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return thunk()
    except PyroVAEError as exc:
        return f"refused: {str(exc).splitlines()[0]}"
    except Exception as exc:
        return f"crash: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def estimators(example: Example, steps: int, seed: int, compile: bool = False) -> dict[str, str]:
    """Each estimator trains a fresh pair for ``steps`` steps through ``fit`` (``compile``:
    the compiled step): ``ran`` with its last loss, or its one-line refusal."""
    out = {}
    for name in ESTIMATORS:

        def train(name=name) -> str:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model, guide, data = example.build()
            pair = PyroPair(model, guide, data_plate=example.data_plate)
            k = K if name in ("iwae", "dreg", "vimco") else 1
            result = fit(
                pair,
                data,
                elbo=name,
                importance_samples=k,
                epochs=steps,
                batch_size=len(_arguments(data)[0]),
                lr=example.lr,
                seed=seed,
                progress=False,
                final_particles=0,
                compile=compile,
            )
            loss = result.history.train_loss[-1]
            if not math.isfinite(loss):
                return f"crash: loss {loss}"
            return f"ran: loss {loss:.4g}" + (
                f", compiled steps {result.compiled.compiled_steps}" if compile else ""
            )

        out[name] = _attempt(train)
    return out


def compiled(example: Example, steps: int, seed: int) -> str:
    """The example's estimator for ``steps`` full-batch steps from ``seed``, eagerly and with
    ``compile=True``: both last losses and how many steps ran compiled."""

    def train(compile: bool):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        return fit(
            PyroPair(model, guide, data_plate=example.data_plate),
            data,
            elbo=example.estimator,
            epochs=steps,
            batch_size=len(_arguments(data)[0]),
            lr=example.lr,
            seed=seed,
            progress=False,
            final_particles=0,
            compile=compile,
        )

    def both() -> str:
        eager, fast = train(False), train(True)
        step = fast.compiled
        return (
            f"eager loss {eager.history.train_loss[-1]:.4f}, compiled "
            f"{fast.history.train_loss[-1]:.4f} ({step.compiled_steps} steps compiled, "
            f"{step.eager_steps} eager{', ' + step.disabled if step.disabled else ''})"
        )

    return _attempt(both)


def anneal(
    example: Example, model: Callable, guide: Callable, data, steps: int, chains: int
) -> str:
    """AIS on a trained pair: the data set's log p̂_AIS, or its one-line refusal."""

    def run_ais() -> str:
        result = ais(
            model,
            guide,
            data,
            num_chains=chains,
            num_steps=steps,
            batch_size=len(_arguments(data)[0]),
            data_plate=example.data_plate,
        )
        return f"log p̂ {float(result.log_px.sum()):.3f}"

    return _attempt(run_ais)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--examples", nargs="+", default=[e.name for e in EXAMPLES])
    parser.add_argument(
        "--estimator-steps",
        type=int,
        default=5,
        help="steps of each estimator's run (0: skip them)",
    )
    parser.add_argument("--compile", action="store_true", help="run the estimators' steps compiled")
    parser.add_argument(
        "--ais-steps", type=int, default=200, help="AIS steps on the pair fit trained (0: skip AIS)"
    )
    parser.add_argument(
        "--compiled-steps",
        type=int,
        default=0,
        help="train the example's estimator this many steps eagerly and "
        "compiled, and compare (0: skip)",
    )
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    results = {}
    print(
        f"{'example':<20}{'seed':>5}  {'trained by':<13}{'Pyro ELBO':>12}{'evaluator':>12}"
        f"{'log p̂':>12}"
    )
    for example in (e for e in EXAMPLES if e.name in args.examples):
        for seed in args.seeds:
            row = run(example, args.steps, seed, args.draws, args.ais_steps)
            results.setdefault(example.name, {})[seed] = row
            for trainer in ("pyro_svi", "pyro_vae_fit"):
                scores = row[trainer]
                log_px = scores["log_px"]
                print(
                    f"{example.name:<20}{seed:>5}  {trainer:<13}"
                    f"{scores['pyro_elbo']:>12.3f}{scores['evaluator_elbo']:>12.3f}"
                    + (f"{log_px:>12.3f}" if log_px is not None else f"{'':>12}")
                )
            if "ais" in row:
                print(f"{'':<27}AIS on fit's pair: {row['ais']}")
        if args.compiled_steps:
            line = compiled(example, args.compiled_steps, args.seeds[0])
            results[example.name]["compiled"] = line
            print(f"{'':<27}compiled: {line}")
        if args.estimator_steps:
            cells = estimators(example, args.estimator_steps, args.seeds[0], args.compile)
            results[example.name]["estimators"] = cells
            for name, line in cells.items():
                print(f"{'':<27}{name:<10} {line}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
