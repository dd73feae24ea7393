"""Conformance of the package's estimators with Pyro's own ELBOs, case by case.

Each case is a model/guide pair written as Pyro's users and Pyro's own test suite write them
(plates nested, unsized, subsampled, reused and sequential; global and local latents; factors,
masks, scales; AutoGuides; enumeration in the guide and in the model, Markov chains included;
no data plate at all). Each is run through every estimator and compared with the Pyro ELBO that
computes the same quantity on the same random numbers: ``Trace_ELBO`` for ``trace``, ``iwae``,
``stl`` and ``dreg`` at one draw (their values are the ELBO's; the gradients of ``trace`` and
``iwae`` are its reparameterization gradients), ``TraceMeanField_ELBO`` for ``meanfield``, and
``TraceEnum_ELBO`` for sites enumerated in the model. A cell is

``equal``     accepted, and the loss (and, where the quantity is the same, every parameter's
              gradient) equals Pyro's,
``refused``   a one-line :class:`~pyro_vae.util.errors.ConfigError`,
``n/a``       not comparable by design (a different bound: the log of the sum over a guide's
              enumerated values, a score-function baseline, an estimator that needs
              reparameterizable sites; or Pyro refuses the case); run all the same, and
              accepted or refused in one line,
``different`` accepted with another number: silently wrong,
``crash``     any other exception.

Applicable cells are the ``equal`` and ``refused`` ones; the acceptance rate is the share of
them that are ``equal``.

    python benchmarks/conformance.py              # the table and the acceptance rate
    python benchmarks/conformance.py --out conformance.json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from pyro.ops.indexing import Vindex
from pyro.poutine.plate_messenger import block_plate

from pyro_vae.infer import make_estimator
from pyro_vae.util.errors import ConfigError

ESTIMATORS = ("trace", "iwae", "meanfield", "stl", "dreg")
#: importance-weighted bounds with K = 5 inside the log: no Pyro ELBO computes them, so these
#: cells only say whether the case runs (``ran``), is refused in one line, or crashes
IMPORTANCE_WEIGHTED = ("iwae", "dreg", "vimco")
K = 5
GRADIENTS = ("trace", "iwae", "meanfield")
DATA = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.5])


@dataclass
class Case:
    """A pair and what to compare it with: ``enum`` (sites enumerated in the model: Pyro's
    TraceEnum_ELBO for every estimator), ``not_comparable`` (estimators whose quantity differs
    by design, with why)."""

    name: str
    build: Callable[[], tuple[Callable, Callable, tuple]]
    enum: bool = False
    not_comparable: dict[str, str] = field(default_factory=dict)
    nesting: int = 2


def _local_guide(scale: float = 0.8) -> Callable:
    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc * x, scale))

    return guide


def _plate_local():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model, _local_guide(), (DATA,)


def _plate_subsample():
    def model(x):
        with pyro.plate("data", len(x), subsample_size=3) as rows:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[rows])

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x), subsample_size=3) as rows:
            pyro.sample("z", dist.Normal(loc * x[rows], 0.8))

    return model, guide, (DATA,)


def _plate_unsized():
    def model(x):
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x)), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data"):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (DATA,)


def _plate_dim2():
    x = DATA[:, None]

    def model(x):
        with pyro.plate("data", len(x), dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x), dim=-2):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (x,)


def _nested_plates():
    x = DATA.reshape(3, 2)

    def model(x):
        with pyro.plate("data", 3, dim=-2), pyro.plate("features", 2, dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", 3, dim=-2), pyro.plate("features", 2, dim=-1):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (x,)


def _global_in_feature_plate():
    x = DATA.reshape(3, 2)

    def model(x):
        features = pyro.plate("features", 2, dim=-1)
        with features:
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3, dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with features:
                pyro.sample("x", dist.Normal(z * w, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("features", 2, dim=-1):
            pyro.sample("w", dist.Normal(loc, 0.5))
        with pyro.plate("data", 3, dim=-2):
            pyro.sample("z", dist.Normal(loc * x.sum(-1, keepdim=True), 0.8))

    return model, guide, (x,)


def _iplate_in_data():
    def model(x):
        with pyro.plate("data", len(x)):
            for i in pyro.plate("steps", 3):
                z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
                pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x + i)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x)):
            for i in pyro.plate("steps", 3):
                pyro.sample(f"z_{i}", dist.Normal(loc * (x + i), 0.8))

    return model, guide, (DATA,)


def _iplate_of_plates():
    def model(x):
        for i in pyro.plate("groups", 2):
            with pyro.plate(f"data_{i}", 3):
                z = pyro.sample(f"z_{i}", dist.Normal(0.0, 1.0))
                pyro.sample(f"x_{i}", dist.Normal(z, 1.0), obs=x[3 * i : 3 * i + 3])

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        for i in pyro.plate("groups", 2):
            with pyro.plate(f"data_{i}", 3):
                pyro.sample(f"z_{i}", dist.Normal(loc * x[3 * i : 3 * i + 3], 0.8))

    return model, guide, (DATA,)


def _no_plate():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        pyro.sample("x", dist.Normal(mu, 1.0).expand(x.shape).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("mu", dist.Normal(loc, 0.5))

    return model, guide, (DATA,)


def _global_and_local():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("mu", dist.Normal(loc, 0.5))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (DATA,)


def _factor():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.factor("penalty", -0.5 * z**2)
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model, _local_guide(), (DATA,)


def _mask():
    keep = torch.tensor([True, False, True, True, False, True])

    def model(x):
        with pyro.plate("data", len(x)), poutine.mask(mask=keep):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x)), poutine.mask(mask=keep):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (DATA,)


def _obs_mask():
    seen = torch.tensor([True, False, True, True, False, True])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x, obs_mask=seen)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(loc * x, 0.8))
            with poutine.mask(mask=~seen):
                pyro.sample("x_unobserved", dist.Normal(z, 1.2))

    return model, guide, (DATA,)


def _scaled():
    model, guide, args = _plate_local()
    return poutine.scale(model, scale=2.5), poutine.scale(guide, scale=2.5), args


def _scaled_likelihood():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with poutine.scale(scale=0.5):
                pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model, _local_guide(), (DATA,)


def _plate_reuse():
    def model(x):
        data = pyro.plate("data", len(x))
        with data:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with data:
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        data = pyro.plate("data", len(x))
        with data:
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (DATA,)


def _hierarchical_local():
    def model(x):
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
            pyro.sample("x", dist.Normal(z2, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", len(x)):
            z1 = pyro.sample("z1", dist.Normal(loc * x, 0.8))
            pyro.sample("z2", dist.Normal(z1 + loc, 0.6))

    return model, guide, (DATA,)


def _plate_stack():
    x = DATA.reshape(2, 3)

    def model(x):
        with pyro.plate_stack("cells", (2, 3)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate_stack("cells", (2, 3)):
            pyro.sample("z", dist.Normal(loc * x, 0.8))

    return model, guide, (x,)


def _block_plate():
    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        with pyro.plate("plate", 2):
            pyro.sample("b", dist.Normal(a, 1.0))
            with block_plate("plate"):
                pyro.sample("c", dist.Normal(0.0, 1.0))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        pyro.sample("c", dist.Normal(loc, 1.0))
        with pyro.plate("plate", 2):
            pyro.sample("b", dist.Normal(loc, 0.5))
            with block_plate("plate"):
                pyro.sample("a", dist.Normal(loc, 0.7))

    return model, guide, ()


def _sparse_gamma_def():
    """The sparse gamma deep exponential family of Pyro's examples, two layers: Gamma global
    weights in plates of their own, Gamma local latents whose guide has a parameter per
    datapoint, a Poisson likelihood."""
    g = torch.Generator().manual_seed(0)
    counts = torch.poisson(3 * torch.rand(6, 4, generator=g), generator=g)

    def model(x):
        with pyro.plate("w_top_plate", 6):
            w_top = pyro.sample("w_top", dist.Gamma(0.1, 0.3))
        with pyro.plate("w_obs_plate", 8):
            w_obs = pyro.sample("w_obs", dist.Gamma(0.1, 0.3))
        with pyro.plate("data", x.shape[0]):
            z_top = pyro.sample("z_top", dist.Gamma(0.1, 0.1).expand([3]).to_event(1))
            z_mid = pyro.sample(
                "z_mid",
                dist.Gamma(0.1, 0.1 / (z_top @ w_top.reshape(*w_top.shape[:-1], 3, 2))).to_event(1),
            )
            pyro.sample(
                "x", dist.Poisson(z_mid @ w_obs.reshape(*w_obs.shape[:-1], 2, 4)).to_event(1), obs=x
            )

    def guide(x):
        def gamma(name, shape):
            alpha = pyro.param(f"alpha_{name}", lambda: 0.5 + 0.1 * torch.randn(shape))
            mean = pyro.param(f"mean_{name}", lambda: 0.1 * torch.randn(shape))
            alpha, mean = torch.nn.functional.softplus(alpha), torch.nn.functional.softplus(mean)
            return dist.Gamma(alpha, alpha / mean)

        with pyro.plate("w_top_plate", 6):
            pyro.sample("w_top", gamma("w_top", (6,)))
        with pyro.plate("w_obs_plate", 8):
            pyro.sample("w_obs", gamma("w_obs", (8,)))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z_top", gamma("z_top", (x.shape[0], 3)).to_event(1))
            pyro.sample("z_mid", gamma("z_mid", (x.shape[0], 2)).to_event(1))

    return model, guide, (counts,)


def _autoguide(kind):
    def build():
        def model(x):
            mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
            sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
            with pyro.plate("data", len(x)):
                pyro.sample("x", dist.Normal(mu, sigma), obs=x)

        return model, kind(model), (DATA,)

    return build


@config_enumerate
def mixture_model(x):
    """The Gaussian-mixture tutorial's model: global weights, scale and locations, each
    datapoint's assignment enumerated in the model."""
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(2)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=x)


