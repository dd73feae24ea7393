"""One SVI step, side by side: NumPyro's jit, hand-written eager PyTorch, stock Pyro, and the
package's eager (fused and traced) and compiled steps, on the same network, batch and Adam.

The network: a one-hidden-layer MLP encoder D-H-2L (softplus) giving a diagonal Gaussian guide,
and a mirrored decoder L-H-D giving Bernoulli logits; prior N(0, I); Adam, lr 1e-3. ``meanfield``
is the ELBO with the closed-form KL, ``trace`` the single-sample Monte Carlo ELBO. The data are
fixed random binary images (timing does not depend on their values). Every implementation
runs in this process, one thread each (``torch.set_num_threads(1)``, XLA's CPU client limited
to one thread), in interleaved rounds whose order rotates; the median milliseconds per step
over the rounds is reported, with the ratio of each to the compiled step.

Implementations:

``numpyro``  ``SVI.update`` under ``jax.jit`` (the step of NumPyro's own tutorials), the
             same model and guide written with ``numpyro.param``; skipped with a message when
             jax/numpyro are absent (``pip install -e ".[peers]"``).
``hand``     the loss written out in torch (reparameterized draw, BCE with logits, closed-form
             or Monte Carlo KL), ``torch.optim.Adam(fused=True)``.
``stock_pyro``  ``pyro.infer.SVI(model, guide, pyro.optim.Adam, Trace_ELBO or
             TraceMeanField_ELBO).step``, validation off.
``eager``    the package's step as :func:`pyro_vae.fit` takes it without ``compile``: the fused
             loss for the built-in VAE (``eager_traced``: through Pyro's traces, the path of
             every other pair), Adam.
``compiled`` :class:`pyro_vae.train.compiled.CompiledStep` (``fit(..., compile=True)``): loss,
             gradients and Adam's update captured once and compiled with inductor; its compile
             seconds are reported.

    python benchmarks/bench_peers.py --out benchmarks/results/bench_peers.json
    python benchmarks/bench_peers.py --rows 0 --rounds 3            # one row, quickly
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)

import numpy as np
import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

from pyro_vae import VAE
from pyro_vae.infer import make_estimator
from pyro_vae.train import svi_step
from pyro_vae.train.compiled import CompiledStep
from pyro_vae.train.fused import training_loss

ROWS = [  # (data dim, hidden, latent, batch, estimator)
    (64, 128, 8, 128, "meanfield"),
    (64, 128, 8, 128, "trace"),
    (64, 128, 8, 20, "meanfield"),
    (784, 400, 20, 128, "trace"),
    (784, 200, 50, 20, "trace"),
]
LR = 1e-3
USER_ROWS = ["global latent", "sequences"]


class GlobalBiasVAE(torch.nn.Module):
    """A user-style pair with a global latent: the 64-128-8 VAE whose decoder output bias
    b ~ N(0, I) is shared by all datapoints, with a Gaussian guide q(b) of its own."""

    def __init__(self, d: int = 64, h: int = 128, latent: int = 8):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(d, h), torch.nn.Softplus(), torch.nn.Linear(h, 2 * latent)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, h), torch.nn.Softplus(), torch.nn.Linear(h, d)
        )
        self.q_bias = torch.nn.Parameter(torch.zeros(2, d))
        self.latent = latent

    def model(self, x):
        import pyro.distributions as dist

        pyro.module("global_vae", self)
        bias = pyro.sample("bias", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            logits = self.decoder(z) + bias.unsqueeze(-2)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        import pyro.distributions as dist

        pyro.module("global_vae", self)
        pyro.sample("bias", dist.Normal(self.q_bias[0], F.softplus(self.q_bias[1])).to_event(1))
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))


class MaskedSequences(torch.nn.Module):
    """A user-style sequence pair on padded batches with a mask: z ~ N(0, I),
    x_t ~ N(MLP(z)_t, 0.3²) on the real steps; guide q(z | x, mask) from an MLP of the masked
    sequence and its length."""

    def __init__(self, steps: int = 20, h: int = 64, latent: int = 4):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(2 * steps, h), torch.nn.Softplus(), torch.nn.Linear(h, 2 * latent)
        )
        self.decoder = torch.nn.Sequential(
            torch.nn.Linear(latent, h), torch.nn.Softplus(), torch.nn.Linear(h, steps)
        )
        self.latent = latent

    def model(self, x, mask):
        import pyro.distributions as dist

        pyro.module("sequences", self)
        with pyro.plate("sequences", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.3).mask(mask).to_event(1), obs=x)

    def guide(self, x, mask):
        import pyro.distributions as dist

        pyro.module("sequences", self)
        with pyro.plate("sequences", x.shape[0]):
            inputs = torch.cat([x * mask, mask.to(x.dtype)], -1)
            loc, raw = self.encoder(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))


def user_row(name: str, rounds: int, block_s: float) -> dict:
    """A user's pair: the package eager (traced, the only path such a pair has), compiled, and
    stock Pyro's SVI on the same pair; NumPyro and hand-written torch would be other programs."""
    from pyro.infer import SVI, Trace_ELBO

    g = torch.Generator().manual_seed(1)
    if name == "global latent":
        make = GlobalBiasVAE
        args, kwargs = (torch.bernoulli(torch.full((128, 64), 0.3), generator=g),), {}
        net, batch, num_data = "64-128-8 + global bias", 128, 1797
    else:
        make = MaskedSequences
        lengths = torch.randint(2, 21, (32,), generator=g)
        mask = torch.arange(20)[None, :] < lengths[:, None]
        args, kwargs = (), {"x": torch.randn(32, 20, generator=g) * mask, "mask": mask}
        net, batch, num_data = "sequences T=20, 20-64-4", 32, 32
    steps, notes = {}, {}
    for impl in ("eager_traced", "compiled", "stock_pyro"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        pair = make()
        if impl == "stock_pyro":
            svi = SVI(pair.model, pair.guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
            steps[impl] = lambda svi=svi: svi.step(*args, **kwargs)
            continue
        estimator = make_estimator("trace", max_plate_nesting=1)
        estimator.global_weight = batch / num_data
        loss = training_loss(pair, estimator)
        optimizer = torch.optim.Adam(pair.parameters(), lr=LR)

        def eager(a, k, n, loss=loss, optimizer=optimizer):
            return svi_step(lambda: loss(*a, **k), n, optimizer)

        if impl == "compiled":
            step = CompiledStep(
                pair, estimator, optimizer, loss, eager, log=lambda m: print(m, file=sys.stderr)
            )
            start = time.perf_counter()
            with pyro.validation_enabled(False):
                step(args, kwargs, batch)
            notes["compile_s"] = time.perf_counter() - start
            notes["compiled"] = step.disabled is None
            steps[impl] = lambda step=step: step(args, kwargs, batch)
        else:
            steps[impl] = lambda eager=eager: eager(args, kwargs, batch)
    ms = _interleave(steps, rounds, block_s)
    return {
        "net": net,
        "batch": batch,
        "elbo": "trace",
        "ms": ms,
        "ratio_to_compiled": {n: v / ms["compiled"] for n, v in ms.items()},
        **notes,
    }


def package_steps(d: int, h: int, latent: int, x: torch.Tensor, elbo: str):
    steps, notes = {}, {}
    for name in ("eager", "eager_traced", "compiled"):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = VAE(d, latent_dim=latent, hidden=(h,), activation="softplus")
        estimator = make_estimator(elbo, max_plate_nesting=1)
        loss = training_loss(model, estimator, fused=name != "eager_traced")
        if name == "compiled":
            optimizer = torch.optim.Adam(model.parameters(), lr=LR)

            def eager(args, kwargs, n, loss=loss, optimizer=optimizer):
                return svi_step(lambda: loss(*args, **kwargs), n, optimizer)

            step = CompiledStep(
                model, estimator, optimizer, loss, eager, log=lambda m: print(m, file=sys.stderr)
            )
            start = time.perf_counter()
            step((x,), {}, x.shape[0])
            notes["compile_s"] = time.perf_counter() - start
            notes["compiled"] = step.disabled is None
            steps[name] = lambda step=step: step((x,), {}, x.shape[0])
        else:
            optimizer = torch.optim.Adam(model.parameters(), lr=LR, fused=True)
            steps[name] = lambda loss=loss, optimizer=optimizer: svi_step(
                lambda: loss(x), x.shape[0], optimizer
            )
    return steps, notes


def hand_step(d: int, h: int, latent: int, x: torch.Tensor, elbo: str):
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Softplus(), torch.nn.Linear(h, 2 * latent)
    )
    decoder = torch.nn.Sequential(
        torch.nn.Linear(latent, h), torch.nn.Softplus(), torch.nn.Linear(h, d)
    )
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=LR, fused=True)
    log2pi = float(np.log(2 * np.pi))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loc, raw = encoder(x).chunk(2, -1)
        scale = F.softplus(raw)
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        rec = -F.binary_cross_entropy_with_logits(decoder(z), x, reduction="none").sum(-1)
        if elbo == "meanfield":
            kl = 0.5 * (scale.square() + loc.square() - 1).sum(-1) - scale.log().sum(-1)
        else:
            log_q = (-0.5 * eps.square() - scale.log() - 0.5 * log2pi).sum(-1)
            log_p = (-0.5 * z.square() - 0.5 * log2pi).sum(-1)
            kl = log_q - log_p
        loss = (kl - rec).mean()
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def stock_pyro_step(d: int, h: int, latent: int, x: torch.Tensor, elbo: str):
    import pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

    pyro.clear_param_store()
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(
        torch.nn.Linear(d, h), torch.nn.Softplus(), torch.nn.Linear(h, 2 * latent)
    )
    decoder = torch.nn.Sequential(
        torch.nn.Linear(latent, h), torch.nn.Softplus(), torch.nn.Linear(h, d)
    )

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))

    loss = TraceMeanField_ELBO() if elbo == "meanfield" else Trace_ELBO()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
    return lambda: svi.step(x)


