"""Atomic writes: all or nothing, with the permissions of an ordinary file."""

import os
import stat

import pytest

from pyro_vae.util.io import atomic_path, write_json, write_text


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "history.json"
    write_json(target, {"epoch": [1]})
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"epoch": [1, 2')  # half-written
            raise RuntimeError("stopped")
    assert target.read_text() == '{\n  "epoch": [\n    1\n  ]\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_written_files_get_the_mode_an_ordinary_file_would(tmp_path, umask, mask):
    umask(mask)
    write_text(tmp_path / "atomic.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    modes = [stat.S_IMODE((tmp_path / name).stat().st_mode) for name in ("atomic.txt", "plain.txt")]
    assert modes[0] == modes[1] == 0o666 & ~mask