def _enum_model_mixture(kind):
    def build():
        guide = kind(poutine.block(mixture_model, expose=["weights", "scale", "locs"]))
        return mixture_model, guide, (DATA,)

    return build


def _enum_model_nested():
    x = DATA.reshape(3, 2)

    def model(x):
        probs = pyro.param("probs", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
        with pyro.plate("data", 3, dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", 2, dim=-1):
                c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(z + 2.0 * c.float() - 1.0, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.tensor(0.2))
        with pyro.plate("data", 3, dim=-2):
            pyro.sample("z", dist.Normal(loc * x.sum(-1, keepdim=True), 0.8))

    return model, guide, (x,)


def _enum_model_markov():
    x = torch.tensor([[0.1, 1.9, 2.2, -0.3], [1.1, 0.2, -0.4, 2.5], [0.0, 0.3, 2.1, 1.8]])

    def model(x):
        init = pyro.param("init", torch.tensor([0.5, 0.5]), constraint=dist.constraints.simplex)
        trans = pyro.param(
            "trans", torch.tensor([[0.8, 0.2], [0.3, 0.7]]), constraint=dist.constraints.simplex
        )
        locs = pyro.param("locs", torch.tensor([0.0, 2.0]))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            state = None
            for t in pyro.markov(range(x.shape[1])):
                probs = init if state is None else Vindex(trans)[state]
                state = pyro.sample(
                    f"s_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                )
                pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[state], 1.0), obs=x[:, t])

    def guide(x):
        pass

    return model, guide, (x,)


def _enum_guide_discrete():
    locs = torch.tensor([-1.0, 1.5])

    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.4, 0.6])))
            pyro.sample("x", dist.Normal(locs[c], 1.0), obs=x)

    def guide(x):
        logit = pyro.param("logit", torch.tensor(0.3))
        with pyro.plate("data", len(x)):
            probs = torch.stack([torch.sigmoid(-logit * x), torch.sigmoid(logit * x)], -1)
            pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})

    return model, guide, (DATA,)


