"""Specs the command line takes for a user's model and data, resolved into Python objects.

- ``MODULE:FUNCTION`` or ``FILE.py:FUNCTION`` names a callable (:func:`load_factory`);
- a data spec (:func:`load_data`) is a ``.npz`` file of named arrays (names matching the pair's
  argument names give keyword arguments; NumPy's unnamed ``arr_0, arr_1, ...`` give positional
  ones, in order), a ``.pt`` file holding a tensor, a tuple/list or a dict of tensors (read
  with ``torch.load(weights_only=True)``), or a function spec whose call returns data in any
  form :func:`pyro_vae.data.batches.as_source` accepts, or a ``(train, test)`` pair of them (a
  tuple of two Datasets/DataLoaders, or a dict with exactly the keys ``"train"`` and ``"test"``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pyro_vae.util import memory
from pyro_vae.util.errors import ConfigError, DataError
from pyro_vae.util.files import COPIES, check_npz, regular_file

DATA_SUFFIXES = (".npz", ".pt")
_POSITIONAL = re.compile(r"arr_(\d+)")


def load_factory(spec: str) -> Callable:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``."""
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"expected MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise ConfigError(f"no file {module_name}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name}: {exc}") from None
    except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
        from pyro_vae.util.usercode import user_frame

        if not isinstance(exc, SyntaxError) and user_frame(exc.__traceback__) is not None:
            raise  # raised by the module's own code, not by the compiler
        where = (
            f"{exc.filename}:{exc.lineno}: "
            if isinstance(exc, SyntaxError) and exc.filename
            else ""
        )
        detail = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise ConfigError(
            f"{where}cannot load {module_name} as Python: {type(exc).__name__}: {detail}"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable {attribute!r}")
    if _not_user_code(module_name, factory):
        raise ConfigError(
            f"{spec} names a function of Python's standard library or a "
            "built-in (compiled) function, not the user's own: name a function "
            "defined in your module or FILE.py"
        )
    return factory


class FactoryCallError(ConfigError, TypeError):
    """A factory called with arguments it does not take (a ``TypeError`` too)."""


def call_factory(spec: str, *args: Any) -> Any:
    """``FUNCTION(*args)`` of the spec (:func:`load_factory`). A failure that arises in the
    user's code propagates (:mod:`pyro_vae.util.usercode` names its file and line); a call with
    arguments the function does not take is a :class:`FactoryCallError`, and a failure raised
    by a library the spec names directly (a class given the wrong arguments) a
    :class:`~pyro_vae.util.errors.ConfigError`, both naming the spec."""
    from pyro_vae.util.usercode import first_line, user_frame

    factory = load_factory(spec)
    try:
        return factory(*args)
    except Exception as exc:
        if user_frame(exc.__traceback__) is not None or isinstance(exc, ConfigError):
            raise
        kind = (
            FactoryCallError
            if isinstance(exc, TypeError) and exc.__traceback__.tb_next is None
            else ConfigError
        )
        raise kind(f"calling {spec} failed: {type(exc).__name__}: {first_line(exc)}") from None


def _not_user_code(module_name: str, factory: Callable) -> bool:
    """Whether ``factory`` is Python's own (the standard library, a builtin): such a function
    (``os:abort``, ``builtins:input``) cannot build a pair or data, and may end the process
    without a word."""
    top = module_name.partition(".")[0]
    return (
        top in sys.stdlib_module_names
        or inspect.isbuiltin(factory)
        or getattr(factory, "__module__", None) in ("builtins", "posix", "nt")
    )


def absolute_spec(spec: str) -> str:
    """``spec`` with its file part made absolute (so a run folder's record works from any
    directory). A ``module:function`` spec is returned as it is, unless only the current
    folder holds the module: a top-level one becomes its file's absolute ``FILE.py:function``,
    a module of a package there is refused (:class:`~pyro_vae.util.errors.ConfigError`)."""
    if spec.endswith(DATA_SUFFIXES):
        return str(Path(spec).resolve())
    module_name, sep, attribute = spec.rpartition(":")
    if sep and module_name.endswith(".py"):
        return f"{Path(module_name).resolve()}:{attribute}"
    found = _found_only_here(module_name) if sep and module_name else None
    if found is None:
        return spec
    if "." not in module_name:  # the same module, under the same name, from any folder
        return f"{found}:{attribute}"
    raise ConfigError(
        f"{module_name} is found only in the current folder ({Path.cwd()}), where a later "
        f"command run elsewhere would not find it: give it as FILE.py:{attribute}, or put "
        "its folder on PYTHONPATH as an absolute path"
    )


def _found_only_here(module_name: str) -> Path | None:
    """The file of the top-level module of ``module_name`` when only the current folder holds
    it (``python -m`` and a relative ``PYTHONPATH`` put it on :data:`sys.path`), without
    running it; ``None`` when it is found elsewhere, or not at all."""
    from importlib.machinery import PathFinder

    top = module_name.partition(".")[0]
    here = Path.cwd().resolve()
    if top in sys.modules or top in sys.builtin_module_names:
        return None
    elsewhere = [p for p in sys.path if p and Path(p).is_absolute() and Path(p).resolve() != here]
    local = PathFinder.find_spec(top, [str(here)])
    if local is None or local.origin is None or PathFinder.find_spec(top, elsewhere) is not None:
        return None
    return Path(local.origin).resolve()


def _read_npz(path: Path) -> tuple | dict:
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as a .npz file of arrays: {exc}") from None
    if not arrays:
        raise DataError(f"{path} holds no arrays")
    positions = [_POSITIONAL.fullmatch(name) for name in arrays]
    if all(positions):
        order = sorted(int(match.group(1)) for match in positions)
        if order != list(range(len(order))):
            raise DataError(f"{path}: unnamed arrays must be arr_0 .. arr_{len(order) - 1}")
        return tuple(arrays[f"arr_{i}"] for i in order)
    return arrays


def _read_pt(path: Path) -> Any:
    size = regular_file(path)
    memory.require(size * COPIES, f"reading {path.name}")
    try:  # torch's warnings about a foreign pickle precede an error that says it all
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or pickled file
        raise DataError(
            f"cannot read {path} as tensors (torch.load with weights_only=True): "
            f"{type(exc).__name__}"
        ) from None
    ok = isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list, dict))
        and value
        and all(
            isinstance(v, torch.Tensor)
            for v in (value.values() if isinstance(value, dict) else value)
        )
    )
    if not ok:
        raise DataError(f"{path} must hold a tensor, or a tuple, list or dict of tensors")
    return value


