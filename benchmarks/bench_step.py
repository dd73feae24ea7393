"""Cost of one SVI step: hand-written torch, the package's fused, traced and compiled steps,
stock Pyro and NumPyro's jit, on the same network, batch and Adam.

Contenders (``--contenders``; each is built on its own copy of the same weights):

``torch``
    A hand-written loop on the VAE's own encoder/decoder modules: ``z = loc + scale * eps``,
    Bernoulli log-likelihood by ``binary_cross_entropy_with_logits``, closed-form KL
    (``meanfield``) or the one-sample ``log q(z|x) - log p(z)`` (``trace``), loss averaged over
    the batch, Adam. The floor: no traces, no distribution objects.
``fused``
    The step of :func:`pyro_vae.fit` for the package's own VAE: the
    :class:`~pyro_vae.train.fused.FusedLoss` of :func:`~pyro_vae.train.fused.training_loss` / B,
    Adam, validation off.
``traced``
    The general path, which every other pair and estimator takes (``fit(..., fused=False)``):
    ``make_estimator(name).differentiable_loss(model, guide, x)`` / B, Adam, validation off.
``pyro``
    What a Pyro user writes: ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO()).step(x)`` (or
    ``TraceMeanField_ELBO``), with Pyro's validation as ``--stock-validation`` says.
``compiled``
    :class:`pyro_vae.train.compiled.CompiledStep` (``fit(..., compile=True)``): loss, gradients
    and Adam's update captured once and compiled by inductor; its first call (the compile) is
    recorded.
``torch_compile``
    The fused loss with encoder, decoder and arithmetic under ``torch.compile`` (the noise drawn
    outside it), checked against the traced path on the same draw (to rounding; by how much is
    recorded).
``numpyro``
    ``SVI.update`` under ``jax.jit``, the same model and guide written with ``numpyro.param``;
    skipped with one message when jax/numpyro are absent (``pip install -e ".[peers]"``).
``baseline`` (``--baseline DIR``)
    The traced step of another copy of the package (e.g. ``git archive COMMIT pyro_vae | tar -x
    -C /tmp/before``, then ``--baseline /tmp/before/pyro_vae``), imported under another name in
    this process, with the same weights.

Rows: a network ``D-H-L`` (``--nets``; more hidden widths as ``D-H1-H2-L``), a batch size and an
estimator (``meanfield``, ``trace``), on the data of ``--data`` (``digits`` or ``mnist``:
binarized training images; ``random``: fixed random binary images). ``--preset svi`` (the
default) times the digits network at B = 20 and 128 with both estimators; ``--preset peers``
times five networks on random data and two users' pairs (a global bias latent on the 64-128-8
VAE; masked sequences), for which only ``traced``, ``compiled`` and ``pyro`` exist, with every
contender and stock Pyro's validation off. ``--rows`` picks rows of the preset by index.

``--elbos iwae`` adds rows of the K-sample importance-weighted bound, K =
``--importance-samples``, on the built-in VAE with ``--activation`` (the IWAE paper's
networks: tanh); there ``torch`` is the bound written out in torch on the same K draws, and
only ``torch``, ``fused``, ``traced``, ``compiled`` and ``baseline`` run.

Before timing, the fused loss and gradients are checked against the traced path's (bit for
bit) and the hand-written ones (to float rounding) on the same draw. Each contender is warmed
up, calibrated to blocks of about ``--block-seconds`` and timed in ``--rounds`` interleaved
rounds (:mod:`harness`); medians of CPU and wall time per step, and the per-round paired ratios.

Modes instead of timing: ``--breakdown`` times nested pieces of one step's forward and backward
pass; ``--profile`` runs one contender's steps under cProfile (``--profiler torch``:
:mod:`torch.profiler`'s operator table); ``--memory`` measures the peak memory of
``--memory-steps`` fused and traced training steps (CPU: a fresh child process's resident-set
high-water mark; CUDA: the allocator's peak).

    python benchmarks/bench_step.py --threads 1                     # digits, B = 20 and 128
    python benchmarks/bench_step.py --data mnist --data-dir DIR --threads 1 --out step.json
    python benchmarks/bench_step.py --preset peers --out benchmarks/results/bench_peers.json
    python benchmarks/bench_step.py --contenders fused torch_compile --threads 1
    python benchmarks/bench_step.py --profile --elbos trace --batch-sizes 128 --threads 1
    python benchmarks/bench_step.py --breakdown --elbos meanfield --batch-sizes 20 --threads 1
    python benchmarks/bench_step.py --memory --elbos meanfield --batch-sizes 128 --threads 1
    python benchmarks/bench_step.py --data mnist --data-dir DIR --nets 784-200-200-50 \
        --activation tanh --elbos iwae --importance-samples 5 --batch-sizes 20 --threads 1
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import argparse
import copy
import functools
import importlib
import importlib.util
import itertools
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness
import peak_memory
import step_pairs

from pyro_vae import VAE, PyroVAEError, make_estimator
from pyro_vae.data.batches import resolve_device
from pyro_vae.data.images import load_dataset
from pyro_vae.models.config import DEVICES
from pyro_vae.models.nets import ACTIVATIONS
from pyro_vae.train import make_optimizer, svi_step
from pyro_vae.train.compiled import CompiledStep
from pyro_vae.train.fused import FusedLoss, training_loss

LABELS = {
    "torch": "hand-written torch",
    "fused": "package, fused path",
    "traced": "package, Pyro-traced path",
    "pyro": "stock Pyro SVI",
    "compiled": "package, compiled step",
    "torch_compile": "fused loss, torch.compile",
    "numpyro": "NumPyro jit",
    "baseline": "baseline package step",
}
CONTENDERS = tuple(name for name in LABELS if name != "baseline")
IMPLEMENTATIONS = ("torch", "fused", "traced", "pyro")  # the default contenders
VAE_ONLY = ("torch", "fused", "torch_compile", "numpyro", "baseline")
PEER_NAMES = {"torch": "hand", "pyro": "stock_pyro", "fused": "eager", "traced": "eager_traced"}
PEER_ORDER = ("numpyro", "torch", "pyro", "fused", "traced", "compiled")
STOCK_ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO}
ELBOS = tuple(STOCK_ELBOS)
#: the importance-weighted bound (``--elbos iwae``, K = ``--importance-samples``): only the
#: hand-written, fused (where the package has one), traced and compiled steps exist for it
IWAE = "iwae"
ESTIMATOR_NAMES = (*ELBOS, IWAE)
IWAE_CONTENDERS = ("torch", "fused", "traced", "compiled", "baseline")
ADAMS = ("fused", "plain")
DATA = ("digits", "mnist", "random")
PIXELS = {"digits": 64, "mnist": 784}
DEFAULT_NETS = {"digits": "64-128-8", "mnist": "784-400-20", "random": "64-128-8"}
PEER_ROWS = (
    ("64-128-8", 128, "meanfield"),
    ("64-128-8", 128, "trace"),
    ("64-128-8", 20, "meanfield"),
    ("784-400-20", 128, "trace"),
    ("784-200-50", 20, "trace"),
    *((pair, None, "trace") for pair in step_pairs.USER_PAIRS),
)
PRESETS = {  # the defaults each preset gives the options
    "svi": {"data": "digits", "contenders": IMPLEMENTATIONS, "stock_validation": "on"},
    "peers": {"data": "random", "contenders": PEER_ORDER, "stock_validation": "off"}
    | {"rounds": 9, "block_seconds": 0.3, "warmup_steps": 5, "min_block_steps": 10},
}
NUMPYRO_SKIPPED = "numpyro skipped: jax/numpyro not installed (pip install -e '.[peers]')"
BASELINE_MODULE = "pyro_vae_baseline"
CHECK_RTOL, CHECK_ATOL = 1e-4, 1e-5
MS_PER_S = 1e3
EXIT_USER_ERROR = 2
NOISY_SPREAD = 2.0  # slowest round / median round above which a timing is flagged as noisy
RANDOM_PIXEL_P = 0.3


class UsageError(Exception):
    """Input the benchmark cannot run with: one line, exit status 2."""


# ----------------------------------------------------------------------------- the problem


def parse_net(text: str) -> tuple[int, tuple[int, ...], int]:
    """``"64-128-8"`` -> (input dim, hidden widths, latent dim)."""
    if not re.fullmatch(r"[1-9]\d*(-[1-9]\d*){2,}", text):
        raise argparse.ArgumentTypeError(f"expected a network D-H-L such as 64-128-8, got {text!r}")
    sizes = [int(size) for size in text.split("-")]
    return sizes[0], tuple(sizes[1:-1]), sizes[-1]


def net_text(text: str) -> str:
    """An argparse type: ``text`` if it is a network ``D-H-L``."""
    parse_net(text)
    return text


@functools.cache
def cached_dataset(name: str, data_dir: str | None):
    """:func:`pyro_vae.data.images.load_dataset`, once per process (callers do not modify it)."""
    return load_dataset(name, data_dir)


def make_data(data: str, input_dim: int, rows: int, seed: int, data_dir: str | None = None):
    """``rows`` binary images of ``input_dim`` pixels: dynamically binarized training images of
    ``data`` ("digits", "mnist") in a seeded random order, or (``"random"``) pixels drawn with
    probability 0.3."""
    generator = torch.Generator().manual_seed(seed)
    if data == "random":
        return torch.bernoulli(torch.full((rows, input_dim), RANDOM_PIXEL_P), generator=generator)
    images = cached_dataset(data, data_dir).train.images
    if images.shape[1] != input_dim:
        raise UsageError(f"{data} images have {images.shape[1]} pixels, the network {input_dim}")
    if rows > images.shape[0]:
        raise UsageError(f"batch size {rows} exceeds the {images.shape[0]} training images")
    order = torch.randperm(images.shape[0], generator=generator)[:rows]
    return torch.bernoulli(images[order], generator=generator)


def build_vae(
    net: str, seed: int, device: torch.device, name: str = "vae", activation: str = "softplus"
) -> VAE:
    """The package's VAE of network ``net`` (``D-H-L``), weights drawn from ``seed``."""
    input_dim, hidden, latent = parse_net(net)
    torch.manual_seed(seed)
    return VAE(input_dim, latent, hidden, name=name, activation=activation).to(device)