def _enum_guide_with_continuous():
    """A class enumerated in the guide and a continuous latent drawn given it (the M2 shape)."""

    def model(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(torch.ones(3) / 3))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + torch.tensor([-1.0, 0.0, 1.0])[y], 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", torch.tensor([0.5, -0.2, 0.1]))
        s = pyro.param("s", torch.tensor(0.8), constraint=dist.constraints.positive)
        with pyro.plate("data", len(x)):
            y = pyro.sample(
                "y", dist.Categorical(logits=w * x.unsqueeze(-1)), infer={"enumerate": "parallel"}
            )
            pyro.sample("z", dist.Normal(0.5 * x + 0.3 * y, s))

    return model, guide, (DATA,)


def _enum_guide_nested():
    """Guide sites enumerated in the data plate and in a plate nested in it (the inner one
    depending on the outer), beside a site enumerated in the model."""
    x = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)

    def model(x):
        with pyro.plate("data", 3, dim=-2):
            a = pyro.sample("a", dist.Bernoulli(0.3))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("cells", 4, dim=-1):
                c = pyro.sample("c", dist.Categorical(torch.tensor([0.2, 0.5, 0.3])))
                d = pyro.sample("d", dist.Bernoulli(0.6), infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(z + c - d + a, 1.0), obs=x)

    def guide(x):
        w = pyro.param("w", torch.tensor([0.3, -0.5, 0.2]))
        v = pyro.param("v", torch.tensor(0.2))
        with pyro.plate("data", 3, dim=-2):
            mean = x.mean(-1, keepdim=True)
            a = pyro.sample("a", dist.Bernoulli(logits=v * mean), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(mean + a, 0.7))
            with pyro.plate("cells", 4, dim=-1):
                pyro.sample(
                    "c",
                    dist.Categorical(logits=w * x.unsqueeze(-1) + a.unsqueeze(-1)),
                    infer={"enumerate": "parallel"},
                )

    return model, guide, (x,)


