"""Two users' pairs for ``bench_step.py --preset peers``, written as a Pyro user writes them:
a VAE with a global latent, and padded sequences with a mask. Neither has a fused path; the
package trains them through Pyro's traces (or compiled), stock Pyro through ``SVI``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F

USER_PAIRS = ("global latent", "sequences")


def _mlp(inputs: int, hidden: int, outputs: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.Softplus(), torch.nn.Linear(hidden, outputs)
    )


class GlobalBiasVAE(torch.nn.Module):
    """The 64-128-8 VAE whose decoder output bias b ~ N(0, I) is shared by all datapoints, with
    a Gaussian guide q(b) of its own; registered in Pyro's param store as ``name``."""

    def __init__(self, d: int = 64, h: int = 128, latent: int = 8, name: str = "global_vae"):
        super().__init__()
        self.encoder, self.decoder = _mlp(d, h, 2 * latent), _mlp(latent, h, d)
        self.q_bias = torch.nn.Parameter(torch.zeros(2, d))
        self.latent, self.name = latent, name

    def model(self, x):
        pyro.module(self.name, self)
        bias = pyro.sample("bias", dist.Normal(x.new_zeros(x.shape[-1]), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            logits = self.decoder(z) + bias.unsqueeze(-2)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(self.name, self)
        pyro.sample("bias", dist.Normal(self.q_bias[0], F.softplus(self.q_bias[1])).to_event(1))
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))


class MaskedSequences(torch.nn.Module):
    """z ~ N(0, I), x_t ~ N(MLP(z)_t, 0.3²) on the real steps of padded sequences; the guide
    q(z | x, mask) is an MLP of the masked sequence and its mask."""

    def __init__(self, steps: int = 20, h: int = 64, latent: int = 4, name: str = "sequences"):
        super().__init__()
        self.encoder, self.decoder = _mlp(2 * steps, h, 2 * latent), _mlp(latent, h, steps)
        self.latent, self.name = latent, name

    def model(self, x, mask):
        pyro.module(self.name, self)
        with pyro.plate("sequences", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.3).mask(mask).to_event(1), obs=x)

    def guide(self, x, mask):
        pyro.module(self.name, self)
        with pyro.plate("sequences", x.shape[0]):
            inputs = torch.cat([x * mask, mask.to(x.dtype)], -1)
            loc, raw = self.encoder(inputs).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))


def make(name: str, seed: int) -> tuple:
    """``(pair, args, kwargs, label, batch size, number of datapoints)`` of the pair ``name``:
    its batch drawn from ``seed``, its weights from torch's current random state."""
    g = torch.Generator().manual_seed(seed)
    if name == "global latent":
        x = torch.bernoulli(torch.full((128, 64), 0.3), generator=g)
        return GlobalBiasVAE(), (x,), {}, "64-128-8 + global bias", 128, 1797
    if name == "sequences":
        lengths = torch.randint(2, 21, (32,), generator=g)
        mask = torch.arange(20)[None, :] < lengths[:, None]
        kwargs = {"x": torch.randn(32, 20, generator=g) * mask, "mask": mask}
        return MaskedSequences(), (), kwargs, "sequences T=20, 20-64-4", 32, 32
    raise ValueError(f"name must be one of {USER_PAIRS}, got {name!r}")


class UserVAE(torch.nn.Module):
    """A VAE as a user writes it (not the package's :class:`~pyro_vae.models.vae.VAE`, so no
    fused path): softplus MLPs ``d-h-2·latent`` and ``latent-h-d``, a diagonal Gaussian guide
    and Bernoulli pixels; registered in Pyro's param store as ``name``."""

    def __init__(self, d: int = 64, h: int = 128, latent: int = 8, name: str = "user_vae"):
        super().__init__()
        self.encoder, self.decoder = _mlp(d, h, 2 * latent), _mlp(latent, h, d)
        self.latent, self.name = latent, name

    def model(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module(self.name, self)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw)).to_event(1))