def _split_pair(value: Any) -> tuple[Any, Any]:
    loaders = (Dataset, DataLoader)
    if isinstance(value, dict) and set(value) == {"train", "test"}:
        return value["train"], value["test"]
    if (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(part, loaders) for part in value)
    ):
        return value
    return value, None


def load_data(spec: str) -> tuple[Any, Any]:
    """``(train, test)`` from a data spec (see the module docstring); ``test`` is ``None``
    unless a function returned a pair."""
    path = Path(spec)
    if spec.endswith(DATA_SUFFIXES):
        if not path.exists():
            raise DataError(f"no data file {path}")
        loaded = (_read_npz(path) if spec.endswith(".npz") else _read_pt(path)), None
    elif ":" not in spec:
        raise ConfigError(
            f"expected a .npz or .pt file or FILE.py:FUNCTION for the data, got {spec!r}"
        )
    else:
        loaded = _split_pair(call_factory(spec))
    for part in loaded:
        _check_finite(spec, part)
    return loaded


def _check_finite(spec: str, data: Any) -> None:
    """Refuse, naming ``spec``, the array and its first row, floating-point arrays or tensors
    of ``data`` (one, or a tuple, list or dict of them) that hold NaN or infinite values:
    checked once, as loaded, so that no epoch trains on them. A Dataset's items are checked
    batch by batch, as they are made."""
    if isinstance(data, dict):
        named = [(f"the array {key!r}", value) for key, value in data.items()]
    elif isinstance(data, (tuple, list)):
        named = [(f"array {i}", value) for i, value in enumerate(data)]
    else:
        named = [("the array", data)]
    for where, value in named:
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and value.ndim
            and value.numel()
        ):
            flat = value.detach().reshape(len(value), -1)
            bad = ~torch.isfinite(flat)
        elif (
            isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.ndim and value.size
        ):
            flat = value.reshape(len(value), -1)
            bad = ~np.isfinite(flat)
        else:
            continue
        rows = bad.any(1).tolist()
        if True in rows:
            row = rows.index(True)
            shown = str(float(flat[row][bad[row]][0])).replace("nan", "NaN")
            raise DataError(
                f"{spec}: {where} holds {shown} in row {row} "
                f"({sum(rows)} of its {len(rows)} rows hold NaN or infinite values): "
                "training and evaluation need finite data"
            )