def numpyro_step(d: int, h: int, latent: int, x: torch.Tensor, elbo: str):
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
    except ImportError:
        return None
    rng = np.random.default_rng(0)

    def init(shape, fan_in):
        return jnp.asarray(rng.uniform(-1, 1, shape) / np.sqrt(fan_in), dtype=jnp.float32)

    enc0 = [init((d, h), d), init((h,), d), init((h, 2 * latent), h), init((2 * latent,), h)]
    dec0 = [init((latent, h), latent), init((h,), latent), init((h, d), h), init((d,), h)]

    def mlp(params, inputs):
        w1, b1, w2, b2 = params
        return jax.nn.softplus(inputs @ w1 + b1) @ w2 + b2

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

    loss = TraceMeanField_ELBO() if elbo == "meanfield" else Trace_ELBO()
    svi = SVI(model, guide, numpyro.optim.Adam(LR), loss)
    data = jnp.asarray(x.numpy())
    state = svi.init(jax.random.PRNGKey(0), data)
    update = jax.jit(svi.update)
    holder = [state]

    def step():
        holder[0], value = update(holder[0], data)
        value.block_until_ready()
        return value

    return step


def time_row(row, rounds: int, block_s: float) -> dict:
    d, h, latent, batch, elbo = row
    x = torch.bernoulli(torch.full((batch, d), 0.3), generator=torch.Generator().manual_seed(1))
    steps, notes = package_steps(d, h, latent, x, elbo)
    steps["hand"] = hand_step(d, h, latent, x, elbo)
    steps["stock_pyro"] = stock_pyro_step(d, h, latent, x, elbo)
    peer = numpyro_step(d, h, latent, x, elbo)
    if peer is None:
        print(
            "numpyro row skipped: jax/numpyro not installed (pip install -e '.[peers]')",
            file=sys.stderr,
        )
    else:
        steps["numpyro"] = peer
    ms = _interleave(steps, rounds, block_s)
    return {
        "net": f"{d}-{h}-{latent}",
        "batch": batch,
        "elbo": elbo,
        "ms": ms,
        "ratio_to_compiled": {n: v / ms["compiled"] for n, v in ms.items()},
        **notes,
    }