def _enum_subsampled_bound_zero():
    def model():
        p = pyro.param("p", torch.tensor(0.3), constraint=dist.constraints.unit_interval)
        with pyro.plate("outer", 10, subsample_size=4) as rows:
            for i in pyro.plate("inner", 5, subsample_size=2):
                pyro.sample(
                    f"x_{i}", dist.Bernoulli(p).expand([len(rows)]), infer={"enumerate": "parallel"}
                )

    return model, model, ()


def _sampled_discrete():
    def model(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Bernoulli(0.4))
            pyro.sample("x", dist.Normal(2.0 * c - 1.0, 1.0), obs=x)

    def guide(x):
        logit = pyro.param("logit", torch.tensor(0.3))
        with pyro.plate("data", len(x)):
            pyro.sample("c", dist.Bernoulli(logits=logit * x))

    return model, guide, (DATA,)


def _empty_guide_full_enumeration():
    def model(x):
        probs = pyro.param("probs", torch.tensor([0.3, 0.7]), constraint=dist.constraints.simplex)
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(torch.tensor([-1.0, 1.0])[c], 1.0), obs=x)

    def guide(x):
        pass

    return model, guide, (DATA,)


def _unguided_latent():
    def model(x):
        with pyro.plate("data", len(x)):
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z + 0.3 * u, 1.0), obs=x)

    return model, _local_guide(), (DATA,)


_LOG_SUM = "the log of the sum over the guide's enumerated values, not the ELBO"
_NOT_REPARAM = "needs reparameterizable guide sites (the site is sampled, not enumerated)"
_BASELINE = "its score term has a baseline that Trace_ELBO's has not (the values are compared)"
_JACOBIAN = (
    "Pyro's TraceMeanField_ELBO takes KL(Delta ‖ p) = −log p(v), leaving out the "
    "AutoGuide's Jacobian term (log_density); the package's meanfield equals "
    "Trace_ELBO here"
)
_ORDER = (
    "the guide draws a site the model's other site depends on after that site: Pyro's "
    "TraceMeanField_ELBO warns and takes every KL in closed form, the package only the "
    "KLs of sites no later guide site precedes in the model (the others by Monte Carlo)"
)
_UNGUIDED = (
    "Pyro counts log p of a latent the guide leaves to the prior, without its "
    "proposal (and warns); the package cancels both"
)

