"""What a watched child process (:mod:`pyro_vae.app.supervisor`) tells its parent through a file
the parent names: the run folder locks it holds (with the text it wrote in them), the run
folders it created (with the files it wrote there before training started), and, last, that
its command finished.

A child that ends without saying it finished (killed by a signal, or ended by ``os._exit`` in
the user's code, even with status 0) did not run its own clean-up; the parent then removes the
locks that still hold the child's text, and a folder the child created, with those files,
where it holds nothing else (no checkpoint: no epoch finished), so a start that trained
nothing leaves no trace. Each record is one line of JSON, appended at once: a line cut off by
the child's end is ignored. The user's files that a new run kept aside (:func:`kept_aside`)
are put back when no epoch finished. Outside a watched child (the parent names no file)
reporting does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

#: names the child's report file; set by the parent, read once by the child
REPORT_FILE_ENV = "PYRO_VAE_REPORT_FILE"
_FINISHED = "finished"
_report_file: str | None = None


def adopt(environ: dict) -> None:
    """In the child: take the report file the parent named (removed from ``environ``, so the
    processes the command starts do not report too)."""
    global _report_file
    _report_file = environ.pop(REPORT_FILE_ENV, None)


def _append(record: object) -> None:
    if _report_file is None:
        return
    with contextlib.suppress(OSError), open(_report_file, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")


def locked(path: Path, text: str) -> None:
    """The child holds the run folder lock ``path``, a file that holds ``text``."""
    _append({"lock": str(path), "text": text})


def created_run_folder(created: list[Path], files: list[Path]) -> None:
    """The folders a new run created (deepest first) and the files it wrote in them."""
    if created:
        _append({"created": [str(p) for p in created], "files": [str(p) for p in files]})


def kept_aside(moved: list[tuple[Path, Path]], unless: Path, writes: list[Path]) -> None:
    """The child renamed the user's files ``(original, kept)`` out of a new run's way, and
    will write the files ``writes`` (none there now); if it ends before ``unless`` (the run's
    first checkpoint) exists, those it wrote are removed and the user's files go back, so no
    later resume of a run that never started writes over them."""
    if moved:
        _append(
            {
                "kept": [[str(a), str(b)] for a, b in moved],
                "unless": str(unless),
                "writes": [str(p) for p in writes],
            }
        )


def finished() -> None:
    """The command finished (with whatever status): the child cleaned up after itself."""
    _append(_FINISHED)


def read_report(path: str) -> tuple[bool, list[dict]]:
    """Whether the child said it finished, and the run folders it created (see above)."""
    done, folders = False, []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return False, []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record == _FINISHED:
            done = True
        elif isinstance(record, dict):
            folders.append(record)
    return done, folders


def remove_leftovers(records: list[dict]) -> None:
    """After a child that did not finish: remove the lock files it held (those that still hold
    what it wrote in them), then each folder it created for a run with the files it wrote there,
    where the folder holds nothing else."""
    for record in records:
        if "lock" in record:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                if Path(record["lock"]).read_text(encoding="ascii") == record.get("text"):
                    os.unlink(record["lock"])
    for record in records:
        if "kept" in record and not Path(record.get("unless", "")).exists():
            for path in record.get("writes", []):
                with contextlib.suppress(OSError, TypeError):
                    os.unlink(path)
            _put_back(record["kept"])
    for record in records:
        if "created" in record:
            _remove_unfinished_start(record)


def _put_back(moved: list) -> None:
    """The user's files a run kept aside, under their names again where nothing took them."""
    for original, kept in moved:
        with contextlib.suppress(OSError, TypeError, ValueError):
            if os.path.lexists(kept) and not os.path.lexists(original):
                os.rename(kept, original)


def _remove_unfinished_start(record: dict) -> None:
    from pyro_vae.util import tempnames

    created = [Path(p) for p in record.get("created", [])]
    files = [Path(p) for p in record.get("files", [])]
    if not created or not created[0].is_dir():
        return
    tempnames.sweep(created[0])  # a gone writer's temporary files
    mine = {p.name for p in files if p.parent == created[0]}
    if not set(os.listdir(created[0])) <= mine:
        return
    for path in files:
        with contextlib.suppress(OSError):
            path.unlink()
    for folder in created:
        try:
            folder.rmdir()
        except OSError:
            break
