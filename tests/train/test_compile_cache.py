"""The compile cache: a compiled step stored by one process is loaded by the next (counted, not
timed), gives what a fresh compile gives, and an entry that is corrupt or unloadable is reported
in one line and compiled afresh. The key is the captured graph: its code, its inputs' shapes,
the inductor options and the torch version.

Tolerances as in ``test_compiled.py``: inductor's kernels against each other, relative 1e-5."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch

from pyro_vae.infer import make_estimator
from pyro_vae.models.vae import VAE
from pyro_vae.train.compile_cache import CACHE_ENV, GraphCache, cache_folder, graph_key
from pyro_vae.train.compiled import CompiledStep
from pyro_vae.train.fused import training_loss
from pyro_vae.train.step import svi_step

needs_compiler = pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++")),
    reason="inductor needs a C++ compiler on the CPU",
)
LR = 1e-2


def _batch(rows=16):
    return torch.bernoulli(torch.full((rows, 12), 0.4), generator=torch.Generator().manual_seed(0))


def _train(folder, steps=3, rows=16):
    """``steps`` compiled steps of a small VAE from seed 1, caching in ``folder`` (``None``:
    no cache): the losses, the parameters, the cache's counts and the notes logged."""
    torch.manual_seed(1)
    module = VAE(12, latent_dim=3, hidden=(8,))
    estimator = make_estimator("iwae", importance_samples=2, max_plate_nesting=1)
    loss_fn = training_loss(module, estimator)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    notes = []
    step = CompiledStep(
        module,
        estimator,
        optimizer,
        loss_fn,
        lambda a, k, n: svi_step(lambda: loss_fn(*a, **k), n, optimizer),
        log=notes.append,
        cache=GraphCache(folder, notes.append),
    )
    x = _batch(rows)
    torch.manual_seed(2)
    with pyro.validation_enabled(False):
        losses = torch.stack([step((x,), {}, rows) for _ in range(steps)])
    assert step.disabled is None and step.compiled_steps == steps, notes
    cache = step.cache
    return losses, [p.detach().clone() for p in module.parameters()], cache, notes


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(a[1], b[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


SCRIPT = textwrap.dedent(
    """
    import json, sys
    import pyro, torch
    sys.path.insert(0, sys.argv[1])
    from test_compile_cache import _train
    from pyro_vae.train.compile_cache import cache_folder
    losses, params, cache, notes = _train(cache_folder())
    print(json.dumps({"hits": cache.hits, "stored": cache.stored, "rejected": cache.rejected,
                      "losses": losses.tolist(), "notes": notes}))
    """
)


@needs_compiler
def test_a_second_compile_in_a_fresh_process_loads_the_stored_graph(tmp_path):
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache")}
    here = os.path.dirname(__file__)

    def run():
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, here],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert (first["hits"], first["stored"], first["rejected"]) == (0, 1, 0), first
    assert (second["hits"], second["stored"], second["rejected"]) == (1, 0, 0), second
    assert first["notes"] == second["notes"] == []
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
    torch.testing.assert_close(
        torch.tensor(second["losses"]), torch.tensor(first["losses"]), rtol=1e-5, atol=1e-5
    )


@needs_compiler
def test_a_loaded_graph_gives_what_an_uncached_compile_gives(tmp_path):
    uncached = _train(None)
    stored = _train(tmp_path)
    loaded = _train(tmp_path)
    assert (stored[2].stored, loaded[2].hits, loaded[2].stored) == (1, 1, 0)
    _assert_same(stored, uncached)
    _assert_same(loaded, uncached)


@needs_compiler
@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "garbage with its checksum"])
def test_a_corrupt_entry_is_compiled_afresh_with_one_line(tmp_path, damage):
    import hashlib

    uncached = _train(None)
    _train(tmp_path)
    (artifact,) = tmp_path.glob("*.bin")
    data = artifact.read_bytes()
    if damage == "flip a byte":
        artifact.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        artifact.write_bytes(data[: len(data) // 2])
    else:  # bytes that match their record but are no artifact torch can load
        garbage = b"not a compiled graph" * 10
        artifact.write_bytes(garbage)
        record = artifact.with_suffix(".json")
        entry = json.loads(record.read_text())
        entry.update(size=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
        record.write_text(json.dumps(entry))
    again = _train(tmp_path)
    cache, notes = again[2], again[3]
    assert (cache.hits, cache.rejected, cache.stored) == (0, 1, 1)
    assert len(notes) == 1 and notes[0].startswith("compile cache entry "), notes
    assert "compiling afresh" in notes[0] and "\n" not in notes[0]
    _assert_same(again, uncached)
    assert _train(tmp_path)[2].hits == 1  # the entry compiled afresh was stored again


def test_the_key_is_the_graph_its_input_shapes_and_the_inductor_options():
    import torch._inductor.config as inductor_config

    graph = torch.fx.symbolic_trace(lambda x: (x.sin() * 2,))
    other = torch.fx.symbolic_trace(lambda x: (x.cos() * 2,))
    x = torch.ones(3, 4)
    key = graph_key(graph, [x])
    assert key == graph_key(graph, [torch.zeros(3, 4)])  # values are no part of it
    assert key != graph_key(other, [x])
    assert key != graph_key(graph, [torch.ones(5, 4)])
    assert key != graph_key(graph, [x.double()])
    assert key != graph_key(graph, [torch.ones(4, 3).t()])  # strides
    with inductor_config.patch(fallback_random=not inductor_config.fallback_random):
        assert key != graph_key(graph, [x])


def test_the_key_holds_the_processors_instruction_sets(monkeypatch):
    import builtins
    import io

    graph = torch.fx.symbolic_trace(lambda x: (x.sin() * 2,))
    real_open, keys = builtins.open, []
    for flags in ("fpu sse2 avx2", "fpu sse2 avx2 avx512f"):

        def fake_open(path, *args, flags=flags, **kwargs):
            if str(path) == "/proc/cpuinfo":
                return io.StringIO(f"processor\t: 0\nflags\t\t: {flags}\n")
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        keys.append(graph_key(graph, [torch.ones(3)]))
    assert keys[0] != keys[1]


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_folder() == tmp_path
    for off in ("", "0", "off"):
        monkeypatch.setenv(CACHE_ENV, off)
        assert cache_folder() is None
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    assert cache_folder() == tmp_path / "inductor" / "pyro_vae"