CASES = [
    Case("plate_local", _plate_local),
    Case("plate_subsample", _plate_subsample),
    Case("plate_unsized", _plate_unsized),
    Case("plate_at_dim_-2", _plate_dim2),
    Case("nested_plates", _nested_plates),
    Case("global_in_an_outer_plate", _global_in_feature_plate),
    Case("sequential_plate_in_data_plate", _iplate_in_data),
    Case("sequential_plate_of_plates", _iplate_of_plates),
    Case("no_plate", _no_plate),
    Case("global_and_local", _global_and_local),
    Case("factor", _factor),
    Case("mask", _mask),
    Case("obs_mask", _obs_mask),
    Case("scale_everywhere", _scaled),
    Case("scale_on_the_likelihood", _scaled_likelihood),
    Case("plate_reuse", _plate_reuse),
    Case("hierarchical_local", _hierarchical_local),
    Case("plate_stack", _plate_stack),
    Case("block_plate", _block_plate, not_comparable={"meanfield": _ORDER}),
    Case("sparse_gamma_def", _sparse_gamma_def),
    Case("autonormal", _autoguide(AutoNormal), not_comparable={"meanfield": _JACOBIAN}),
    Case(
        "autodiagonalnormal",
        _autoguide(AutoDiagonalNormal),
        not_comparable={"meanfield": _JACOBIAN},
    ),
    Case("autodelta", _autoguide(AutoDelta)),
    Case("enum_model_mixture_autodelta", _enum_model_mixture(AutoDelta), enum=True),
    Case(
        "enum_model_mixture_autonormal",
        _enum_model_mixture(AutoNormal),
        enum=True,
        not_comparable={"meanfield": "a closed-form KL where TraceEnum_ELBO samples"},
    ),
    Case(
        "enum_model_nested_plate",
        _enum_model_nested,
        enum=True,
        not_comparable={"meanfield": "a closed-form KL where TraceEnum_ELBO samples"},
    ),
    Case("enum_model_markov_chain", _enum_model_markov, enum=True),
    Case("enum_model_empty_guide", _empty_guide_full_enumeration, enum=True),
    Case(
        "enum_guide_discrete",
        _enum_guide_discrete,
        enum=True,
        not_comparable={name: _LOG_SUM for name in ("iwae", "stl", "dreg")},
    ),
    Case(
        "enum_guide_with_continuous",
        _enum_guide_with_continuous,
        enum=True,
        not_comparable={name: _LOG_SUM for name in ("iwae", "stl", "dreg")}
        | {"meanfield": "a closed-form KL where TraceEnum_ELBO samples"},
    ),
    Case(
        "enum_guide_nested_plates",
        _enum_guide_nested,
        enum=True,
        nesting=2,
        not_comparable={name: _LOG_SUM for name in ("iwae", "stl", "dreg")}
        | {"meanfield": "a closed-form KL where TraceEnum_ELBO samples"},
    ),
    Case("enum_subsampled_bound_zero", _enum_subsampled_bound_zero, enum=True, nesting=1),
    Case(
        "sampled_discrete",
        _sampled_discrete,
        not_comparable={
            "iwae": _NOT_REPARAM,
            "meanfield": _NOT_REPARAM,
            "stl": _NOT_REPARAM,
            "dreg": _NOT_REPARAM,
            "trace-gradient": _BASELINE,
        },
    ),
    Case(
        "unguided_latent", _unguided_latent, not_comparable={name: _UNGUIDED for name in ESTIMATORS}
    ),
]


def _reference(case: Case, name: str):
    if case.enum:
        return TraceEnum_ELBO(max_plate_nesting=case.nesting)
    if name == "meanfield":
        return TraceMeanField_ELBO(max_plate_nesting=case.nesting)
    return Trace_ELBO(max_plate_nesting=case.nesting)


def _params() -> list[torch.Tensor]:
    return [p.unconstrained() for p in pyro.get_param_store().values()]


def _initialize(guide: Callable, args: tuple, seed: int) -> None:
    """Create the guide's parameters (an AutoGuide's, from random initial values) from the
    seed, then reseed: both sides of a cell start from the same parameters and numbers."""
    pyro.set_rng_seed(seed)
    with poutine.block():
        guide(*args)
    pyro.set_rng_seed(seed)


