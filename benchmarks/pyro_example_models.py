"""Pyro's network examples at small sizes, written as Pyro's examples write them: the VAE
(``examples/vae/vae.py``), the semi-supervised M2 VAE (``examples/vae/ss_vae_M2.py``, the class
enumerated in the guide or observed), the conditional VAE (``examples/cvae``), the deep Markov
model (``examples/dmm.py``), LDA (``examples/lda.py``), the ProdLDA tutorial and scANVI
(``examples/scanvi/scanvi.py``). Each ``build()`` gives ``(model, guide, data)``; ``data`` is a
tensor or a tuple of the model's positional arguments. The images are scikit-learn's bundled
8×8 digits, binarized (no download); the counts and words are synthetic."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import nn


def digits(rows: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` bundled digits, pixels binarized at half intensity, and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.data[:rows] / 16.0 > 0.5, dtype=torch.float32)
    return images, torch.tensor(bunch.target[:rows])


class _MLP(nn.Module):
    def __init__(self, sizes: list[int], out: int, heads: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.Softplus()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], out) for _ in range(heads))

    def forward(self, *inputs: torch.Tensor):
        shape = torch.broadcast_shapes(*(x.shape[:-1] for x in inputs))
        hidden = self.body(torch.cat([x.expand(*shape, x.shape[-1]) for x in inputs], -1))
        outs = [head(hidden) for head in self.heads]
        return outs[0] if len(outs) == 1 else outs


class VAE(nn.Module):
    """``examples/vae/vae.py``: a Gaussian encoder, a Bernoulli decoder, ``pyro.module``."""

    def __init__(self, pixels: int = 64, hidden: int = 32, latent: int = 4):
        super().__init__()
        self.latent = latent
        self.encoder = _MLP([pixels, hidden], latent, heads=2)
        self.decoder = _MLP([latent, hidden], pixels)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def vae():
    pair = VAE()
    return pair.model, pair.guide, digits()[0]


class SSVAE(nn.Module):
    """``examples/vae/ss_vae_M2.py``: p(x | y, z) p(y) p(z), q(z | x, y) q(y | x); the class
    is observed when given, else enumerated in the guide (``config_enumerate``)."""

    def __init__(self, pixels: int = 64, classes: int = 10, hidden: int = 32, latent: int = 4):
        super().__init__()
        self.classes, self.latent = classes, latent
        self.encoder_y = _MLP([pixels, hidden], classes)
        self.encoder_z = _MLP([pixels + classes, hidden], latent, heads=2)
        self.decoder = _MLP([latent + classes, hidden], pixels)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(self.latent), 1.0).to_event(1))
            alpha = xs.new_ones(self.classes) / self.classes
            ys = pyro.sample("y", dist.OneHotCategorical(alpha), obs=ys)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(zs, ys)).to_event(1), obs=xs)

    @config_enumerate
    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(logits=self.encoder_y(xs)))
            loc, log_scale = self.encoder_z(xs, ys)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def ss_vae_m2():
    pair = SSVAE()
    return pair.model, pair.guide, digits()[0]


def ss_vae_m2_labelled():
    pair = SSVAE()
    images, labels = digits()
    return pair.model, pair.guide, (images, nn.functional.one_hot(labels, 10).float())


class CVAE(nn.Module):
    """``examples/cvae``: the bottom half of a digit predicted from its top half through
    p(z | top) (the prior network), p(bottom | top, z) and q(z | top, bottom)."""

    def __init__(self, half: int = 32, hidden: int = 32, latent: int = 2):
        super().__init__()
        self.prior_net = _MLP([half, hidden], latent, heads=2)
        self.generation_net = _MLP([half + latent, hidden], half)
        self.recognition_net = _MLP([2 * half, hidden], latent, heads=2)

    def model(self, top, bottom):
        pyro.module("cvae", self)
        with pyro.plate("data", top.shape[0]):
            loc, log_scale = self.prior_net(top)
            z = pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))
            logits = self.generation_net(top, z)
            pyro.sample("y", dist.Bernoulli(logits=logits).to_event(1), obs=bottom)

    def guide(self, top, bottom):
        with pyro.plate("data", top.shape[0]):
            loc, log_scale = self.recognition_net(top, bottom)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def cvae():
    pair = CVAE()
    images = digits()[0]
    return pair.model, pair.guide, (images[:, :32], images[:, 32:])


class DMM(nn.Module):
    """``examples/dmm.py``: a deep Markov model, z_t ~ N(transition(z_{t−1})), x_t ~
    Bernoulli(emitter(z_t)), masked past each sequence's length; the guide combines z_{t−1}
    with a backward GRU's state."""

    def __init__(self, features: int = 4, latent: int = 2, hidden: int = 8):
        super().__init__()
        self.latent = latent
        self.transition = _MLP([latent, hidden], latent, heads=2)
        self.emitter = _MLP([latent, hidden], features)
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.combiner = _MLP([latent + hidden, hidden], latent, heads=2)
        self.z_0 = nn.Parameter(torch.zeros(latent))
        self.z_q_0 = nn.Parameter(torch.zeros(latent))

    def model(self, sequences, mask):
        pyro.module("dmm", self)
        with pyro.plate("sequences", sequences.shape[0]):
            z = self.z_0.expand(sequences.shape[0], self.latent)
            for t in pyro.markov(range(sequences.shape[1])):
                loc, log_scale = self.transition(z)
                z = pyro.sample(
                    f"z_{t}", dist.Normal(loc, log_scale.exp()).mask(mask[:, t : t + 1]).to_event(1)
                )
                pyro.sample(
                    f"x_{t}",
                    dist.Bernoulli(logits=self.emitter(z)).mask(mask[:, t : t + 1]).to_event(1),
                    obs=sequences[:, t],
                )

    def guide(self, sequences, mask):
        states = self.rnn(sequences.flip(1))[0].flip(1)
        with pyro.plate("sequences", sequences.shape[0]):
            z = self.z_q_0.expand(sequences.shape[0], self.latent)
            for t in pyro.markov(range(sequences.shape[1])):
                loc, log_scale = self.combiner(z, states[:, t])
                z = pyro.sample(
                    f"z_{t}", dist.Normal(loc, log_scale.exp()).mask(mask[:, t : t + 1]).to_event(1)
                )


