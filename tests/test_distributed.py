"""Issue 11, data parallel under torchrun (gloo on the CPU, 2 ranks): 2 ranks x B/2 rows per
step train the weights of 1 process x B, also in a sweep; an interrupted job resumes exactly,
and only with its world size; a rank killed with SIGKILL stops the other within 60 s with an
``error:`` line; ranks whose settings or caches differ refuse to start."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flashsae.train.__main__ import main as train_main
from tests.helpers import cli_env
from tests.test_train_robust import SITE, last_error, random_rows, write_cache

DRIVER = Path(__file__).with_name("dist_driver.py")
COMMON = ["--model", "bytelm-tiny", "--site", SITE, "--tokens", "4096", "--batch-size", "512"]
COMMON += ["--n-latents", "128", "--k", "4", "--eval-tokens", "512", "--checkpoint-every", "2"]
COMMON += ["--allow-other-model", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("fast_cpu")  # conftest: torch path, no W&B


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 1000-row shards, 4 per loader buffer: every buffer's rows divide by 2, so the two ranks'
    # rows of a step are exactly the rows of the one process's step
    return write_cache(tmp_path_factory.mktemp("dist") / "cache", random_rows(rows=4096))


def torchrun(*args: str, timeout: int = 180) -> tuple[subprocess.CompletedProcess, float]:
    """``tests/dist_driver.py args`` on 2 ranks (gloo, CPU); (the finished process, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    start = time.monotonic()
    done = subprocess.run(
        [*cmd, str(DRIVER), *args],
        capture_output=True,
        text=True,
        env=cli_env(WANDB_MODE="disabled", OMP_NUM_THREADS="1"),
        timeout=timeout,
    )
    return done, time.monotonic() - start


def assert_close_weights(a: Path, b: Path) -> None:
    """The same tensors, equal up to fp32 rounding (relative error of each below 1e-5)."""
    wa, wb = load_file(a / "sae.safetensors"), load_file(b / "sae.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        err = (wa[name] - wb[name]).norm() / wa[name].norm().clamp_min(1e-12)
        assert err < 1e-5, (a, name, float(err))


def test_two_ranks_train_one_process_weights_and_resume_exactly(tmp_path, cache):
    """A sweep (TopK with its batch-normalized loss, AuxK and dead latents; JumpReLU) on 2
    ranks, Ctrl-C at step 5 and resumed on 2 ranks, ends with the weights of one process
    training the same sweep uninterrupted; resuming it in one process is refused."""
    flags = [*COMMON, "--cache", str(cache), "--arch", "topk,jumprelu"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_main([*flags, "--out", str(one)]) == 0
    done, _ = torchrun("--stop-at", "5", "::", *flags, "--out", str(two))
    assert done.returncode != 0, done.stderr
    for member in ("topk", "jumprelu"):
        state = torch.load(two / member / "train_state.pt", weights_only=True)
        assert (state["step"], state["world_size"]) == (4, 2)
        assert not (two / member / "metrics.json").exists()
    assert train_main(["--resume", str(two)]) == 2
    done, _ = torchrun("::", "--resume", str(two))
    assert done.returncode == 0, done.stderr[-3000:]
    for member in ("topk", "jumprelu"):
        assert_close_weights(one / member, two / member)
        metrics = json.loads((two / member / "metrics.json").read_text())
        assert metrics["tokens"] == 4096
    assert "fvu" in (two / "sweep.md").read_text()


def test_resume_refuses_another_world_size(tmp_path, cache, capsys):
    """A run saved by 2 ranks is not resumed by 1 process (the message says how to)."""
    out = tmp_path / "run"
    assert train_main([*COMMON, "--cache", str(cache), "--out", str(out), "--tokens", "512"]) == 0
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["world_size"] == 1
    (out / "metrics.json").unlink()  # make it an unfinished run again, saved by 2 ranks
    torch.save(state | {"world_size": 2}, out / "train_state.pt")
    assert train_main(["--resume", str(out)]) == 2
    err = last_error(capsys)
    assert "2 processes (torchrun)" in err and "resume it with 2 processes" in err, err


def test_a_killed_rank_stops_the_other_with_a_message(tmp_path, cache):
    done, seconds = torchrun("--kill-at", "3", "::", *COMMON, "--cache", str(cache),
                             "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode != 0
    assert seconds < 60
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: rank 0 of 2")]
    assert lines, done.stderr[-3000:]
    assert "another rank" in lines[0]
    assert "[rank0]: Traceback" not in done.stderr, done.stderr[-3000:]


def test_ranks_that_disagree_refuse_to_start(tmp_path, cache):
    """A setting that differs, or a cache whose contents differ, is named on every rank."""
    done, _ = torchrun("::", *COMMON, "--cache", str(cache), "--out", str(tmp_path / "a"),
                       "::", "--lr", "0.002")  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and "--lr" in errors[0] and "0.002" in errors[0], done.stderr[-3000:]
    assert not (tmp_path / "a" / "train_state.pt").exists()

    rows = random_rows(rows=4096)
    rows[7, 3] += 1.0
    other = write_cache(tmp_path / "other", rows)
    done, _ = torchrun("::", *COMMON, "--cache", str(cache), "--out", str(tmp_path / "b"),
                       "::", "--cache", str(other))  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and "activation cache" in errors[0], done.stderr[-3000:]


def test_make_train_uses_torchrun_for_several_processes():
    root = Path(__file__).resolve().parent.parent

    def dry_run(*args: str) -> str:
        cmd = ["make", "-s", "-n", "-C", str(root), "train", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return " ".join(out.split())

    assert "torchrun --standalone --nproc-per-node 2 -m flashsae.train --arch relu" in dry_run(
        "NPROC=2", "ARCH=relu"
    )
    for single in ("", "NPROC=1"):
        out = dry_run(*[a for a in [single] if a])
        assert "python -m flashsae.train" in out and "torchrun" not in out


def test_sigterm_stops_a_rank_blocked_in_a_call_with_one_error_line():
    """torchrun's SIGTERM to the survivors of a dead rank is answered even while the main
    thread waits in a blocking call: one ``error:`` line, exit code 143."""
    code = (
        "import os; from flashsae.train.distributed import _answer_sigterm; "
        "_answer_sigterm('rank 1 of 2'); print('ready', flush=True); os.read(os.pipe()[0], 1)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert err.strip().splitlines() == [
        "error: rank 1 of 2: stopped by the launcher (SIGTERM): another rank failed or was "
        "killed, or the job was stopped; its message or torchrun's summary names it"
    ]
