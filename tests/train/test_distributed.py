"""Data-parallel training and sharded evaluation with 2 gloo processes on 127.0.0.1.

The ranks run tests/support/distributed_worker.py (or ``python -m torch.distributed.run -m
pyro_vae``); every launch is bounded by ``LAUNCH_TIMEOUT_S`` and its processes are killed if it
overruns.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_worker import (
    COLLECTIVE_TIMEOUT_S,
    CONFIG,
    EVAL,
    FAIL_AT_STEP,
    HALF_BATCH,
    HANG_TIMEOUT_S,
    run_steps,
    step_fixture,
)
from torch.utils.data import DistributedSampler

from pyro_vae import fit
from pyro_vae.app.cli import EXIT_USER_ERROR, main
from pyro_vae.data.images import load_digits
from pyro_vae.evaluate import evaluate_dataset
from pyro_vae.runs import CHECKPOINT_FILE, evaluate_run, load_checkpoint
from pyro_vae.util.distributed import (
    ENV_TIMEOUT,
    EXIT_BROKEN_GROUP,
    MAX_CAUSE_CHARS,
    SINGLE,
    DistributedContext,
    DistributedError,
    derive_seed,
    init_distributed,
    rank_seed,
    shard_indices,
)
from pyro_vae.util.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parents[1] / "support"
WORKER = SUPPORT / "distributed_worker.py"
WORLD_SIZE = 2
LAUNCH_TIMEOUT_S = 240
FAILURE_SEEN_WITHIN_S = 90
TORCHRUN_FAILED = 1
STEP_RTOL, STEP_ATOL = 1e-5, 1e-6
TORCHRUN_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {key: value for key, value in os.environ.items() if key not in TORCHRUN_VARIABLES}
    return {**env, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _rank_env(rank: int, port: str) -> dict:
    """The environment torchrun gives rank ``rank`` of WORLD_SIZE on this machine."""
    return _env(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE),
        LOCAL_WORLD_SIZE=str(WORLD_SIZE),
    )


def _start_ranks(scenario: str, out: Path) -> list[tuple[subprocess.Popen, Path]]:
    out.mkdir(parents=True, exist_ok=True)
    port = str(_free_port())
    ranks = []
    for rank in range(WORLD_SIZE):
        log = out / f"rank{rank}.log"
        env = _rank_env(rank, port)
        with log.open("w") as handle:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(out)],
                env=env,
                cwd=REPO,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
        ranks.append((process, log))
    return ranks


def _finish(ranks: list[tuple[subprocess.Popen, Path]], timeout: float) -> list[int]:
    """Wait for every rank until ``timeout`` seconds from now, then kill the ones still running
    (their exit code is then negative)."""
    deadline = time.monotonic() + timeout
    for process, _ in ranks:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            break
    for process, _ in ranks:
        if process.poll() is None:
            process.kill()
            process.wait()
    return [process.returncode for process, _ in ranks]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks of the main scenario: steps, training, resume, sharded evaluation."""
    out = tmp_path_factory.mktemp("two_ranks")
    ranks = _start_ranks("main", out)
    codes = _finish(ranks, LAUNCH_TIMEOUT_S)
    logs = "\n".join(log.read_text() for _, log in ranks)
    assert codes == [0] * WORLD_SIZE, logs
    saved = [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    return out, saved


def _assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_main_first_lets_the_other_ranks_in_once_rank_0_is_done(two_ranks):
    _, saved = two_ranks
    assert all(rank["saw_marker"] for rank in saved)


def test_gradient_averaging_equals_a_step_on_the_combined_batch(two_ranks):
    _, saved = two_ranks
    _assert_equal_states(saved[0]["step"], saved[1]["step"])
    vae, images, optimizer = step_fixture()
    initial = {name: value.clone() for name, value in vae.state_dict().items()}
    run_steps(vae, optimizer, [(0, images[:HALF_BATCH]), (1, images[HALF_BATCH:])])
    for name, value in vae.state_dict().items():
        assert not torch.equal(value, initial[name]), name
        torch.testing.assert_close(saved[0]["step"][name], value, rtol=STEP_RTOL, atol=STEP_ATOL)


def test_ranks_stay_in_sync_and_resume_continues_exactly(two_ranks):
    out, saved = two_ranks
    for rank in saved:
        _assert_equal_states(rank["full"], saved[0]["full"])
        _assert_equal_states(rank["resumed"], saved[0]["full"])
        assert rank["resumed_history"]["train_loss"] == saved[0]["history"]["train_loss"]
        assert rank["resumed_history"]["test_elbo"] == saved[0]["history"]["test_elbo"]
    assert saved[0]["history"]["final"]["particles"] == CONFIG.final_particles
    state = load_checkpoint(out / "part")
    assert state["distributed"]["world_size"] == WORLD_SIZE
    rng = state["distributed"]["rng"]
    assert len(rng) == WORLD_SIZE and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert json.loads((out / "part" / "history.json").read_text())["epoch"] == [1, 2]
    for name in ("config.json", "model.safetensors", "samples.png", "curves.png"):
        assert (out / "part" / name).stat().st_size > 0
    assert not list((out / "part").glob(".*.tmp"))


def test_a_distributed_run_resumes_only_with_its_world_size(two_ranks):
    out, _ = two_ranks
    with pytest.raises(CheckpointError, match="trained by 2 process"):
        fit(config=CONFIG.replace(epochs=3), run_dir=out / "full", resume=True, progress=False)


def test_sharded_evaluation_equals_a_single_process(two_ranks):
    out, saved = two_ranks
    single = evaluate_run(out / "full", out=out / "single", **EVAL)
    for rank in saved:
        for name in ("log_px", "elbo", "ess", "khat"):
            assert rank[name].shape == (EVAL["limit"],)
            assert torch.equal(rank[name], getattr(single, name)), name
    written = json.loads((out / "eval" / "eval-test.json").read_text())
    assert written["summary"]["num_datapoints"] == EVAL["limit"]


def test_each_epoch_deals_a_new_shared_permutation_whose_shards_cover_the_training_set(two_ranks):
    """fit()'s own calls of shard_indices, recorded on each rank: full run epochs 1..E, the
    1-epoch run, then its resumption's epochs 2..E."""
    _, saved = two_ranks
    num_train = len(load_digits().train)
    per_rank = -(-num_train // WORLD_SIZE)
    epochs = [*range(1, CONFIG.epochs + 1), 1, *range(2, CONFIG.epochs + 1)]
    for rank in saved:
        assert len(rank["orders"]) == len(rank["shards"]) == len(epochs)
    for call in range(len(epochs)):
        order = saved[0]["orders"][call]
        assert torch.equal(order.sort().values, torch.arange(num_train))
        shards = [rank["shards"][call] for rank in saved]
        for rank in saved:
            assert torch.equal(rank["orders"][call], order)
        assert [len(shard) for shard in shards] == [per_rank] * WORLD_SIZE
        counts = torch.bincount(torch.cat(shards), minlength=num_train)
        assert counts.min() >= 1  # the rest of the W * per_rank entries is the padding
        same_epoch = [other for other in range(call) if epochs[other] == epochs[call]]
        for other in range(call):
            assert torch.equal(saved[0]["orders"][other], order) == (other in same_epoch), (
                epochs[other],
                epochs[call],
            )


def test_ranks_that_drift_apart_stop_together_with_one_clear_message(tmp_path):
    """Rank 1 adds to one entry of its averaged gradients once. Adam is elementwise and the
    later averaged gradients are the same on both ranks, so exactly that one parameter value
    differs after the first epoch: the check then stops both ranks before any checkpoint."""
    ranks = _start_ranks("drift", tmp_path)
    codes = _finish(ranks, LAUNCH_TIMEOUT_S)
    logs = [log.read_text() for _, log in ranks]
    assert codes == [EXIT_USER_ERROR] * WORLD_SIZE, logs
    for rank, text in enumerate(logs):
        assert "Traceback" not in text and "terminate called" not in text, text
        errors = [line for line in text.splitlines() if "error:" in line]
        assert errors == [
            f"pyro-vae train: error: rank {rank} of {WORLD_SIZE}: the ranks' "
            "parameters have drifted apart (1 value differs from rank 0's, counted "
            "over all ranks); the gradient reduction is broken"
        ], text
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


@pytest.mark.parametrize("how", ["hang", "kill"])
def test_a_failed_rank_makes_the_others_exit_with_one_clear_message(tmp_path, how):
    """Rank 1 hangs past the 5 s timeout, or dies (SIGKILL, under a 120 s timeout: rank 0 must
    not wait for it). Rank 0 prints the command line's one error line and exits with
    EXIT_BROKEN_GROUP, without a traceback and without gloo's teardown aborting it."""
    ranks = _start_ranks(how, tmp_path)
    rank0, log0 = ranks[0]
    start = time.monotonic()
    try:
        code = rank0.wait(timeout=FAILURE_SEEN_WITHIN_S)
    finally:
        _finish(ranks, 0)
    text = log0.read_text()
    assert code == EXIT_BROKEN_GROUP, text
    assert time.monotonic() - start < FAILURE_SEEN_WITHIN_S
    assert "Traceback" not in text and "terminate called" not in text, text
    errors = [line for line in text.splitlines() if "error:" in line]
    timeout = HANG_TIMEOUT_S if how == "hang" else COLLECTIVE_TIMEOUT_S
    assert len(errors) == 1, text
    assert errors[0].startswith(
        "pyro-vae train: error: rank 0 of 2: averaging gradients failed: "
        f"another rank died or gave no answer within {timeout:g} s ("
    ), text
    assert errors[0].endswith(
        f"a slow step needs a longer --dist-timeout SECONDS or ${ENV_TIMEOUT}."
    ), text
    assert f"rank 1: {how} at step {FAIL_AT_STEP}" in ranks[1][1].read_text()


def test_collective_errors_are_cut_at_a_word_boundary(monkeypatch):
    from pyro_vae.util.distributed import all_reduce_sum

    words = "gloo said something long " * 20

    def failing_all_reduce(tensor):
        raise RuntimeError(f"[gloo/pair.cc:1] {words}\nsecond line")

    monkeypatch.setattr(torch.distributed, "all_reduce", failing_all_reduce)
    context = DistributedContext(1, 2, timeout_s=7.0)
    with pytest.raises(DistributedError) as info:
        all_reduce_sum(torch.zeros(1), context, "summing")
    cause = str(info.value).split("(", 1)[1].split(")", 1)[0]
    assert str(info.value).startswith(
        "rank 1 of 2: summing failed: another rank died or gave no answer within 7 s (gloo said"
    )
    assert cause.endswith("...") and len(cause) <= MAX_CAUSE_CHARS
    assert words.startswith(cause[:-3] + " ") and "second line" not in str(info.value)


def _torchrun(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc-per-node={WORLD_SIZE}",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "-m",
            "pyro_vae",
            *command,
        ],
        env=_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )


def test_torchrun_trains_and_evaluates_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    commands = [
        [
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "256",
            "--latent-dim",
            "2",
            "--hidden",
            "8",
            "--device",
            "cpu",
            "--out",
            str(run_dir),
            "--quiet",
            "--dist-timeout",
            "120",
        ],
        [
            "evaluate",
            str(run_dir),
            "--particles",
            "5",
            "--limit",
            "20",
            "--device",
            "cpu",
            "--quiet",
        ],
    ]
    for command in commands:
        done = _torchrun(command, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("wrote" if command[0] == "evaluate" else "run written") == 1
    assert load_checkpoint(run_dir)["distributed"]["world_size"] == WORLD_SIZE
    assert (run_dir / "eval-test.json").is_file()


def test_under_torchrun_a_bad_input_fails_each_rank_with_its_one_line(tmp_path):
    """Every rank meets the missing data and prints the line (unless torchrun stopped it first,
    once the other had exited with status 2); torchrun reports the failure and exits with 1."""
    done = _torchrun(
        [
            "train",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
        tmp_path,
    )
    assert done.returncode == TORCHRUN_FAILED, done.stderr
    assert done.stdout == ""
    lines = done.stderr.count("pyro-vae train: error: --data-dir ")
    assert 1 <= lines <= WORLD_SIZE, done.stderr
    assert re.search(r"exitcode\s*:\s*2\b", done.stderr), done.stderr
    assert not (tmp_path / "run").exists()


def test_shards_are_those_of_distributed_sampler():
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    for world_size in (1, 2, 3, 4):
        shards = []
        for rank in range(world_size):
            sampler = DistributedSampler(
                range(11), num_replicas=world_size, rank=rank, shuffle=False
            )
            shard = shard_indices(order, DistributedContext(rank, world_size))
            assert torch.equal(shard, order[list(sampler)])
            shards.append(shard)
        assert {len(shard) for shard in shards} == {-(-11 // world_size)}
        assert set(torch.cat(shards).tolist()) == set(range(11))


def test_seeds():
    assert rank_seed(7, 0) == 7
    seeds = {rank_seed(7, rank) for rank in range(4)} | {rank_seed(8, 1), derive_seed(7, 2)}
    assert len(seeds) == 6 and all(0 <= seed < 2**32 for seed in seeds)
    assert derive_seed(-1, 3, 0) == derive_seed(-1, 3, 0)


def test_a_single_process_joins_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") is SINGLE
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu", timeout_s=1) is SINGLE


def test_batch_seeds_leave_the_global_stream_alone_and_ignore_it():
    from linear_gaussian import LinearGaussian

    lg = LinearGaussian.random(4, 2, noise_scale=1.0, loc_shift=0.2, scale_factor=1.2)
    data = lg.sample(12, torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    first = evaluate_dataset(
        lg.model, lg.guide, data, num_particles=7, batch_size=4, batch_seed=5, khat=False
    )
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    again = evaluate_dataset(
        lg.model, lg.guide, data, num_particles=7, batch_size=4, batch_seed=5, khat=False
    )
    other = evaluate_dataset(
        lg.model, lg.guide, data, num_particles=7, batch_size=4, batch_seed=6, khat=False
    )
    assert torch.equal(first.log_px, again.log_px)
    assert not torch.equal(first.log_px, other.log_px)
    with pytest.raises(ConfigError, match="batch_seed"):
        evaluate_dataset(lg.model, lg.guide, data, num_particles=7, dist=DistributedContext(0, 2))


def test_dist_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dist-timeout", "0"])
    assert exit_info.value.code == 2
    assert "expected a number > 0" in capsys.readouterr().err


class _Reached(Exception):
    """Raised by a stand-in for what init_distributed does after its checks."""


def _fake_node(
    monkeypatch,
    gpus: int,
    *,
    rank: int,
    local_rank: int,
    world_size: int,
    local_world_size: int | None,
) -> list:
    """torchrun's variables for one process and a machine with ``gpus`` CUDA GPUs; joining a
    group or selecting a GPU raises :class:`_Reached` (recording the GPU) instead."""
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    if local_world_size is not None:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    selected = []

    def set_device(device) -> None:
        selected.append(torch.device(device))
        raise _Reached

    def init_process_group(*args, **kwargs) -> None:
        raise _Reached

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    return selected


def _too_few_gpus(processes: int, gpus: int, cli: bool = False) -> str:
    """The refusal, naming Python's parameter (``device="cuda"``) or the command line's flag."""
    cuda, auto, cpu = (
        ("--device cuda", "--device auto", "--device cpu")
        if cli
        else ('device="cuda"', 'device="auto"', 'device="cpu"')
    )
    return (
        f"{processes} processes on this node but {gpus} CUDA GPU{'s' if gpus > 1 else ''}: "
        f"on CUDA ({cuda}, or {auto} with a GPU present) each process needs a GPU of its "
        f"own; start at most {gpus} per node (torchrun --nproc-per-node={gpus}) or train on "
        f"the CPU with {cpu}"
    )


@pytest.mark.parametrize("local_world_size", [2, None])
def test_cuda_with_fewer_gpus_than_processes_on_the_node_fails_on_every_rank(
    monkeypatch, local_world_size
):
    """Without LOCAL_WORLD_SIZE rank 0 cannot know of rank 1 (and gets its GPU)."""
    for rank in range(2):
        selected = _fake_node(
            monkeypatch,
            1,
            rank=rank,
            local_rank=rank,
            world_size=2,
            local_world_size=local_world_size,
        )
        if local_world_size is None and rank == 0:
            with pytest.raises(_Reached):
                init_distributed("cuda", timeout_s=1)
            assert selected == [torch.device("cuda", 0)]
            continue
        with pytest.raises(ConfigError) as info:
            init_distributed("cuda", timeout_s=1)
        assert str(info.value) == _too_few_gpus(2, 1)
        assert selected == []
    assert not torch.distributed.is_initialized()


def test_cuda_ranks_take_the_gpu_of_their_local_rank(monkeypatch):
    """Node 1 of 2 with 4 processes each: global rank 5 is local rank 1 and takes cuda:1."""
    selected = _fake_node(monkeypatch, 4, rank=5, local_rank=1, world_size=8, local_world_size=4)
    with pytest.raises(_Reached):
        init_distributed("cuda", timeout_s=1)
    assert selected == [torch.device("cuda", 1)]
    selected = _fake_node(monkeypatch, 3, rank=5, local_rank=1, world_size=8, local_world_size=4)
    with pytest.raises(ConfigError, match="^4 processes on this node but 3 CUDA GPUs: "):
        init_distributed("cuda", timeout_s=1)
    assert selected == []


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("rank", [0, 1])
def test_device_auto_under_torchrun_with_too_few_gpus_is_one_line(
    monkeypatch, capsys, tmp_path, command, rank
):
    """--device auto picks CUDA when a GPU is present, so 2 processes on a 1-GPU machine get the
    error (not a silent CPU run); every rank meets it, rank 0 alone prints it; nothing is
    written."""
    _fake_node(monkeypatch, 1, rank=rank, local_rank=rank, world_size=2, local_world_size=2)
    run_dir = tmp_path / "run"
    argv = ["train", "--out", str(run_dir)] if command == "train" else ["evaluate", str(run_dir)]
    assert main([*argv, "--device", "auto", "--quiet"]) == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    line = f"pyro-vae {command}: error: {_too_few_gpus(2, 1, cli=True)}\n"
    assert captured.err == (line if rank == 0 else "")
    assert not run_dir.exists()


def test_torchrun_trains_a_users_pair_on_a_users_loader_and_resumes_exactly(tmp_path):
    """The sequence pair of user_models.py on its padded DataLoader (sharded among the ranks by
    the engine): an interrupted run resumed under torchrun equals the uninterrupted one."""
    user = Path(__file__).resolve().parents[1] / "support" / "user_models.py"
    common = [
        "--model-factory",
        f"{user}:make_sequence_model",
        "--data",
        f"{user}:sequence_data",
        "--device",
        "cpu",
        "--quiet",
        "--dist-timeout",
        "120",
    ]
    for command in (
        ["train", *common, "--epochs", "2", "--out", str(tmp_path / "full")],
        ["train", *common, "--epochs", "1", "--out", str(tmp_path / "part")],
        ["train", "--resume", str(tmp_path / "part"), "--epochs", "2", "--quiet"],
        ["evaluate", str(tmp_path / "part"), "--particles", "4", "--quiet"],
    ):
        done = _torchrun(command, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    full, part = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    assert part["distributed"]["world_size"] == WORLD_SIZE
    for name, value in full["model"].items():
        assert torch.equal(value, part["model"][name]), name
    assert full["history"]["train_loss"] == part["history"]["train_loss"]
    assert (tmp_path / "part" / "eval-test.json").is_file()


def test_world_size_without_a_rendezvous_address_is_one_line(tmp_path):
    """WORLD_SIZE set by hand (no torchrun): one line naming what is missing, exit 2, no folder."""
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "train", "--quiet", "--out", str(tmp_path / "run")],
        env=_env(WORLD_SIZE="2", RANK="0"),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT_S,
    )
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.strip() == (
        "pyro-vae train: error: WORLD_SIZE is 2 but MASTER_ADDR and MASTER_PORT are not set: "
        "launch the ranks with torchrun (which sets them), or unset WORLD_SIZE to run one "
        "process"
    )
    assert not (tmp_path / "run").exists()


RANK_DATA = """
import os
import sys

sys.path.insert(0, {tests!r})
from user_models import fa_data


def rank_data():
    return fa_data(num=120 if os.environ.get("RANK") == "0" else 80)


def rank_seeded():
    return fa_data(num=120, seed=int(os.environ.get("RANK", "0")))


def rank_reordered():
    data = fa_data(num=120)
    return data if os.environ.get("RANK") == "0" else data[::-1].copy()
"""


def _refused_on_every_rank(argv: list[str], tmp_path: Path) -> str:
    """Run ``argv`` as each of WORLD_SIZE ranks (torchrun's environment, no torchrun); check
    that every rank exits with EXIT_USER_ERROR after printing the same output; return it."""
    port, ranks = str(_free_port()), []
    for rank in range(WORLD_SIZE):
        log = tmp_path / f"rank{rank}.log"
        with log.open("w") as handle:
            ranks.append(
                (
                    subprocess.Popen(
                        argv,
                        env=_rank_env(rank, port),
                        cwd=tmp_path,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
    codes = _finish(ranks, LAUNCH_TIMEOUT_S)
    logs = [log.read_text().strip() for _, log in ranks]
    assert codes == [EXIT_USER_ERROR] * WORLD_SIZE, logs
    assert len(set(logs)) == 1, logs
    return logs[0]


@pytest.mark.parametrize("function", ["rank_data", "rank_seeded", "rank_reordered"])
def test_ranks_given_different_data_stop_with_the_same_line_before_training(tmp_path, function):
    """One gather compares the ranks' data, their sizes then their content (other values, or
    the same rows in another order): each rank prints the same line and exits with 2, and
    nothing is trained (no rank aborts in a collective of mismatched steps)."""
    data = tmp_path / "rank_data.py"
    data.write_text(RANK_DATA.format(tests=str(SUPPORT)))
    argv = [
        sys.executable,
        "-m",
        "pyro_vae",
        "train",
        "--model-factory",
        f"{SUPPORT / 'user_models.py'}:make_fa",
        "--data",
        f"{data}:{function}",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--quiet",
        "--dist-timeout",
        "60",
        "--out",
        str(tmp_path / "run"),
    ]
    from user_models import FA_DIM

    line = _refused_on_every_rank(argv, tmp_path)
    if function == "rank_data":
        assert line == (
            f"pyro-vae train: error: the ranks were given different data (rank 0: training 120 "
            f"datapoints of [{FA_DIM}], test none; rank 1: training 80 datapoints of "
            f"[{FA_DIM}], test none): every rank must load the same data"
        )
    else:
        sums = r"training sums [-\d.e+]+/[-\d.e+]+/[-\d.e+]+, test none"
        assert re.fullmatch(
            rf"pyro-vae train: error: the ranks were given different data content \(rank 0: "
            rf"{sums}; rank 1: {sums}\): every rank must load the same data",
            line,
        ), line
    assert not (tmp_path / "run" / CHECKPOINT_FILE).exists()


def test_ranks_evaluating_data_of_different_sizes_stop_with_the_same_line(tmp_path):
    """Sharded evaluation compares the ranks' data before it shares the batches out: a gather
    of results over different data would put rows where they do not belong."""
    data = tmp_path / "rank_data.py"
    data.write_text(RANK_DATA.format(tests=str(SUPPORT)))
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model-factory",
                f"{SUPPORT / 'user_models.py'}:make_fa",
                "--data",
                f"{data}:rank_data",
                "--epochs",
                "1",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                str(run_dir),
            ]
        )
        == 0
    )
    argv = [
        sys.executable,
        "-m",
        "pyro_vae",
        "evaluate",
        str(run_dir),
        "--data",
        f"{data}:rank_data",
        "--particles",
        "5",
        "--device",
        "cpu",
        "--quiet",
        "--dist-timeout",
        "60",
    ]
    from user_models import FA_DIM

    assert _refused_on_every_rank(argv, tmp_path) == (
        f"pyro-vae evaluate: error: the ranks were given different data (rank 0: 120 "
        f"datapoints of [{FA_DIM}]; rank 1: 80 datapoints of [{FA_DIM}]): every rank must "
        "load the same data"
    )
    assert not list(run_dir.glob("eval-*"))
