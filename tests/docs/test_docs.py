"""Every page of the docs runs: README.md and docs/*.rst, one test per page.

Each page runs as one session in a fresh folder: its python blocks in one namespace, in order,
its bash blocks in a shell in that folder (``pyro-vae`` is ``python -m pyro_vae`` of this
checkout; the repository's ``benchmarks/`` and ``tests/`` are linked into the folder), on one
torch thread, and every output block is compared with what its block printed. The conventions
a page follows are in ``docs_pages.py``. Estimators that a page registers
(:data:`pyro_vae.infer.CLASSES`) are forgotten after it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from docs_pages import OUTPUT, PageError, compare_output, parse_markdown, parse_page, parse_rst

from pyro_vae.infer import CLASSES

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md"] + sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.rst"))
BASH_TIMEOUT_S = 300
# Pages collected (test_every_page_says_whether_its_blocks_run parses them) but not run, and why.
NOT_RUN: dict[str, str] = {}
# Pages whose examples need an optional package (an extra of setup.cfg): skipped without it.
NEEDS: dict[str, str] = {"docs/lightning.rst": "lightning"}


def _shell_env(folder: Path) -> dict:
    bin_dir = folder / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    script = bin_dir / "pyro-vae"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m pyro_vae "$@"\n')
    script.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        MPLBACKEND="Agg",
        OMP_NUM_THREADS="1",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYRO_VAE_DATA_DIR", None)
    return env


def _run_python(block, page, namespace) -> str:
    code = compile("\n" * (block.line - 1) + block.code, str(ROOT / page), "exec")
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
    except Exception as exc:  # the page's own lines, not this file's or the page's source
        frames = traceback.extract_tb(exc.__traceback__)[1:]
        pytest.fail(
            f"{page}:{block.line}: the python block raised "
            f"{type(exc).__name__}: {exc}\n{''.join(traceback.format_list(frames))}",
            pytrace=False,
        )
    return printed.getvalue()


def _run_bash(block, page, folder, env) -> str:
    done = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.code],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=BASH_TIMEOUT_S,
    )
    if done.returncode:
        pytest.fail(
            f"{page}:{block.line}: the bash block exited with status "
            f"{done.returncode}:\n{done.stdout}",
            pytrace=False,
        )
    return done.stdout


def _forget_modules_under(folder: Path) -> None:
    """Modules imported from the page's folder (its my_models.py) must not reach other pages."""
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if file.startswith(str(folder)):
            del sys.modules[name]


def _write_files(blocks, folder: Path) -> None:
    """The blocks captioned with a file name, one after the other, make up that file, written
    before the page's other blocks run (as a reader saves it before running them)."""
    for block in blocks:
        if block.caption:
            with open(folder / block.caption, "a", encoding="utf-8") as file:
                file.write(block.code + "\n\n")
    importlib.invalidate_caches()


@pytest.mark.parametrize(
    "page",
    [
        pytest.param(page, marks=pytest.mark.skip(reason=NOT_RUN[page]))
        if page in NOT_RUN
        else page
        for page in PAGES
    ],
)
def test_page_runs_and_prints_what_it_shows(page, tmp_path, monkeypatch):
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    blocks = parse_page(ROOT / page)
    folder = tmp_path / "session"
    folder.mkdir()
    for name in ("benchmarks", "tests"):
        (folder / name).symlink_to(ROOT / name)
    env = _shell_env(folder)
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    namespace = {"__name__": "__main__"}
    printed = {}
    _write_files(blocks, folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: more threads only wait on a busy machine
    registered = dict(CLASSES)
    try:
        for index, block in enumerate(blocks):
            if block.caption:
                continue
            if block.language == "python":
                printed[index] = _run_python(block, page, namespace)
            elif block.language == "bash":
                printed[index] = _run_bash(block, page, folder, env)
            elif block.output_of is not None:
                difference = compare_output(printed[block.output_of], block.code, **block.options)
                if difference:
                    pytest.fail(
                        f"{page}:{block.line}: the output shown is not what line "
                        f"{blocks[block.output_of].line} printed: {difference}\n"
                        f"--- shown ---\n{block.code}--- printed ---\n"
                        f"{printed[block.output_of]}",
                        pytrace=False,
                    )
    finally:
        torch.set_num_threads(threads)
        CLASSES.clear()
        CLASSES.update(registered)
        _forget_modules_under(folder)


def test_every_page_says_whether_its_blocks_run():
    problems = []
    for page in PAGES:
        try:
            parse_page(ROOT / page)
        except PageError as exc:
            problems.append(f"{page}: {exc}")
    assert not problems, "\n".join(problems)


# The conventions themselves, on small pages.

RST = """\
Intro::

    shown only
"""


def test_a_bare_literal_block_is_refused():
    with pytest.raises(PageError, match="line 1: a bare '::'"):
        parse_rst(RST)


def test_an_output_block_follows_its_code_with_no_prose_between():
    blocks = parse_rst(
        ".. code-block:: python\n\n    print(1)\n\n.. doctest: tolerance 0.5\n"
        ".. code-block:: text\n\n    1.2\n\nProse.\n\n.. code-block:: text\n\n"
        "    not an output\n"
    )
    assert [b.language for b in blocks] == ["python", OUTPUT, OUTPUT]
    assert blocks[0].line == 3 and blocks[0].code == "print(1)\n"
    assert blocks[1].output_of == 0 and blocks[1].options == {"atol": 0.5}
    assert blocks[2].output_of is None


def test_markdown_fences_and_tolerance_comments():
    blocks = parse_markdown(
        "```bash\necho 1\n```\n<!-- doctest: tolerance 2% -->\n```text\n1\n```\n"
    )
    assert blocks[1].output_of == 0 and blocks[1].options == {"rtol": 0.02}


@pytest.mark.parametrize(
    "printed, shown, options, same",
    [
        ("a  -6.5304\nb", "a -6.5304 b", {}, True),
        ("a -6.5305", "a -6.5304", {}, False),
        ("a -6.5305", "a -6.5304", {"atol": 1e-3}, True),
        ("loss 103", "loss 100", {"rtol": 0.05}, True),
        ("loss 106", "loss 100", {"rtol": 0.05}, False),
        ("k-hat -inf, p_100(x) 1..30", "k-hat -inf, p_100(x) 1..30", {}, True),
        ("k-hat -inf", "k-hat 0.5", {"atol": 10}, False),
        ("pid 41207 here", "pid ... here", {}, True),
        ("eval-data-a.json", "eval-test.json", {}, False),
    ],
)
def test_compare_output(printed, shown, options, same):
    assert (compare_output(printed, shown, **options) is None) == same
