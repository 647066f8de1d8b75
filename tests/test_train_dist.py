"""Training in other processes: SIGKILL in the middle of a checkpoint write; SIGTERM mid-run, then `--resume`,
equal to the uninterrupted run; `torchrun` with 2 gloo processes (FSDP2) against one process, stopped by SIGTERM
and its sharded checkpoint resumed on one process; a write failing for want of space; Triton without a GPU."""
import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from test_train import base_yaml, step_losses, token_file, train

from olmo_fast import ModelConfig, OLMo
from olmo_fast.train import state


def cli(*args):
    return [sys.executable, "-m", "olmo_fast.cli", "train", *map(str, args)]


def sigterm_after_step(proc: subprocess.Popen, metrics: Path, step: int, pid: Callable[[], int] | None = None) -> str:
    """SIGTERM to `proc` (or to `pid()`) once metrics.jsonl records `step`; `proc`'s stderr once it has exited."""
    deadline = time.monotonic() + 120
    while not (metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()
                                        if line.endswith("}"))):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"step {step} was never logged"
        time.sleep(0.05)
    os.kill(pid() if pid else proc.pid, signal.SIGTERM)
    return proc.communicate(timeout=120)[1]


def torchrun_worker(launcher: int, rank: int) -> int:
    """The pid of torchrun `launcher`'s worker of `rank` (from /proc: its parent and its RANK variable)."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):  # gone, or not a process
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher:
                env = (entry / "environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in env:
                    return int(entry.name)
    raise AssertionError(f"no worker of rank {rank} under process {launcher}")


def test_sigterm_mid_run_saves_the_step_and_resume_equals_the_uninterrupted_run(tmp_path):
    """SIGTERM after step 3 is logged: the step in progress finishes, is saved, exit 143; `--resume` then gives
    bitwise the losses and weights of a run never interrupted, each step recorded once."""
    data = token_file(tmp_path / "ids.npy", 64 * 24)
    run, long = tmp_path / "run", "--max_duration=1000"  # far longer than the signal takes to arrive
    proc = subprocess.Popen(cli(base_yaml(tmp_path), f"--save_folder={run}", f"--data.paths=[{data}]", long),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = sigterm_after_step(proc, run / "metrics.jsonl", 3)
    finally:
        proc.kill()
        proc.wait()
    stopped = state.latest_checkpoint(run)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.splitlines()[-1] == (f"interrupted: SIGTERM after step {stopped.name[4:]}: checkpoint written to "
                                    f"{stopped}; continue with --resume"), err
    assert "Traceback" not in err
    k = int(stopped.name[4:])
    assert 3 <= k < 1000 and [p.name for p in run.glob("step*")] == [stopped.name]
    end = f"--stop_at={k + 3}"
    resumed = train(run, data, long, "--resume", end)
    whole = train(tmp_path / "whole", data, long, end)
    assert step_losses(run) == step_losses(tmp_path / "whole")  # every step once, exactly equal
    assert list(step_losses(run)) == list(range(1, k + 4))
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_write_failing_for_want_of_space_ends_in_one_line(tmp_path):
    """A real writer against a real limit: RLIMIT_FSIZE makes the checkpoint's tensor file fail with EFBIG (as a
    full disk fails with ENOSPC); the run ends with exit 1 and one line naming the checkpoint, no writer noise."""
    data = token_file(tmp_path / "ids.npy", 64 * 16)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # above metrics and config, below the model

    done = subprocess.run(cli(base_yaml(tmp_path), f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                              "--save_interval=2"), preexec_fn=limit_file_size, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr
    assert done.stderr.startswith(f"error: cannot write the checkpoint {tmp_path / 'run' / 'step2'}: "
                                  f"{os.strerror(errno.EFBIG)} (errno {errno.EFBIG}) ("), done.stderr
    assert done.stderr.rstrip().endswith("free on its disk)"), done.stderr
    assert state.latest_checkpoint(tmp_path / "run") is None


def test_triton_backend_without_gpu_or_interpreter_fails_before_any_work(tmp_path):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(cli(base_yaml(tmp_path), f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                              "--backend=triton", "--device=cpu"), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: backend 'triton' cannot train on cpu: "), done.stderr
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "run").exists()


def test_sigkill_during_checkpoint_write_then_resume_from_last_complete(tmp_path):
    data = token_file(tmp_path / "ids.npy", 64 * 24)
    run, common = tmp_path / "run", ["--max_duration=6", "--save_interval=2"]
    train(tmp_path / "whole", data, *common)
    train(run, data, *common, "--stop_at=2")
    env = dict(os.environ, OLMO_FAST_CHECKPOINT_DELAY="120")  # sleeps inside the write of each checkpoint
    proc = subprocess.Popen(cli(base_yaml(tmp_path), f"--save_folder={run}", f"--data.paths=[{data}]", *common,
                                "--resume"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".tmp-step4" / "model.json").exists():  # tensors written, not yet made complete
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the checkpoint write never started"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert state.latest_checkpoint(run).name == "step2"
    assert not (run / "step4").exists()
    messages = []
    train(run, data, *common, "--resume", log=messages.append)
    assert any("resuming from" in m and m.rstrip(")").endswith("step 2") for m in messages), messages
    whole, resumed = step_losses(tmp_path / "whole"), step_losses(run)
    assert [whole[s] for s in range(1, 7)] == [resumed[s] for s in range(1, 7)]  # lost nothing but steps 3-4
    assert sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp", "step"))) == ["step2", "step4", "step6"]


def test_torchrun_two_gloo_processes_stop_together_on_sigterm_match_one_and_resume_on_one(tmp_path):
    """Both start from the same HF weights (rank 0 reads them and scatters them to the shards). SIGTERM to rank 1
    alone: both ranks agree to stop after the same step, both save it and exit 143 (no rank left waiting)."""
    data = token_file(tmp_path / "ids.npy", 64 * 32)
    torch.manual_seed(5)
    OLMo(ModelConfig.preset("test")).save_pretrained(tmp_path / "hf")
    common = ["--max_duration=1000", "--save_interval=2", f"--load_path={tmp_path / 'hf'}", "--model=null"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
              "olmo_fast.cli", "train", str(base_yaml(tmp_path)), f"--save_folder={tmp_path / 'two'}",
              f"--data.paths=[{data}]", *common]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = sigterm_after_step(proc, tmp_path / "two" / "metrics.jsonl", 2, lambda: torchrun_worker(proc.pid, 1))
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    stopped = state.latest_checkpoint(tmp_path / "two")
    k = int(stopped.name[4:])
    assert err.count(f"interrupted: SIGTERM after step {k}: checkpoint written to {stopped}") == 2, err[-3000:]
    assert "exitcode  : 143" in err  # torchrun's report of its failed workers
    assert len(list(stopped.glob("shard-*-of-00002.safetensors"))) == 2  # one shard per process, the same step
    end = f"--stop_at={k + 2}"
    train(tmp_path / "two", data, *common, "--resume", end)  # 2 shards -> 1 process
    train(tmp_path / "one", data, *common, end)
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert list(two) == list(one) == list(range(1, k + 3))
    # fp32 everywhere; only the order of the gradient sums differs (gloo average of two halves)
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in one], rtol=1e-5, atol=0)
    train(tmp_path / "other", data, *common, end, "--seed=2")  # the comparison can fail: another data order
    other = step_losses(tmp_path / "other")
    assert not np.allclose([other[s] for s in other], [one[s] for s in one], rtol=1e-5, atol=0)