def dmm():
    g = torch.Generator().manual_seed(0)
    sequences, steps, features = 24, 6, 4
    state = torch.zeros(sequences, dtype=torch.long)
    data = torch.zeros(sequences, steps, features)
    for t in range(steps):
        state = (state + (torch.rand(sequences, generator=g) < 0.3)) % features
        data[:, t] = torch.bernoulli(
            0.1 + 0.8 * nn.functional.one_hot(state, features), generator=g
        )
    lengths = torch.randint(3, steps + 1, (sequences,), generator=g)
    mask = torch.arange(steps) < lengths[:, None]
    pair = DMM(features)
    return pair.model, pair.guide, (data * mask[..., None], mask)


def lda():
    """``examples/lda.py`` without its amortized guide: Gamma topic weights and Dirichlet
    topic words (global, mean-field guide), each document's topic proportions (a guide
    parameter per document), every word's topic enumerated in the model. The data are rows of
    documents (``[D, W]`` word ids), the model reads them as ``examples/lda.py`` does
    (``[W, D]``: words at dim −2, documents at dim −1)."""
    topics, vocabulary, documents, words = 3, 12, 16, 10
    g = torch.Generator().manual_seed(0)
    truth = torch.distributions.Dirichlet(torch.full((topics, vocabulary), 0.3)).sample()
    mixes = torch.distributions.Dirichlet(torch.ones(topics)).sample((documents,))
    assigned = torch.multinomial(mixes, words, replacement=True, generator=g)  # [D, W]
    docs = torch.stack(
        [
            torch.multinomial(truth[assigned[d]], 1, generator=g).squeeze(-1)
            for d in range(documents)
        ]
    )  # [D, W]

    def model(docs):
        data = docs.T
        with pyro.plate("topics", topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / topics, 1.0))
            topic_words = pyro.sample(
                "topic_words", dist.Dirichlet(torch.ones(vocabulary) / vocabulary)
            )
        with pyro.plate("documents", data.shape[-1]):
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights.unsqueeze(-2)))
            with pyro.plate("words", data.shape[-2]):
                word_topics = pyro.sample(
                    "word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"}
                )
                pyro.sample(
                    "doc_words",
                    dist.Categorical(Vindex(topic_words.unsqueeze(-3))[..., word_topics, :]),
                    obs=data,
                )

    def guide(docs):
        positive = dist.constraints.positive
        weights = pyro.param(
            "topic_weights_posterior", lambda: torch.ones(topics), constraint=positive
        )
        words_param = pyro.param(
            "topic_words_posterior", lambda: torch.ones(topics, vocabulary), constraint=positive
        )
        mixes = pyro.param(
            "doc_topics_posterior", lambda: torch.ones(docs.shape[0], topics), constraint=positive
        )
        with pyro.plate("topics", topics):
            pyro.sample("topic_weights", dist.Gamma(weights, 1.0))
            pyro.sample("topic_words", dist.Dirichlet(words_param))
        with pyro.plate("documents", docs.shape[0]):
            pyro.sample("doc_topics", dist.Dirichlet(mixes))

    return model, guide, docs