def _interleave(steps: dict, rounds: int, block_s: float) -> dict[str, float]:
    """Median wall-clock milliseconds per step of each implementation over rounds of blocks
    whose order rotates, after a warm-up and a calibration to blocks of about ``block_s``."""
    with pyro.validation_enabled(False):
        for step in steps.values():
            for _ in range(5):
                step()
        counts = {name: harness.calibrate(step, block_s) for name, step in steps.items()}
        timings = harness.interleave(steps, rounds, calls=counts)
    return {name: timings.median(name, "wall") * 1e3 for name in steps}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--rows",
        type=int,
        nargs="*",
        help=f"indices of the rows (default all): 0-{len(ROWS) - 1} the networks, "
        f"{len(ROWS)}-{len(ROWS) + len(USER_ROWS) - 1} users' pairs "
        f"({', '.join(USER_ROWS)})",
    )
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--block-seconds", type=float, default=0.5)
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    session = harness.Session()
    everything = [*ROWS, *USER_ROWS]
    rows = [everything[i] for i in args.rows] if args.rows else everything
    results = []
    for row in rows:
        result = (
            user_row(row, args.rounds, args.block_seconds)
            if isinstance(row, str)
            else time_row(row, args.rounds, args.block_seconds)
        )
        results.append(result)
        order = ["numpyro", "hand", "stock_pyro", "eager", "eager_traced", "compiled"]
        cells = "  ".join(f"{n} {result['ms'][n]:.3f}" for n in order if n in result["ms"])
        print(
            f"{result['net']}, {result['batch']}, {result['elbo']}: ms/step  {cells}  "
            f"(compile {result['compile_s']:.1f} s)",
            flush=True,
        )
        if args.out:
            harness.write_json(
                args.out,
                {
                    "rows": results,
                    "machine": platform.machine(),
                    "threads": 1,
                    "torch": torch.__version__,
                    "command": " ".join([sys.executable, *sys.argv]),
                    "load": os.getloadavg(),
                    "load_average": {"start": session.load_start, "end": harness.load_average()},
                },
            )
    session.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