def _run(case: Case, name: str, seed: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    model, guide, args = case.build()
    _initialize(guide, args, seed)
    loss = make_estimator(name, max_plate_nesting=case.nesting).differentiable_loss(
        model, guide, *args
    )
    params = _params()
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else []
    return loss.detach(), list(grads)


def _pyro(case: Case, name: str, seed: int) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    model, guide, args = case.build()
    _initialize(guide, args, seed)
    loss = _reference(case, name).differentiable_loss(model, guide, *args)
    params = _params()
    grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else []
    return loss.detach(), list(grads)


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return (a is None or not a.abs().max() > 1e-6) and (b is None or not b.abs().max() > 1e-6)
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def cell(case: Case, name: str, seed: int = 0) -> tuple[str, str]:
    """The outcome of one estimator on one case, and a line saying why."""
    why = case.not_comparable.get(name)
    pyro.clear_param_store()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours, our_grads = _run(case, name, seed)
    except ConfigError as exc:
        line = str(exc).splitlines()[0]
        return ("n/a" if why else "refused"), line
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if why:
        return "n/a", why
    pyro.clear_param_store()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, their_grads = _pyro(case, name, seed)
    except Exception as exc:
        return "n/a", f"Pyro refuses it: {type(exc).__name__}"
    if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
        return "different", f"loss {ours.item():.6g}, Pyro's {theirs.item():.6g}"
    if name in GRADIENTS and f"{name}-gradient" not in case.not_comparable:
        if len(our_grads) != len(their_grads) or not all(
            _close(a, b) for a, b in zip(our_grads, their_grads)
        ):
            return "different", "the gradients differ from Pyro's"
    return "equal", f"loss {ours.item():.6g}"


def runs(case: Case, name: str, seed: int = 0) -> tuple[str, str]:
    """Whether ``name`` with K = 5 importance samples runs on the case (loss and gradients,
    finite), is refused in one line, or crashes."""
    pyro.clear_param_store()
    model, guide, args = case.build()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _initialize(guide, args, seed)
            loss = make_estimator(
                name, importance_samples=K, max_plate_nesting=case.nesting
            ).differentiable_loss(model, guide, *args)
            if loss.requires_grad:
                loss.backward()
    except ConfigError as exc:
        return "refused", str(exc).splitlines()[0]
    except Exception as exc:
        return "crash", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not torch.isfinite(loss):
        return "crash", f"loss {loss.item()}"
    return "ran", f"loss {loss.item():.6g}"


def matrix(
    cases: list[Case] = CASES, estimators: tuple[str, ...] = ESTIMATORS
) -> dict[str, dict[str, tuple[str, str]]]:
    """Every case through every estimator (``name``) and every importance-weighted one with
    K = 5 (``name/K``)."""
    return {
        case.name: {
            **{name: cell(case, name) for name in estimators},
            **{f"{name}/{K}": runs(case, name) for name in IMPORTANCE_WEIGHTED},
        }
        for case in cases
    }


def acceptance(table: dict[str, dict[str, tuple[str, str]]]) -> tuple[int, int, float]:
    """Cells equal to Pyro, applicable cells (equal or refused), and their ratio."""
    outcomes = [
        outcome for row in table.values() for name, (outcome, _) in row.items() if "/" not in name
    ]
    equal, refused = outcomes.count("equal"), outcomes.count("refused")
    return equal, equal + refused, equal / max(equal + refused, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the table as JSON")
    args = parser.parse_args(argv)
    table = matrix()
    width = max(map(len, table)) + 2
    columns = list(next(iter(table.values())))
    print("case".ljust(width) + "".join(name.ljust(10) for name in columns))
    for case, row in table.items():
        print(case.ljust(width) + "".join(row[name][0].ljust(10) for name in columns))
    equal, applicable, rate = acceptance(table)
    print(f"\naccepted and equal to Pyro: {equal} of {applicable} applicable cells ({rate:.0%})")
    for case, row in table.items():
        for name, (outcome, line) in row.items():
            if outcome in ("refused", "different", "crash"):
                print(f"  {case} / {name}: {outcome}: {line}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cells": table, "equal": equal, "applicable": applicable}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