class ProdLDA(nn.Module):
    """The ProdLDA tutorial: a logistic-normal document-topic latent, an encoder with batch
    normalization and dropout, a decoder β with batch normalization, Multinomial counts."""

    def __init__(
        self, vocabulary: int = 20, topics: int = 3, hidden: int = 16, dropout: float = 0.2
    ):
        super().__init__()
        self.topics = topics
        self.fc = nn.Sequential(nn.Linear(vocabulary, hidden), nn.Softplus(), nn.Dropout(dropout))
        self.loc = nn.Sequential(nn.Linear(hidden, topics), nn.BatchNorm1d(topics, affine=False))
        self.log_var = nn.Sequential(
            nn.Linear(hidden, topics), nn.BatchNorm1d(topics, affine=False)
        )
        self.beta = nn.Linear(topics, vocabulary, bias=False)
        self.decoder_norm = nn.BatchNorm1d(vocabulary, affine=False)
        self.drop = nn.Dropout(dropout)

    def model(self, docs):
        pyro.module("decoder", self)
        with pyro.plate("documents", docs.shape[0]):
            logtheta = pyro.sample(
                "logtheta", dist.Normal(docs.new_zeros(self.topics), 1.0).to_event(1)
            )
            theta = nn.functional.softmax(logtheta, -1)
            probs = nn.functional.softmax(self.decoder_norm(self.beta(self.drop(theta))), -1)
            pyro.sample("obs", dist.Multinomial(int(docs.sum(-1).max()), probs), obs=docs)

    def guide(self, docs):
        with pyro.plate("documents", docs.shape[0]):
            hidden = self.fc(docs)
            pyro.sample(
                "logtheta",
                dist.Normal(self.loc(hidden), (0.5 * self.log_var(hidden)).exp()).to_event(1),
            )


def prodlda():
    g = torch.Generator().manual_seed(0)
    topics = torch.distributions.Dirichlet(torch.full((3, 20), 0.2)).sample()
    mixes = torch.distributions.Dirichlet(torch.ones(3)).sample((60,))
    docs = torch.stack(
        [
            torch.bincount(
                torch.multinomial(mix @ topics, 30, replacement=True, generator=g), minlength=20
            )
            for mix in mixes
        ]
    ).float()
    pair = ProdLDA()
    return pair.model, pair.guide, docs


class SCANVI(nn.Module):
    """``examples/scanvi/scanvi.py`` at small sizes: counts x ~ NegativeBinomial with a
    library size l ~ LogNormal, a cell state z1 ~ N(decoder(z2, y)), z2 ~ N(0, 1) and the cell
    type y; the guide draws z1 and l from x, enumerates y ~ q(y | z1) and draws z2 from
    (z1, y)."""

    def __init__(self, genes: int = 12, types: int = 3, latent: int = 2, hidden: int = 16):
        super().__init__()
        self.types, self.latent = types, latent
        self.z2_decoder = _MLP([latent + types, hidden], latent, heads=2)
        self.x_decoder = _MLP([latent, hidden], genes)
        self.z2l_encoder = _MLP([genes, hidden], latent + 1, heads=2)
        self.classifier = _MLP([latent, hidden], types)
        self.z1y_encoder = _MLP([latent + types, hidden], latent, heads=2)
        self.inverse_dispersion = nn.Parameter(torch.ones(genes))

    def model(self, x):
        pyro.module("scanvi", self)
        with pyro.plate("batch", x.shape[0]):
            library = pyro.sample(
                "l", dist.LogNormal(x.new_tensor(3.0), 0.5).expand([1]).to_event(1)
            )
            y = pyro.sample("y", dist.OneHotCategorical(logits=x.new_zeros(self.types)))
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(self.latent), 1.0).to_event(1))
            loc, log_scale = self.z2_decoder(z2, y)
            z1 = pyro.sample("z1", dist.Normal(loc, log_scale.exp()).to_event(1))
            rate = library * nn.functional.softmax(self.x_decoder(z1), -1)
            theta = nn.functional.softplus(self.inverse_dispersion)
            pyro.sample(
                "x",
                dist.NegativeBinomial(
                    total_count=theta, logits=(rate + 1e-6).log() - theta.log()
                ).to_event(1),
                obs=x,
            )

    @config_enumerate
    def guide(self, x):
        with pyro.plate("batch", x.shape[0]):
            loc, log_scale = self.z2l_encoder(x.log1p())
            pyro.sample("l", dist.LogNormal(loc[..., -1:], log_scale[..., -1:].exp()).to_event(1))
            z1 = pyro.sample(
                "z1", dist.Normal(loc[..., :-1], log_scale[..., :-1].exp()).to_event(1)
            )
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.classifier(z1)))
            loc, log_scale = self.z1y_encoder(z1, y)
            pyro.sample("z2", dist.Normal(loc, log_scale.exp()).to_event(1))


