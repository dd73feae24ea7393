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
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.ops.indexing import Vindex
from torch.nn.functional import softplus

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conformance import mixture_model  # noqa: E402

from pyro_vae import fit  # noqa: E402
from pyro_vae.evaluate import evaluate  # noqa: E402
from pyro_vae.pairs import PyroPair  # noqa: E402


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
        return {"weights": torch.ones(2) / 2, "scale": torch.tensor(5.0),
                "locs": data[torch.tensor([0, 2])]}[site["name"]]

    guide = AutoDelta(poutine.block(mixture_model, expose=["weights", "scale", "locs"]),
                      init_loc_fn=init)
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
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(states) + 0.1)
                              .to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.5, 0.5).expand([states]).to_event(1))
        with pyro.plate("sequences", tones.shape[0]):
            x = 0
            for t in pyro.markov(range(tones.shape[1])):
                x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs_x)[x]),
                                infer={"enumerate": "parallel"})
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
    Example("hmm", _hmm, lambda: TraceEnum_ELBO(max_plate_nesting=1), "trace", 0.05,
            data_plate="sequences"),
    Example("sparse_gamma_def", _sparse_gamma_def,
            lambda: TraceMeanField_ELBO(max_plate_nesting=1), "meanfield", 0.05),
]


def _scores(example: Example, model: Callable, guide: Callable, data: torch.Tensor,
            draws: int) -> dict[str, float]:
    """Pyro's loss of the trained pair, −(its mean over ``draws`` draws), and the package's
    dataset ELBO of it (K = ``draws``)."""
    elbo = example.pyro_elbo()
    with torch.no_grad():
        losses = [elbo.loss(model, guide, data) for _ in range(draws)]
    scored = evaluate(model, guide, data, num_particles=draws, khat=False,
                      data_plate=example.data_plate)
    return {"pyro_elbo": -statistics.mean(losses),
            "evaluator_elbo": scored.dataset_elbo if scored.global_term is not None
            else float(scored.elbo.sum())}


def run(example: Example, steps: int, seed: int, draws: int = 200) -> dict[str, dict]:
    """Both trainings of one example from one seed, and their scores."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": example.lr}), example.pyro_elbo())
        for _ in range(steps):
            svi.step(data)
        out["pyro_svi"] = _scores(example, model, guide, data, draws)
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        model, guide, data = example.build()
        pair = PyroPair(model, guide, data_plate=example.data_plate)
        fit(pair, data, elbo=example.estimator, batch_size=len(data), epochs=steps,
            lr=example.lr, seed=seed, progress=False, final_particles=0)
        out["pyro_vae_fit"] = _scores(example, pair.model, pair.guide, data, draws)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--examples", nargs="+", default=[e.name for e in EXAMPLES])
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args(argv)
    results = {}
    print(f"{'example':<18}{'seed':>5}  {'trained by':<13}{'Pyro ELBO':>12}{'evaluator':>12}")
    for example in (e for e in EXAMPLES if e.name in args.examples):
        for seed in args.seeds:
            row = run(example, args.steps, seed, args.draws)
            results.setdefault(example.name, {})[seed] = row
            for trainer, scores in row.items():
                print(f"{example.name:<18}{seed:>5}  {trainer:<13}"
                      f"{scores['pyro_elbo']:>12.3f}{scores['evaluator_elbo']:>12.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