@dataclass
class Problem:
    """One row: a pair (``pair.model``, ``pair.guide``), its batch (``args``, ``kwargs``, B
    datapoints out of ``num_data``) and the estimator's name. ``net`` is set for the VAE."""

    label: str
    batch: int
    elbo: str
    pair: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    num_data: int | None = None
    net: str | None = None
    #: K of ``iwae`` (1 for the single-draw estimators)
    importance_samples: int = 1

    def copy(self, name: str) -> torch.nn.Module:
        """An independent copy of the pair, registered in Pyro's param store as ``name``."""
        pair = copy.deepcopy(self.pair)
        pair.name = name
        return pair


def make_problem(row: tuple, config: argparse.Namespace, device: torch.device) -> Problem:
    """The row's pair and batch; Pyro's param store starts empty for it."""
    net, batch, elbo = row
    pyro.clear_param_store()
    if net in step_pairs.USER_PAIRS:
        torch.manual_seed(config.seed)
        pair, args, kwargs, label, batch, num_data = step_pairs.make(net, config.seed)
        return Problem(label, batch, elbo, pair, args, kwargs, num_data)
    x = make_data(config.data, parse_net(net)[0], batch, config.seed, config.data_dir)
    vae = build_vae(net, config.seed, device, activation=getattr(config, "activation", "softplus"))
    k = getattr(config, "importance_samples", 1) if elbo == IWAE else 1
    label = f"{net} K={k}" if elbo == IWAE else net
    return Problem(label, batch, elbo, vae, (x.to(device),), net=net, importance_samples=k)


# ----------------------------------------------------------------------------- contenders


def torch_loss(model: VAE, x: torch.Tensor, elbo: str, k: int = 1) -> torch.Tensor:
    """−ELBO averaged over the batch, written directly in torch (closed forms on purpose: the
    no-distribution-object floor). ``trace`` leaves out the −½ log 2π of log q and log p,
    which cancel; ``iwae`` (:func:`torch_iwae_loss`) is the K-sample bound."""
    if elbo == IWAE:
        return torch_iwae_loss(model, x, k)
    loc, scale = model.encoder(x)
    z = loc + scale * torch.randn_like(loc)
    nll = F.binary_cross_entropy_with_logits(model.decoder(z), x, reduction="none").sum(-1)
    if elbo == "meanfield":
        kl = 0.5 * (loc.square() + scale.square() - 1.0).sum(-1) - scale.log().sum(-1)
    else:
        log_q = (-0.5 * ((z - loc) / scale).square() - scale.log()).sum(-1)
        kl = log_q - (-0.5 * z.square()).sum(-1)
    return (nll + kl).mean()


def torch_iwae_loss(model: VAE, x: torch.Tensor, k: int) -> torch.Tensor:
    """−(the K-sample IWAE bound) averaged over the batch, written directly in torch: K draws
    ``z = loc + scale * eps`` per datapoint (``eps`` ``[K, B, L]``, drawn by the same call as
    the traced path's ``rsample``), the decoder on all K·B at once, log w = log p(x|z) + log
    p(z) − log q(z|x) (the −½ log 2π of log p and log q cancel), logsumexp over K − log K."""
    loc, scale = model.encoder(x)
    eps = torch.empty((k, *loc.shape), dtype=loc.dtype, device=loc.device).normal_()
    z = loc + scale * eps
    logits = model.decoder(z)
    log_lik = -F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    ).sum(-1)
    log_q = (-0.5 * eps.square() - scale.log()).sum(-1)
    log_w = log_lik + (-0.5 * z.square()).sum(-1) - log_q
    return -(torch.logsumexp(log_w, 0) - math.log(k)).mean()