def scanvi():
    g = torch.Generator().manual_seed(0)
    types = torch.randint(0, 3, (60,), generator=g)
    profiles = torch.distributions.Dirichlet(torch.full((3, 12), 0.5)).sample()
    counts = torch.poisson(20 * profiles[types], generator=g)
    pair = SCANVI()
    return pair.model, pair.guide, counts


class AIR(nn.Module):
    """``examples/air`` (Attend, Infer, Repeat) in one dimension: up to ``steps`` objects,
    each present with z_pres_t ~ Bernoulli(ρ z_pres_{t−1}) (sampled in the guide: a
    score-function term), with a position z_where_t and an appearance z_what_t masked by its
    presence (``.mask``); the signal is the sum of the present objects' decoded bumps. The
    guide attends to the residual of what it has explained so far."""

    def __init__(self, length: int = 16, steps: int = 2, hidden: int = 32, what: int = 2):
        super().__init__()
        self.steps, self.what = steps, what
        self.decoder = _MLP([what + 1, hidden], length)
        self.predict = _MLP([length + 1, hidden], 1 + 2 + 2 * what)

    def _signal(self, where, what):
        return self.decoder(what, where)

    def model(self, x):
        pyro.module("air", self)
        with pyro.plate("data", x.shape[0]):
            present = x.new_ones(x.shape[0])
            canvas = x.new_zeros(x.shape)
            for t in range(self.steps):
                present = pyro.sample(f"z_pres_{t}", dist.Bernoulli(0.5 * present))
                where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(x.new_zeros(1), 1.0).to_event(1).mask(present.bool()),
                )
                what = pyro.sample(
                    f"z_what_{t}",
                    dist.Normal(x.new_zeros(self.what), 1.0).to_event(1).mask(present.bool()),
                )
                canvas = canvas + present.unsqueeze(-1) * self._signal(where, what)
            pyro.sample("x", dist.Normal(canvas, 0.3).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            present = x.new_ones(x.shape[0])
            canvas = x.new_zeros(x.shape)
            for t in range(self.steps):
                out = self.predict(x - canvas, present.unsqueeze(-1))
                present = pyro.sample(
                    f"z_pres_{t}", dist.Bernoulli(torch.sigmoid(out[..., 0]) * present)
                )
                where = pyro.sample(
                    f"z_where_{t}",
                    dist.Normal(out[..., 1:2], out[..., 2:3].exp())
                    .to_event(1)
                    .mask(present.bool()),
                )
                loc, log_scale = out[..., 3 : 3 + self.what], out[..., 3 + self.what :]
                what = pyro.sample(
                    f"z_what_{t}",
                    dist.Normal(loc, log_scale.exp()).to_event(1).mask(present.bool()),
                )
                canvas = canvas + present.unsqueeze(-1) * self._signal(where, what)


def air():
    g = torch.Generator().manual_seed(0)
    rows, length = 100, 16
    grid = torch.arange(length).float()
    counts = torch.randint(0, 3, (rows,), generator=g)
    x = 0.1 * torch.randn(rows, length, generator=g)
    for n in range(rows):
        for _ in range(int(counts[n])):
            centre = torch.randint(2, length - 2, (1,), generator=g).float()
            x[n] += 2.0 * torch.exp(-0.5 * (grid - centre) ** 2)
    pair = AIR(length)
    return pair.model, pair.guide, x
