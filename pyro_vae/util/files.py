"""Files the package reads, checked before they are read: a regular file (not a device, a pipe
or a folder, even behind a symbolic link) of a bounded size, and for a ``.npz`` archive the
declared size and type of every member, before anything is decompressed.

JSON files (``config.json``, ``history.json``) are small by nature and bounded by
:data:`JSON_LIMIT`; a data file or checkpoint is bounded by the memory it needs
(:func:`pyro_vae.util.memory.require`), since it is read whole into memory.
"""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pyro_vae.util import memory
from pyro_vae.util.errors import DataError, PyroVAEError

JSON_LIMIT = 64 * 2**20
#: NumPy dtype kinds that hold numbers a tensor can take: bool, ints, unsigned, floats, complex
NUMERIC_KINDS = "biufc"
#: copies of the data while it is read: the arrays, and the tensors made from them
COPIES = 2


def regular_file(
    path: str | Path, limit: int | None = None, error: type[PyroVAEError] = DataError
) -> int:
    """The size of ``path``, refused with ``error`` unless it is a regular file (symbolic links
    followed) of at most ``limit`` bytes."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise error(f"no file {path}") from None
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "a device"
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode)
            else "a pipe"
            if stat.S_ISFIFO(info.st_mode)
            else "not a regular file"
        )
        raise error(
            f"{path} is {kind}, not a regular file"
            + (f" (a link to {os.path.realpath(path)})" if path.is_symlink() else "")
        )
    if limit is not None and info.st_size > limit:
        raise error(
            f"{path} holds {memory.format_bytes(info.st_size)}, more than the "
            f"{memory.format_bytes(limit)} such a file may hold"
        )
    return info.st_size


def read_json(
    path: str | Path, limit: int = JSON_LIMIT, error: type[PyroVAEError] = DataError
) -> Any:
    """The JSON value in ``path``, a regular file of at most ``limit`` bytes; a file that is
    not UTF-8 JSON, or nests too deeply for the parser, is refused with ``error``."""
    regular_file(path, limit, error)
    with open(path, "rb") as stream:
        raw = stream.read(limit + 1)
    if len(raw) > limit:  # grew since it was checked
        raise error(f"{path} holds more than the {memory.format_bytes(limit)} such a file may hold")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise error(
            f"cannot read {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except json.JSONDecodeError as exc:
        raise error(f"cannot read {path}: {exc}") from None
    except RecursionError:
        raise error(f"cannot read {path}: its JSON nests too deeply") from None


def check_npz(path: str | Path) -> None:
    """Refuse, before decompressing anything, a ``.npz`` file that is not a zip archive of
    ``.npy`` arrays of numbers, or whose arrays, at their declared sizes, do not fit in
    memory (a small archive may hold gigabytes of zeros)."""
    path = Path(path)
    regular_file(path)
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as stream:
            head = stream.read(6)
        what = (
            "an empty file"
            if not head
            else "a .npy file (one array): save it with numpy.savez"
            if head == b"\x93NUMPY"
            else "not a zip archive"
        )
        raise DataError(f"cannot read {path} as a .npz file of arrays: it is {what}")
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{path}: member {info.filename!r} is not a .npy array")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = header(member)
                if dtype.kind not in NUMERIC_KINDS or dtype.hasobject:
                    raise DataError(
                        f"{path}: array {info.filename[:-4]!r} holds {dtype} "
                        "values, not numbers (booleans, integers or floats)"
                    )
                # NumPy allocates the array its header declares before reading a member
                declared = float(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                total += max(info.file_size, declared)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        if isinstance(exc, PyroVAEError):
            raise
        raise DataError(f"cannot read {path} as a .npz file of arrays: {exc}") from None
    memory.require(
        total * COPIES,
        f"reading {path.name} ({memory.format_bytes(total)} of arrays once decompressed)",
    )