def _adam(model: torch.nn.Module, config: argparse.Namespace) -> torch.optim.Adam:
    """``--adam fused``: :func:`pyro_vae.train.make_optimizer`'s Adam; ``plain``: torch's."""
    if config.adam == "fused":
        return make_optimizer(model.parameters(), config.lr)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def _estimator(problem: Problem, module: Any = None):
    make = make_estimator if module is None else module.make_estimator
    k = {"importance_samples": problem.importance_samples} if problem.elbo == IWAE else {}
    estimator = make(problem.elbo, max_plate_nesting=1, **k)
    if problem.num_data:
        estimator.global_weight = problem.batch / problem.num_data
    return estimator


def _loss_step(problem: Problem, pair, loss, config) -> Callable[[], Any]:
    optimizer = _adam(pair, config)
    args, kwargs, batch = problem.args, problem.kwargs, problem.batch
    return lambda: svi_step(lambda: loss(*args, **kwargs), batch, optimizer)


def torch_step(problem: Problem, pair: VAE, config) -> Callable[[], Any]:
    optimizer, (x,) = _adam(pair, config), problem.args

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch_loss(pair, x, problem.elbo, problem.importance_samples).backward()
        optimizer.step()

    return step


def fused_step(problem: Problem, pair: VAE, config) -> Callable[[], Any]:
    loss = training_loss(pair, _estimator(problem))
    if not isinstance(loss, FusedLoss):
        raise UsageError(f"the package has no fused loss for this VAE with {problem.elbo!r}")
    return _loss_step(problem, pair, loss, config)


def traced_step(problem: Problem, pair, config, estimator=None) -> Callable[[], Any]:
    estimator = _estimator(problem) if estimator is None else estimator
    return _loss_step(problem, pair, training_loss(pair, estimator, fused=False), config)


def pyro_step(problem: Problem, pair, config) -> Callable[[], Any]:
    """Stock Pyro with its own per-parameter Adam, whatever ``--adam`` says."""
    svi = SVI(
        pair.model, pair.guide, pyro.optim.Adam({"lr": config.lr}), STOCK_ELBOS[problem.elbo]()
    )
    return lambda: svi.step(*problem.args, **problem.kwargs)


def compiled_step(problem: Problem, pair, config) -> Callable[[], Any]:
    """The package's compiled step, with plain Adam (what it compiles)."""
    estimator = _estimator(problem)
    loss = training_loss(pair, estimator)
    optimizer = torch.optim.Adam(pair.parameters(), lr=config.lr)

    def eager(args, kwargs, n):
        return svi_step(lambda: loss(*args, **kwargs), n, optimizer)

    step = CompiledStep(pair, estimator, optimizer, loss, eager, log=_log)
    args, kwargs, batch = problem.args, problem.kwargs, problem.batch
    run = lambda: step(args, kwargs, batch)  # noqa: E731
    run.notes = lambda: {"compiled": step.disabled is None}
    return run


