"""Compiled step graphs kept across runs and processes.

A compiled step (:mod:`pyro_vae.train.compiled`) is a captured FX graph of tensor operations
with a flat list of inputs, compiled by inductor. Compiling is what costs (seconds to tens of
seconds); capturing the graph again is cheap (a fraction of a second). So each run captures
its graph and looks the compiled code up under a key computed from the graph itself:

* the graph's code (every operation and its arguments: what the pair's code, Pyro, the
  estimator and Adam issued at these shapes), its inputs' shapes, strides, dtypes and
  devices (the parameters', the batch's), the inductor options in force, the versions of
  torch and Python, the machine, its CPU's instruction-set flags and its GPUs' names and
  compute capabilities, and this format.

Keying by the graph rather than by the pair's source text is exact: any change of the model,
the guide, a helper they call, Pyro, the estimator or a hyperparameter that changes what is
computed changes the graph and so the key, and a change that does not cannot change the
result. An entry is two files in :func:`cache_folder`: the compiled artifact
(:func:`torch._inductor.standalone_compile`'s binary format) and a JSON record of its
SHA-256 and size. An entry whose record is missing, whose bytes do not match it, or that
torch cannot load is reported in one line and compiled afresh.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

#: the environment variable naming the folder (empty, ``0`` or ``off``: no cache)
CACHE_ENV = "PYRO_VAE_COMPILE_CACHE"
FORMAT = 1
_OFF = ("", "0", "off", "none")
#: whether this torch compiles an FX graph without dynamo (``torch._inductor.standalone_compile``)
STANDALONE = importlib.util.find_spec("torch._inductor.standalone_compile") is not None


def cache_folder() -> Path | None:
    """Where compiled graphs are kept: ``$PYRO_VAE_COMPILE_CACHE`` if set (``None`` when it is
    empty, ``0`` or ``off``), else ``pyro_vae`` inside inductor's own cache folder
    (``$TORCHINDUCTOR_CACHE_DIR``, by default ``torchinductor_<user>`` in the temporary
    folder, as torch places it)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in _OFF else Path(value)
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not base:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (a container): torch's fallback
            user = "unknown"
        base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    return Path(base) / "pyro_vae"


def _inductor_options() -> str:
    """The inductor options in force (a patch such as ``fallback_random`` changes the code)."""
    import torch._inductor.config as inductor_config  # no public accessor of the options

    return json.dumps(inductor_config.save_config_portable(), sort_keys=True, default=repr)


def _processors(inputs: Sequence[torch.Tensor]) -> str:
    """What the compiled code is specific to beyond the architecture's name: the CPU's
    instruction-set flags (inductor vectorizes for those it finds; a cache folder shared by
    machines of other CPUs must not hand one's code to another) and each GPU's name and
    compute capability."""
    parts = []
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "")
        parts.append(hashlib.sha256(flags.encode()).hexdigest())
    except OSError:  # not Linux: the processor string is all there is
        parts.append(platform.processor())
    for device in sorted({t.device for t in inputs if t.device.type == "cuda"}, key=str):
        parts.append(f"{device}: {torch.cuda.get_device_name(device)}, "
                     f"{torch.cuda.get_device_capability(device)}")  # fmt: skip
    return "; ".join(parts)


def graph_key(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> str:
    """The key of ``graph`` compiled for ``inputs`` (see the module docstring)."""
    digest = hashlib.sha256()
    for part in (
        f"pyro_vae compiled step, format {FORMAT}",
        f"torch {torch.__version__}, python {sys.version}, {platform.machine()}",
        _processors(inputs),
        graph.code,
        repr([(tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) for t in inputs]),
        _inductor_options(),
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


class GraphCache:
    """Compiled graphs under :func:`cache_folder` (``folder=None``: none kept). Counts what
    happened: ``hits`` (loaded), ``stored`` (compiled and written), ``rejected`` (an entry
    that could not be used, compiled afresh)."""

    def __init__(self, folder: Path | None, log: Callable[[str], None]):
        self.folder, self.log = folder, log
        self.hits = self.stored = self.rejected = 0

    def paths(self, key: str) -> tuple[Path, Path]:
        assert self.folder is not None
        return self.folder / f"{key}.bin", self.folder / f"{key}.json"

    def compiled(
        self, graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]
    ) -> tuple[Callable[..., Any], bool, str | None]:
        """``graph`` compiled for ``inputs`` by inductor, loaded when a valid entry exists,
        else compiled and stored; whether it was loaded, and its key (``None``: no cache)."""
        key = graph_key(graph, inputs) if self.folder is not None else None
        if key is not None:
            loaded = self.load(key)
            if loaded is not None:
                return loaded, True, key
        artifact = _standalone_compile(graph, inputs)
        if key is not None:
            self._store(key, artifact)
        return artifact, False, key

    def load(self, key: str) -> Callable[..., Any] | None:
        """The entry of ``key``, verified, or ``None`` (absent, or rejected with one line)."""
        artifact, record = self.paths(key)
        if not artifact.exists() and not record.exists():
            return None
        try:
            expected = json.loads(record.read_text())
            data = artifact.read_bytes()
            if expected.get("format") != FORMAT or expected.get("size") != len(data):
                raise ValueError("its size differs from its record")
            if expected.get("sha256") != hashlib.sha256(data).hexdigest():
                raise ValueError("its checksum differs from its record")
            from torch._inductor import CompiledArtifact

            loaded = CompiledArtifact.load(path=str(artifact), format="binary")
        except Exception as exc:  # unreadable, corrupt or from an incompatible torch
            self.reject(key, exc)
            return None
        self.hits += 1
        return loaded

    def reject(self, key: str, why: BaseException | str) -> None:
        """Say in one line that the entry of ``key`` is not used, and remove it."""
        self.rejected += 1
        text = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
        text = (text.strip().splitlines() or [""])[0]
        self.log(f"compile cache entry {key[:16]} not used ({text}); compiling afresh")
        for path in self.paths(key):
            try:
                path.unlink()
            except OSError:
                pass

    def _store(self, key: str, artifact: Any) -> None:
        path, record = self.paths(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            artifact.save(path=str(temporary), format="binary")
            data = temporary.read_bytes()
            os.replace(temporary, path)
            text = json.dumps(
                {
                    "format": FORMAT,
                    "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "torch": torch.__version__,
                }
            )
            temporary = record.with_name(f"{record.name}.{os.getpid()}.tmp")
            temporary.write_text(text)
            os.replace(temporary, record)
        except Exception as exc:  # a read-only folder, a graph torch cannot serialize
            self.log(f"compiled step not kept for later runs: {type(exc).__name__}: {exc}")
            return
        self.stored += 1


def _standalone_compile(graph: torch.fx.GraphModule, inputs: Sequence[torch.Tensor]) -> Any:
    """``graph`` compiled by inductor for ``inputs``' shapes. :func:`torch.compile` would put
    dynamo in front of the graph, which re-traces it in every process and checks guards on
    every input at every call; ``torch._inductor.standalone_compile`` (exported by
    ``torch._inductor``'s ``__all__``, torch's API for compiling an FX graph without dynamo)
    compiles the graph as it is and returns a callable that can be saved and loaded."""
    from torch._inductor import standalone_compile

    return standalone_compile(graph, list(inputs), dynamic_shapes="from_example_inputs")
