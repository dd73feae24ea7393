"""A pair whose guide normalizes its batch (BatchNorm in train mode) in its second site."""

import pyro
import pyro.distributions as dist
from torch import nn

D, LATENT = 6, 3  # the data's and each latent's width


class BatchNormTwoSiteGuide(nn.Module):
    """A guide of two sites whose second network normalizes its batch (BatchNorm in train
    mode): stl and dreg replay such a guide on its own draws, and each run of BatchNorm in train
    mode moves its running statistics."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(D, 2 * LATENT)
        self.second = nn.Sequential(
            nn.Linear(LATENT, 2 * LATENT, bias=False), nn.BatchNorm1d(2 * LATENT)
        )
        self.decoder = nn.Linear(LATENT, D)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z2), 1.0).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.first(x).chunk(2, -1)
            z1 = pyro.sample("z1", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))
            loc, raw = self.second(z1).chunk(2, -1)
            pyro.sample("z2", dist.Normal(loc, nn.functional.softplus(raw) + 0.1).to_event(1))
