"""A crash in native code (abort, segmentation fault, SIGKILL) of the user's code ends the
``pyro-vae`` program with one line naming the user's file and line, exit status 2, and no
crash file left behind; signals sent to the program reach the command."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pyro_vae.app.supervisor import describe_crash

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the supervisor is POSIX only")

CRASHY = """
import ctypes, os, signal, sys, time


def aborts():
    os.abort()


def segfaults():
    ctypes.string_at(0)


def killed():
    os.kill(os.getpid(), signal.SIGKILL)


def sleeps():
    print("ready", flush=True)
    time.sleep(60)
"""


def _program(tmp_path, *args, **popen):
    (tmp_path / "crashy.py").write_text(CRASHY)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "GROUP_RANK"):
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@pytest.mark.parametrize(
    "function, line, name", [("aborts", 6, "SIGABRT"), ("segfaults", 10, "SIGSEGV")]
)
def test_a_crash_in_the_users_factory_is_one_line_naming_its_file_and_line(
    tmp_path, function, line, name
):
    program = _program(
        tmp_path, "train", "--model-factory", f"crashy.py:{function}", "--epochs", "1", "--quiet"
    )
    out, err = program.communicate(timeout=120)
    assert program.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"pyro-vae train: error: {tmp_path / 'crashy.py'}:{line}: the process died of {name}"
    )
    assert function in lines[0] and "Traceback" not in err and out == ""
    assert os.listdir(tmp_path / "tmp") == []  # the crash file is gone


ENDING = """
import os
import pyro, pyro.distributions as dist, torch


class Pair(torch.nn.Module):  # ends the process in its model when the file "end" says how
    def __init__(self):
        super().__init__()
        self.dec, self.enc = torch.nn.Linear(2, 64), torch.nn.Linear(64, 4)

    def model(self, x):
        if os.path.exists("end"):
            os.abort() if open("end").read() == "abort" else os._exit(0)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.dec(z)).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            h = self.enc(x)
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))
"""
ENDED = (
    "pyro-vae train: error: the process ended with status 0 before the command finished, "
    "without a word (os._exit in a model, guide, factory or data function?)"
)


def _train(tmp_path, *args):
    (tmp_path / "ending.py").write_text(ENDING)
    factory = [] if "--resume" in args else ["--model-factory", "ending.py:Pair"]
    program = _program(tmp_path, "train", *factory, *args)
    out, err = program.communicate(timeout=120)
    return program.returncode, err.strip().splitlines()


@pytest.mark.parametrize("end", ["exit", "abort"])
def test_a_start_the_users_code_ends_outright_leaves_no_run_folder(tmp_path, end):
    (tmp_path / "end").write_text(end)
    status, lines = _train(tmp_path, "--out", "runs/new", "--quiet")
    assert status == 2 and len(lines) == 1, lines
    aborted = f"pyro-vae train: error: {tmp_path / 'ending.py'}:13: the process died of SIGABRT"
    assert lines[0] == ENDED if end == "exit" else lines[0].startswith(aborted), lines
    assert not (tmp_path / "runs").exists()  # no config.json, no .lock, no folders
    assert not [n for n in os.listdir(tmp_path / "tmp") if n.startswith("pyro-vae-")]


def test_a_resumed_run_the_users_code_ends_outright_is_left_as_it_was(tmp_path):
    run = tmp_path / "run"
    assert _train(tmp_path, "--out", run, "--epochs", "1", "--batch-size", "512", "--quiet")[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    (tmp_path / "end").write_text("exit")
    assert _train(tmp_path, "--resume", run, "--epochs", "2", "--quiet") == (2, [ENDED])
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # and no stale .lock


def test_a_process_killed_outright_says_so_and_exits_with_the_signals_status(tmp_path):
    program = _program(tmp_path, "train", "--model-factory", "crashy.py:killed", "--quiet")
    _, err = program.communicate(timeout=120)
    assert program.returncode == 128 + signal.SIGKILL
    assert err.strip().splitlines() == [
        "pyro-vae train: error: the process was killed by SIGKILL (Killed): nothing could report "
        "where; the system may have run out of memory (ask for less, or see --max-memory)"
    ]


@pytest.mark.parametrize(
    "signum, status, word",
    [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_sent_to_the_program_reaches_the_command(tmp_path, signum, status, word):
    program = _program(tmp_path, "train", "--model-factory", "crashy.py:sleeps", "--quiet")
    assert program.stdout.readline() == "ready\n"  # the command runs the user's code
    program.send_signal(signum)
    _, err = program.communicate(timeout=120)
    assert program.returncode == status, err
    assert err.strip().splitlines()[-1].startswith(f"pyro-vae train: {word}")
    assert "Traceback" not in err


def test_the_program_runs_its_command_in_a_child_it_watches(tmp_path):
    program = _program(tmp_path, "train", "--model-factory", "crashy.py:sleeps", "--quiet")
    assert program.stdout.readline() == "ready\n"
    children = _children(program.pid)
    program.send_signal(signal.SIGTERM)
    program.communicate(timeout=120)
    assert len(children) == 1
    for _ in range(100):  # the child has ended with the program
        if not os.path.exists(f"/proc/{children[0]}"):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the command's process outlived the program")


def _children(pid):
    path = f"/proc/{pid}/task/{pid}/children"
    if not os.path.exists(path):
        pytest.skip("no /proc children file")
    with open(path) as stream:
        return [int(child) for child in stream.read().split()]


DUMP = """Fatal Python error: Segmentation fault

Thread 0x00007f0000000002 (most recent call first):
  File "{user}", line 3 in other_thread

Current thread 0x00007f0000000001 (most recent call first):
  File "{lib}", line 200 in string_at
  File "{user}", line 12 in model
  File "{user}", line 40 in outer

Extension modules: numpy.core._multiarray_umath (total: 1)
"""


def test_the_crash_is_placed_at_the_innermost_user_frame_of_the_crashing_thread(tmp_path):
    user = str(tmp_path / "mine.py")
    lib = os.path.join(os.path.dirname(os.__file__), "ctypes", "__init__.py")
    line, at_fault = describe_crash(signal.SIGSEGV, DUMP.format(user=user, lib=lib))
    assert at_fault
    assert line == (
        f"{user}:12: the process died of SIGSEGV (Segmentation fault) in model, "
        "in the user's code (a model, guide, factory or data function)"
    )


def test_a_crash_outside_the_users_code_names_where_it_happened(tmp_path):
    lib = os.path.join(os.path.dirname(os.__file__), "ctypes", "__init__.py")
    dump = DUMP.format(user=lib, lib=lib)
    line, at_fault = describe_crash(signal.SIGSEGV, dump)
    assert not at_fault
    assert line == (
        f"the process died of SIGSEGV (Segmentation fault) in string_at "
        f"({lib}:200), outside the user's code"
    )
    assert describe_crash(signal.SIGBUS, "") == ("the process died of SIGBUS (Bus error)", False)


@pytest.mark.parametrize(
    "orig_argv, argv, expected",
    [
        (
            ["python", "-X", "importtime", "-m", "pyro_vae", "train", "--quiet"],
            ["train", "--quiet"],
            ["-X", "importtime"],
        ),
        (["python", "-W", "error", "-mpyro_vae"], [], ["-W", "error"]),
        (["python", "/usr/bin/pyro-vae", "train"], ["train"], []),
        (["python"], ["train"], []),  # not what this process was started with: nothing
    ],
)
def test_the_child_gets_the_interpreters_own_options(monkeypatch, orig_argv, argv, expected):
    from pyro_vae.app.supervisor import interpreter_options

    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    assert interpreter_options(argv) == expected