def _loss_and_grads(model, loss_fn, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        loss = loss_fn()
    return loss.detach(), list(torch.autograd.grad(loss, list(model.parameters())))


def torch_compile_step(problem: Problem, pair: VAE, config) -> Callable[[], Any]:
    """The fused loss under ``torch.compile`` but for the noise draw; its first call is checked
    against the traced path on the same draw, and the differences are kept in its notes."""
    estimator = _estimator(problem)
    fused, traced = training_loss(pair, estimator), training_loss(pair, estimator, fused=False)

    def loss_at(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        loc, scale = pair.encoder(x)
        return -fused.bound(x, loc, scale, eps).sum(-1)

    compiled = torch.compile(loss_at)

    def loss(x: torch.Tensor) -> torch.Tensor:
        eps = torch.empty((x.shape[0], pair.latent_dim), dtype=x.dtype, device=x.device).normal_()
        return compiled(x, eps)

    (x,), b = problem.args, problem.batch
    start = time.perf_counter()
    value, grads = _loss_and_grads(pair, lambda: loss(x) / b, 0)
    seconds = time.perf_counter() - start
    want, want_grads = _loss_and_grads(pair, lambda: traced(x) / b, 0)
    torch.testing.assert_close(value, want, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    for mine, theirs in zip(grads, want_grads):
        torch.testing.assert_close(mine, theirs, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    check = {
        "first_call_seconds": seconds,
        "loss_abs_difference": (value - want).abs().item(),
        "grad_max_relative_difference": max(
            ((g - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
            for g, w in zip(grads, want_grads)
        ),
    }
    _log(f"torch_compile {problem.elbo:9s} B={b:<4d} vs traced: {check}")
    run = _loss_step(problem, pair, loss, config)
    run.notes = lambda: {"compile_check": check}
    return run


def numpyro_step(problem: Problem, pair: VAE, config) -> Callable[[], Any] | None:
    """NumPyro's jitted ``SVI.update`` on the same network sizes, or None without NumPyro."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import SVI as NSVI
        from numpyro.infer import Trace_ELBO as NTrace
        from numpyro.infer import TraceMeanField_ELBO as NMeanField
    except ImportError:
        return None
    input_dim, hidden, latent = parse_net(problem.net)
    rng = np.random.default_rng(config.seed)

    def init(sizes):
        return [
            jnp.asarray(rng.uniform(-1, 1, shape) / np.sqrt(fan_in), dtype=jnp.float32)
            for fan_in, fan_out in zip(sizes, sizes[1:])
            for shape in ((fan_in, fan_out), (fan_out,))
        ]

    enc0, dec0 = init([input_dim, *hidden, 2 * latent]), init([latent, *hidden[::-1], input_dim])

    def mlp(params, h):
        for i in range(0, len(params), 2):
            h = h @ params[i] + params[i + 1]
            h = jax.nn.softplus(h) if i + 2 < len(params) else h
        return h

    def model(data):
        params = [numpyro.param(f"dec{i}", p) for i, p in enumerate(dec0)]
        with numpyro.plate("data", data.shape[0]):
            z = numpyro.sample("z", ndist.Normal(jnp.zeros(latent), 1.0).to_event(1))
            numpyro.sample("x", ndist.Bernoulli(logits=mlp(params, z)).to_event(1), obs=data)

    def guide(data):
        params = [numpyro.param(f"enc{i}", p) for i, p in enumerate(enc0)]
        with numpyro.plate("data", data.shape[0]):
            loc, raw = jnp.split(mlp(params, data), 2, -1)
            numpyro.sample("z", ndist.Normal(loc, jax.nn.softplus(raw)).to_event(1))

    elbo = NMeanField() if problem.elbo == "meanfield" else NTrace()
    svi = NSVI(model, guide, numpyro.optim.Adam(config.lr), elbo)
    data = jnp.asarray(problem.args[0].cpu().numpy())
    update, state = jax.jit(svi.update), [svi.init(jax.random.PRNGKey(config.seed), data)]

    def step():
        state[0], value = update(state[0], data)
        return value.block_until_ready()

    return step


def load_baseline(path: str) -> Any:
    """The package folder ``path`` imported as :data:`BASELINE_MODULE` next to ``pyro_vae``."""
    init = os.path.join(path, "__init__.py")
    if not os.path.isfile(init):
        raise UsageError(f"--baseline: no Python package in {path!r}")
    spec = importlib.util.spec_from_file_location(
        BASELINE_MODULE, init, submodule_search_locations=[path]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_MODULE] = package
    spec.loader.exec_module(package)
    try:
        importlib.import_module(f"{BASELINE_MODULE}.infer")
    except ModuleNotFoundError as error:  # a copy from before pyro_vae/infer/
        if error.name != f"{BASELINE_MODULE}.infer":
            raise
        importlib.import_module(f"{BASELINE_MODULE}.objectives")
    return package


def baseline_step(problem: Problem, pair: VAE, config) -> Callable[[], Any]:
    """The traced step of the package copy of ``--baseline`` on a twin of ``pair``."""
    package, model = config.baseline_package, pair.config
    twin = package.VAE(
        pair.input_dim,
        model.latent_dim,
        model.hidden,
        model.scale_fn,
        **({"activation": model.activation} if model.activation != "softplus" else {}),
    )
    twin = twin.to(problem.args[0].device)
    twin.load_state_dict(pair.state_dict())
    twin.name = f"{pair.name}-baseline"
    estimators = getattr(package, "infer", None) or package.objectives
    return traced_step(problem, twin, config, _estimator(problem, estimators))


BUILDERS = {
    "torch": torch_step,
    "fused": fused_step,
    "traced": traced_step,
    "pyro": pyro_step,
    "compiled": compiled_step,
    "torch_compile": torch_compile_step,
    "numpyro": numpyro_step,
    "baseline": baseline_step,
}


def validation(name: str, config: argparse.Namespace) -> bool | None:
    """Pyro validation while ``name`` runs: off in the package's loops, ``--stock-validation``
    for stock Pyro, untouched (None) for the loops that use no Pyro."""
    if name in ("torch", "numpyro"):
        return None
    return config.stock_validation == "on" if name == "pyro" else False


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ----------------------------------------------------------------------------- checks, timing


def check_equivalence(problem: Problem, seed: int) -> float:
    """On the same draw the fused loss and gradients (where the package has a fused loss)
    equal the traced path's bit for bit, and :func:`torch_loss`'s equal them to float
    rounding; returns the loss per datapoint."""
    model, (x,), b = (
        problem.copy(f"check-{problem.label}-{problem.elbo}"),
        problem.args,
        problem.batch,
    )
    estimator = _estimator(problem)
    fused, traced = training_loss(model, estimator), training_loss(model, estimator, fused=False)
    want, want_grads = _loss_and_grads(model, lambda: traced(x) / b, seed)
    value, grads = _loss_and_grads(model, lambda: fused(x) / b, seed)
    hand, hand_grads = _loss_and_grads(
        model, lambda: torch_loss(model, x, problem.elbo, problem.importance_samples), seed
    )
    if not (torch.equal(value, want) and all(map(torch.equal, grads, want_grads))):
        raise AssertionError(
            f"{problem.elbo}, B = {b}: the fused loss or gradients differ from the traced path's"
        )
    torch.testing.assert_close(hand, want, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    for mine, theirs in zip(hand_grads, want_grads):
        torch.testing.assert_close(mine, theirs, rtol=CHECK_RTOL, atol=CHECK_ATOL)
    return float(want)


def build_steps(problem: Problem, config: argparse.Namespace) -> dict[str, Callable[[], Any]]:
    """Each contender's step on its own copy of the pair (the VAE-only ones for the VAE)."""
    steps = {}
    for name in config.contenders:
        if name in VAE_ONLY and problem.net is None:
            continue
        if problem.elbo == IWAE and name not in IWAE_CONTENDERS:
            continue
        if name == "fused" and not isinstance(
            training_loss(problem.pair, _estimator(problem)), FusedLoss
        ):
            continue
        pyro.set_rng_seed(config.seed)
        step = BUILDERS[name](problem, problem.copy(f"bench-{name}-{len(steps)}"), config)
        if step is not None:
            steps[name] = step
    return steps


def time_steps(
    steps: dict[str, Callable[[], Any]], config: argparse.Namespace, device: torch.device
) -> tuple[harness.Timings, dict[str, int], dict[str, float]]:
    """The first call of each step (timed), ``--warmup-steps`` more, a calibration to blocks of
    about ``--block-seconds``, then ``--rounds`` interleaved rounds of one block each."""
    flags = {name: validation(name, config) for name in steps}
    sync = _synchronizer(device)

    def use(name: str, _round: int = 0) -> None:
        if flags[name] is not None:
            pyro.enable_validation(flags[name])

    first, counts = {}, {}
    with pyro.validation_enabled(True):  # restores the caller's setting afterwards
        for name, step in steps.items():
            use(name)
            sync()
            start = time.perf_counter()
            step()
            sync()
            first[name] = time.perf_counter() - start
            for _ in range(config.warmup_steps):
                step()
            counts[name] = harness.calibrate(step, config.block_seconds, config.min_block_steps)
        timings = harness.interleave(
            steps,
            config.rounds,
            warmup=config.warmup,
            calls=counts,
            clocks=harness.synced_clocks(sync),
            before=use,
        )
    return timings, counts, first


# ----------------------------------------------------------------------------- ratios, tables

# Ratios reported when both contenders were timed: name -> (numerator, denominator).
RATIOS = {
    f"{top}_over_{bottom}": (top, bottom)
    for top, bottom in (
        ("fused", "torch"),
        ("traced", "torch"),
        ("pyro", "torch"),
        ("fused", "traced"),
        ("compiled", "torch"),
        ("compiled", "fused"),
        ("compiled", "numpyro"),
        ("numpyro", "torch"),
        ("torch_compile", "torch"),
        ("torch_compile", "fused"),
        ("baseline", "torch"),
        ("traced", "baseline"),
        ("fused", "baseline"),
    )
}
CLOCKS = ("cpu", "wall")


def quartile_ratio(top: Sequence[float], bottom: Sequence[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of the per-round ratio (:func:`harness.paired_ratio`)."""
    per_round = harness.paired_ratio(top, bottom)["per_round"]
    if len(per_round) < 2:
        return per_round[0], per_round[0], per_round[0]
    low, middle, high = statistics.quantiles(per_round, n=4, method="inclusive")
    return middle, low, high


def range_ratio(top: Sequence[float], bottom: Sequence[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum over rounds of the per-round ratio."""
    ratio = harness.paired_ratio(top, bottom)
    return ratio["median"], ratio["min"], ratio["max"]


def timing_records(problem: Problem, timings, counts, first) -> list[dict[str, Any]]:
    records = []
    for name in timings.cpu:
        wall, cpu = timings.wall[name], timings.cpu[name]
        middle = statistics.median(wall)
        records.append(
            {
                "net": problem.label,
                "elbo": problem.elbo,
                "batch_size": problem.batch,
                "implementation": name,
                "steps_per_block": counts[name],
                "median_ms": middle * MS_PER_S,
                "min_ms": min(wall) * MS_PER_S,
                "spread": max(wall) / middle if middle > 0 else math.inf,
                "rounds_ms": [s * MS_PER_S for s in wall],
                "cpu_median_ms": statistics.median(cpu) * MS_PER_S,
                "first_call_s": first[name],
                "cpu_rounds_ms": [s * MS_PER_S for s in cpu],
            }
        )
    return records


def summary_row(problem: Problem, timings: harness.Timings) -> dict[str, Any]:
    """Medians (``{impl}_ms`` wall, ``{impl}_cpu_ms`` CPU) and each ratio of :data:`RATIOS`: of
    wall medians (``name``), of CPU medians (``name_cpu``) and the per-round CPU ratio's median
    and quartiles (``name_paired_cpu``, ``name_paired_cpu_quartiles``); ``paired``: every
    contender's per-round ratios to the hand-written step (:func:`harness.ratios`)."""
    wall = {name: timings.median(name, "wall") for name in timings.cpu}
    cpu = {name: timings.median(name, "cpu") for name in timings.cpu}
    row = {"net": problem.label, "elbo": problem.elbo, "batch_size": problem.batch}
    row.update({f"{name}_ms": value * MS_PER_S for name, value in wall.items()})
    row.update({f"{name}_cpu_ms": value * MS_PER_S for name, value in cpu.items()})
    pairs = {k: (a, b) for k, (a, b) in RATIOS.items() if a in wall and b in wall}
    for key, (top, bottom) in pairs.items():
        row[key] = wall[top] / wall[bottom]
        row[f"{key}_cpu"] = cpu[top] / cpu[bottom]
        middle, low, high = quartile_ratio(timings.cpu[top], timings.cpu[bottom])
        row[f"{key}_paired_cpu"], row[f"{key}_paired_cpu_quartiles"] = middle, [low, high]
        _, low, high = range_ratio(timings.cpu[top], timings.cpu[bottom])
        row[f"{key}_paired_cpu_range"] = [low, high]
    baseline = "torch" if "torch" in wall else next(iter(wall))
    row["paired"] = {"baseline": baseline, "ratios": harness.ratios(timings, baseline)}
    return row


def peer_row(problem: Problem, timings: harness.Timings, first, notes) -> dict[str, Any]:
    """The row as ``bench_peers.json`` holds it: wall-clock ms per step by the peers' names,
    the ratio of each to the compiled step, and the compile's seconds."""
    ms = {
        PEER_NAMES.get(name, name): timings.median(name, "wall") * MS_PER_S
        for name in PEER_ORDER
        if name in timings.wall
    }
    row = {"net": problem.label, "batch": problem.batch, "elbo": problem.elbo, "ms": ms}
    if "compiled" in ms:
        row["ratio_to_compiled"] = {name: value / ms["compiled"] for name, value in ms.items()}
        row["compile_s"] = first["compiled"]
    row.update(notes.get("compiled", {}))
    return row


def format_paired(row: dict[str, Any], name: str) -> str:
    low, high = row[f"{name}_paired_cpu_range"]
    return f"{row[f'{name}_paired_cpu']:.2f}× ({low:.2f}–{high:.2f})"


def markdown_table(rows: Sequence[dict[str, Any]], clock: str = "cpu") -> str:
    """ms per step and ratios: ``cpu``, CPU-time medians and the per-round ratios' median
    (quartiles); ``wall``, wall-clock medians and ratios of medians. Blank: not timed."""
    names = [name for name in LABELS if any(f"{name}_ms" in row for row in rows)]
    ratios = [key for key in RATIOS if any(key in row for row in rows)]
    header = (
        "| net | ELBO | B | "
        + " | ".join(
            [f"{LABELS[name]} ms" for name in names] + [r.replace("_over_", " / ") for r in ratios]
        )
        + " |"
    )
    title = (
        "CPU time: medians, and per-round ratios' median (min–max)"
        if clock == "cpu"
        else "wall clock: medians and ratios of medians"
    )
    lines = [title, "", header, "|" + "---|" * (header.count("|") - 1)]
    suffix = "_cpu_ms" if clock == "cpu" else "_ms"
    for row in rows:
        times = [f"{row[n + suffix]:.3f}" if n + suffix in row else "" for n in names]
        cells = [
            ("" if r not in row else format_paired(row, r) if clock == "cpu" else f"{row[r]:.2f}×")
            for r in ratios
        ]
        lines.append(
            "| "
            + " | ".join([row["net"], row["elbo"], str(row["batch_size"]), *times, *cells])
            + " |"
        )
    return "\n".join(lines)


def package_estimators(elbos: Sequence[str]) -> dict[str, str]:
    """The class behind each ``make_estimator(name)``: what the traced path measured."""
    classes = {name: type(make_estimator(name, max_plate_nesting=1)) for name in elbos}
    return {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in classes.items()}


def environment(device: torch.device, elbos: Sequence[str]) -> dict[str, Any]:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "package_estimators": package_estimators(elbos),
        "load_average": harness.load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ----------------------------------------------------------------------------- the timing run


def run_benchmark(config: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Time every contender on every row; the JSON report (written after each row)."""
    session = harness.Session()
    report: dict[str, Any] = {"rows": [], "summary": [], "timings": [], "compile_checks": {}}
    for row in config.rows:
        problem = make_problem(row, config, device)
        if config.check and problem.net is not None:
            value = check_equivalence(problem, config.seed)
            fused = isinstance(training_loss(problem.pair, _estimator(problem)), FusedLoss)
            _log(
                f"check {problem.label} {problem.elbo:9s} B={problem.batch:<4d} "
                + ("fused == traced (bit for bit), " if fused else "")
                + f"torch == traced (to rounding): loss/B {value:.4f}"
            )
        steps = build_steps(problem, config)
        load = harness.load_average()
        if not steps:
            _log(f"{problem.label}: none of the contenders runs on this pair; row skipped")
            continue
        timings, counts, first = time_steps(steps, config, device)
        notes = {name: step.notes() for name, step in steps.items() if hasattr(step, "notes")}
        if "torch_compile" in notes:
            key = f"{problem.label}/{problem.elbo}/{problem.batch}"
            report["compile_checks"][key] = notes["torch_compile"]["compile_check"]
        report["rows"].append(peer_row(problem, timings, first, notes))
        report["summary"].append(summary_row(problem, timings))
        report["timings"] += timing_records(problem, timings, counts, first)
        peers = report["rows"][-1]
        cells = "  ".join(f"{name} {value:.3f}" for name, value in peers["ms"].items())
        compile_s = f"  (compile {peers['compile_s']:.1f} s)" if "compile_s" in peers else ""
        print(f"{peers['net']}, {peers['batch']}, {peers['elbo']}: ms/step  {cells}{compile_s}")
        for top, bottom in (("compiled", "numpyro"), ("compiled", "torch")):
            if top in timings.cpu and bottom in timings.cpu:
                ratio = harness.paired_ratio(timings.cpu[top], timings.cpu[bottom])
                print(
                    f"  {top} / {bottom}, CPU time per round: {harness.format_ratio(ratio)} "
                    f"over {len(ratio['per_round'])} rounds; load {_load_text(load)} -> "
                    f"{_load_text(harness.load_average())}"
                )
        if config.out:
            harness.write_json(config.out, finished(report, session, config, device, final=False))
    return finished(report, session, config, device)


def finished(report, session, config, device, final: bool = True) -> dict[str, Any]:
    """``report`` with the run's settings, machine and load averages."""
    if final:
        session.finish()
    return {
        **report,
        "config": {key: value for key, value in vars(config).items() if _plain(value)},
        "environment": environment(device, config.elbos or ELBOS),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
        "load": harness.load_average(),
        "load_average": {
            "start": session.load_start,
            "end": session.load_end if final else harness.load_average(),
        },
    }


def _load_text(load: list[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{value:.2f}" for value in load)


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def print_tables(report: dict[str, Any], config: argparse.Namespace, device) -> None:
    if not report["summary"]:
        return
    print(
        f"\nSVI step, {config.data} data, {device}, {torch.get_num_threads()} threads, "
        f"{config.adam} Adam; medians of {config.rounds} interleaved rounds; load average "
        f"{_load_text(report['load_average']['start'])} at start, "
        f"{_load_text(report['load_average']['end'])} at end"
    )
    for name, cls in report["environment"]["package_estimators"].items():
        print(f"traced path {name}: make_estimator({name!r}, max_plate_nesting=1) -> {cls}")
    for clock in CLOCKS:
        print()
        print(markdown_table(report["summary"], clock))
    noisy = [t for t in report["timings"] if t["spread"] > NOISY_SPREAD]
    if noisy:
        _log(
            f"\nwarning: {len(noisy)} of {len(report['timings'])} timings had a round over "
            f"{NOISY_SPREAD:g}x their median (machine busy?); consider rerunning, or "
            "--threads 1 on a shared machine"
        )


# ----------------------------------------------------------------------------- breakdown


def graph_nodes(loss: torch.Tensor) -> int:
    """The number of autograd nodes behind ``loss`` (what backward walks)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(parent for parent, _ in node.next_functions)
    return len(seen)


def breakdown_parts(model: VAE, x: torch.Tensor, elbo: str) -> dict[str, Callable[[], Any]]:
    """Nested pieces of one step's forward and backward pass, cheapest first."""
    from pyro import poutine

    from pyro_vae.core.traces import trace_pair

    estimator = make_estimator(elbo, max_plate_nesting=1)
    traced, fused = training_loss(model, estimator, fused=False), training_loss(model, estimator)
    hidden = functools.partial(poutine.block, hide_types=["param"])

    def networks() -> None:
        loc, scale = model.encoder(x)
        model.decoder(loc + scale * torch.randn_like(loc))

    return {
        "the two networks (encoder, one draw, decoder)": networks,
        "hand-written loss, forward": lambda: torch_loss(model, x, elbo),
        "model and guide, no effect handler": lambda: (model.guide(x), model.model(x)),
        "model and guide, traced (trace_pair)": lambda: trace_pair(
            hidden(model.model), hidden(model.guide), (x,), {}
        ),
        "fused loss, forward": lambda: fused(x),
        "traced loss, forward": lambda: traced(x),
        "hand-written loss, forward + backward": lambda: torch_loss(model, x, elbo).backward(),
        "fused loss, forward + backward": lambda: (fused(x) / x.shape[0]).backward(),
        "traced loss, forward + backward": lambda: (traced(x) / x.shape[0]).backward(),
    }


def run_breakdown(config: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median µs of CPU time of each :func:`breakdown_parts` piece in interleaved rounds
    (validation off; no optimizer step: it is the same in every loop), and graph sizes."""
    report = {}
    for problem in vae_problems(config, device):
        model, (x,), elbo = problem.copy("breakdown"), problem.args, problem.elbo
        with pyro.validation_enabled(False):
            timings = harness.interleave(
                breakdown_parts(model, x, elbo),
                config.rounds,
                warmup=config.min_block_steps,
                calls=max(1, config.profile_steps // 2),
                clocks=harness.synced_clocks(_synchronizer(device)),
            )
            model.zero_grad(set_to_none=True)
            estimator = make_estimator(elbo, max_plate_nesting=1)
            sizes = {
                "hand-written": graph_nodes(torch_loss(model, x, elbo)),
                "fused": graph_nodes(training_loss(model, estimator)(x) / x.shape[0]),
                "traced": graph_nodes(training_loss(model, estimator, fused=False)(x) / x.shape[0]),
            }
        key = f"{problem.label}/{elbo}/{problem.batch}"
        report[key] = {name: timings.median(name) * 1e6 for name in timings.cpu}
        print(f"\n{key}: median µs of CPU time, {config.rounds} rounds")
        for name, micros in report[key].items():
            print(f"  {name:45s} {micros:9.1f}")
        print("  autograd nodes of the loss: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
        report[key]["autograd_nodes"] = sizes
    return report


def vae_problems(config: argparse.Namespace, device: torch.device):
    for row in config.rows:
        if row[0] not in step_pairs.USER_PAIRS:
            yield make_problem(row, config, device)


# ----------------------------------------------------------------------------- profile

# Profile landmarks: "label|filename suffix|function name". Cumulative times overlap.
LANDMARKS = tuple(
    tuple(entry.split("|"))
    for entry in (
        "SVI.step|pyro/infer/svi.py|step",
        "ELBO differentiable_loss|pyro/infer/trace_elbo.py|differentiable_loss",
        "ELBO loss_and_grads|pyro/infer/trace_elbo.py|loss_and_grads",
        "package fused loss|pyro_vae/train/fused.py|__call__",
        "package estimator differentiable_loss|pyro_vae/infer/elbo.py|differentiable_loss",
        "  vectorized_log_probs (particle plate)|pyro_vae/core/log_probs.py|vectorized_log_probs",
        "  get_importance_trace|pyro/infer/enum.py|get_importance_trace",
        "    run guide, replay model under poutine.trace|pyro/poutine/trace_messenger.py|get_trace",
        "    Trace.compute_log_prob|pyro/poutine/trace_struct.py|compute_log_prob",
        "    Trace.compute_score_parts|pyro/poutine/trace_struct.py|compute_score_parts",
        "    pyro.sample|pyro/primitives.py|sample",
        "    plate messenger|pyro/poutine/plate_messenger.py|_process_message",
        "    register_module (pyro.param per weight)|pyro_vae/models/vae.py|register_module",
        "      pyro.param|pyro/primitives.py|param",
        "    encoder / decoder forward|pyro_vae/models/nets.py|forward",
        "    distribution __init__ (torch)|torch/distributions/distribution.py|__init__",
        "    kl_divergence|torch/distributions/kl.py|kl_divergence",
        "    validation: check_model_guide_match|pyro/util.py|check_model_guide_match",
        "    validation: check_site_shape|pyro/util.py|check_site_shape",
        "    validation: _validate_sample|torch/distributions/distribution.py|_validate_sample",
        "  pyro.optim per-parameter optimizers|pyro/optim/optim.py|__call__",
        "  Tensor.backward|torch/_tensor.py|backward",
        "  Adam.step|torch/optim/adam.py|step",
        "  Optimizer.zero_grad|torch/optim/optimizer.py|zero_grad",
    )
)


def landmark_shares(stats, total: float) -> list[tuple[str, float, int]]:
    """Cumulative share of ``total`` and calls of each landmark; a match called by another
    match (a nested ``get_trace``) is inside its caller and is skipped."""
    found = []
    for label, suffix, name in LANDMARKS:
        matches = {
            key
            for key in stats.stats
            if key[2] == name and key[0].replace(os.sep, "/").endswith(suffix)
        }
        outer = [key for key in matches if not matches & set(stats.stats[key][4])]
        if outer:
            cumulative = sum(stats.stats[key][3] for key in outer)
            found.append((label, cumulative / total, sum(stats.stats[key][1] for key in outer)))
    return found


def _steps(step: Callable[[], Any], n: int, sync: Callable[[], None]) -> None:
    for _ in range(n):
        step()
    sync()


def run_profile(config: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """``--profile-steps`` steps of ``--profile-impl`` under cProfile (or torch.profiler) for
    every VAE row, next to the same steps' unprofiled median time."""
    import cProfile
    import pstats

    impl, sync, report = config.profile_impl, _synchronizer(device), {}
    for problem in vae_problems(config, device):
        step = BUILDERS[impl](problem, problem.copy(f"profile-{impl}"), config)
        if step is None:
            raise UsageError(NUMPYRO_SKIPPED)
        flag = validation(impl, config)
        with pyro.validation_enabled(True if flag is None else flag):
            timings = harness.interleave(
                {impl: step},
                1,
                warmup=config.warmup_steps,
                calls=config.profile_steps,
                clocks=harness.synced_clocks(sync),
            )
            unprofiled = timings.median(impl, "wall")
            key, title = f"{problem.label}/{problem.elbo}/{problem.batch}", f"{LABELS[impl]}, "
            title += f"{problem.label}, {problem.elbo}, B={problem.batch}"
            if config.profiler == "torch":
                report[key] = torch_profile(step, config, sync, device, title, unprofiled)
                continue
            profiler = cProfile.Profile()
            profiler.enable()
            _steps(step, config.profile_steps, sync)
            profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stdout)
        total, n = stats.total_tt, config.profile_steps
        print(
            f"\n## {title}: {n} steps, {unprofiled * MS_PER_S:.3f} ms/step unprofiled, "
            f"{total / n * MS_PER_S:.3f} ms/step under cProfile\n"
        )
        stats.sort_stats(config.profile_sort).print_stats(config.profile_top)
        shares = landmark_shares(stats, total)
        print("share of the profiled step (cumulative; nested rows overlap):")
        for label, share, calls in shares:
            print(f"  {label:45s} {share:6.1%}  ({calls / n:.0f} calls/step)")
        report[key] = {
            "unprofiled_ms": unprofiled * MS_PER_S,
            "profiled_ms": total / n * MS_PER_S,
            "landmarks": {label.strip(): share for label, share, _ in shares},
        }
    return report


def torch_profile(step, config, sync, device, title: str, unprofiled: float) -> dict[str, Any]:
    """The steps under :mod:`torch.profiler` (CPU, and CUDA on a GPU): the operators with the
    largest self time per step, as torch's own table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _steps(step, config.profile_steps, sync)
    events = prof.key_averages()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    n = config.profile_steps
    print(
        f"\n## {title}: {n} steps, {unprofiled * MS_PER_S:.3f} ms/step unprofiled; operators "
        f"by {key.replace('_', ' ')} (all steps)\n"
    )
    print(events.table(sort_by=key, row_limit=config.profile_top))
    top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[: config.profile_top]
    return {
        "unprofiled_ms": unprofiled * MS_PER_S,
        "operators_self_us_per_step": {e.key: getattr(e, key) / n for e in top},
        "total_self_us_per_step": sum(getattr(e, key) for e in events) / n,
    }


# ----------------------------------------------------------------------------- memory


def memory_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of ``spec["steps"]`` training steps of ``spec["path"]`` in this process."""
    device = resolve_device(spec["device"])
    harness.set_threads(spec["threads"])
    config = argparse.Namespace(**spec)
    problem = make_problem((spec["net"], spec["batch"], spec["elbo"]), config, device)
    pair = problem.copy("memory")
    step = MEMORY_PATHS[spec["path"]](problem, pair, config)

    def work() -> None:
        with pyro.validation_enabled(False):
            for _ in range(spec["steps"]):
                step()

    peak, method = peak_memory.peak_bytes(work, device)
    params = sum(p.numel() * p.element_size() for p in pair.parameters())
    return {
        **spec,
        "peak_bytes": peak,
        "peak_mib": peak / peak_memory.MIB,
        "method": method,
        "parameter_bytes": params,
    }


MEMORY_PATHS = {"fused": fused_step, "traced": traced_step, "torch": torch_step}


def run_memory(config: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """:func:`memory_probe` of the fused and the traced path for every VAE row (``iwae``: the
    hand-written and the traced step, and the fused one where the package has it), each in a
    fresh child process on the CPU."""
    training = []
    keys = ("data", "data_dir", "seed", "adam", "lr", "device", "threads")
    keys += ("activation", "importance_samples")
    for net, batch, elbo in config.rows:
        if net in step_pairs.USER_PAIRS:
            continue
        paths = ("fused", "traced")
        if elbo == IWAE:
            problem = make_problem((net, batch, elbo), config, device)
            fused = isinstance(training_loss(problem.pair, _estimator(problem)), FusedLoss)
            paths = ("torch", "fused", "traced") if fused else ("torch", "traced")
        for path in paths:
            spec = {key: getattr(config, key) for key in keys}
            spec.update(net=net, batch=batch, elbo=elbo, path=path, steps=config.memory_steps)
            probe = peak_memory.probe(Path(__file__), spec, device, memory_probe)
            training.append(probe)
            print(
                f"memory: {probe['steps']} training steps, {path} path, {net}, {elbo}"
                + (f" K={config.importance_samples}" if elbo == IWAE else "")
                + f", B = {batch}: {probe['peak_mib']:.1f} MiB above the start ({probe['method']}; "
                f"parameters {probe['parameter_bytes'] / peak_memory.MIB:.1f} MiB)"
            )
    return {"training": training}


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        parents=[harness.parent_parser(rounds=21, warmup=1, threads=1)],
    )
    p.add_argument("--preset", choices=tuple(PRESETS), default="svi", help="rows and contenders")
    p.add_argument(
        "--data", choices=DATA, help="digits (svi), mnist (--data-dir) or random (peers)"
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (--data mnist)")
    p.add_argument("--nets", nargs="+", type=net_text, metavar="D-H-L", help="e.g. 64-128-8")
    p.add_argument("--batch-sizes", nargs="+", type=harness.positive_int, metavar="B")
    p.add_argument(
        "--elbos",
        nargs="+",
        choices=ESTIMATOR_NAMES,
        help="estimators (default trace meanfield; iwae: K = --importance-samples)",
    )
    p.add_argument(
        "--importance-samples",
        type=harness.positive_int,
        default=5,
        metavar="K",
        help="K of the iwae rows (5)",
    )
    p.add_argument(
        "--activation",
        choices=tuple(ACTIVATIONS),
        default="softplus",
        help="the built-in VAE's activation (softplus; the IWAE paper's nets: tanh)",
    )
    p.add_argument("--rows", nargs="+", type=harness.whole_int, metavar="I", help="preset rows")
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        metavar="NAME",
        help=f"what to time, of {', '.join(CONTENDERS)} (default: the preset's)",
    )
    p.add_argument("--baseline", metavar="DIR", help="also time the package copy in DIR")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--adam",
        choices=ADAMS,
        default="fused",
        help="the torch.optim.Adam of torch, fused, traced: fused=True as "
        "pyro_vae.train builds it, or plain (default fused)",
    )
    p.add_argument("--stock-validation", choices=("on", "off"), help="Pyro validation for pyro")
    p.add_argument("--warmup-steps", type=harness.whole_int, default=20)
    p.add_argument(
        "--block-seconds",
        type=float,
        default=0.05,
        help="target length of one timed block of steps (0.05)",
    )
    p.add_argument("--min-block-steps", type=harness.positive_int, default=5)
    p.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the fused-vs-traced and torch-vs-traced checks",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--breakdown", action="store_true", help="time pieces of one step instead")
    mode.add_argument("--profile", action="store_true", help="profile one contender instead")
    mode.add_argument("--memory", action="store_true", help="peak memory of training steps instead")
    p.add_argument("--profiler", choices=("cprofile", "torch"), default="cprofile")
    p.add_argument("--profile-impl", choices=tuple(BUILDERS)[:-1], default="traced")
    p.add_argument("--profile-steps", type=harness.positive_int, default=300)
    p.add_argument("--profile-top", type=harness.positive_int, default=25)
    p.add_argument("--profile-sort", choices=("cumulative", "tottime"), default="cumulative")
    p.add_argument("--memory-steps", type=harness.positive_int, default=20)
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, the preset's defaults under the ones given, and the rows to run."""
    p = _parser()
    preset = p.parse_known_args(argv)[0].preset
    p.set_defaults(**PRESETS[preset])
    config = p.parse_args(argv)
    harness.check_out(p, config.out)
    if config.memory_probe:
        return config
    if config.data == "mnist" and config.data_dir is None and "PYRO_VAE_DATA_DIR" not in os.environ:
        p.error("--data mnist needs --data-dir (or $PYRO_VAE_DATA_DIR)")
    nets = config.nets or [DEFAULT_NETS[config.data]]
    wrong = [net for net in nets if parse_net(net)[0] != PIXELS.get(config.data, parse_net(net)[0])]
    if wrong:
        p.error(f"--nets: {config.data} images have {PIXELS[config.data]} pixels, not {wrong}")
    if preset == "peers" and not (config.nets or config.batch_sizes or config.elbos):
        rows = list(PEER_ROWS)
    else:
        grid = itertools.product(nets, config.elbos or ELBOS, config.batch_sizes or (20, 128))
        rows = [(net, b, elbo) for net, elbo, b in grid]
    if config.rows:
        if max(config.rows) >= len(rows):
            p.error(f"--rows: the rows are 0-{len(rows) - 1}")
        rows = [rows[i] for i in config.rows]
    config.rows = rows
    if config.baseline:
        config.contenders = (*config.contenders, "baseline")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; bad input (data, device, a baseline folder) gives one line and
    exit status 2."""
    config = parse_args(argv)
    try:
        return _main(config)
    except (PyroVAEError, UsageError, peak_memory.ProbeError) as exc:
        print(f"bench_step: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(config: argparse.Namespace) -> int:
    if config.memory_probe:
        peak_memory.answer(memory_probe(json.loads(config.memory_probe)))
        return 0
    harness.set_threads(config.threads)
    device = resolve_device(config.device)
    if "numpyro" in config.contenders and importlib.util.find_spec("numpyro") is None:
        _log(NUMPYRO_SKIPPED)
        config.contenders = tuple(name for name in config.contenders if name != "numpyro")
    if config.baseline:
        config.baseline_package = load_baseline(config.baseline)
    if config.breakdown:
        report = {"breakdown": run_breakdown(config, device)}
    elif config.profile:
        report = {"profile": run_profile(config, device)}
    elif config.memory:
        report = {"memory": run_memory(config, device)}
    else:
        report = run_benchmark(config, device)
        print_tables(report, config, device)
    if config.out:
        if "rows" not in report or "config" not in report:
            report = {
                **report,
                "config": {k: v for k, v in vars(config).items() if _plain(v)},
                "environment": environment(device, config.elbos or ELBOS),
            }
        harness.write_json(config.out, report)
        print(f"\nwrote {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
