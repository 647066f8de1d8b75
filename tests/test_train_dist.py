"""Training in other processes: SIGKILL in the middle of a checkpoint write, and `torchrun` with 2 gloo
processes (FSDP2) against one process, its sharded checkpoint resumed on one process."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import yaml
from test_train import BASE, step_losses, token_file, train

from olmo_fast import ModelConfig, OLMo
from olmo_fast.train import state


def base_yaml(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def cli(*args):
    return [sys.executable, "-m", "olmo_fast.cli", "train", *map(str, args)]


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


def test_torchrun_two_gloo_processes_match_one_and_resume_on_one(tmp_path):
    """Both start from the same HF weights (rank 0 reads them and scatters them to the shards)."""
    data = token_file(tmp_path / "ids.npy", 64 * 32)
    torch.manual_seed(5)
    OLMo(ModelConfig.preset("test")).save_pretrained(tmp_path / "hf")
    common = ["--max_duration=6", "--save_interval=2", f"--load_path={tmp_path / 'hf'}", "--model=null"]
    train(tmp_path / "one", data, *common)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
              "olmo_fast.cli", "train", str(base_yaml(tmp_path)), f"--save_folder={tmp_path / 'two'}",
              f"--data.paths=[{data}]", *common, "--stop_at=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    assert len(list((tmp_path / "two" / "step4").glob("shard-*-of-00002.safetensors"))) == 2  # one per process
    train(tmp_path / "two", data, *common, "--resume")  # 2 shards -> 1 process
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert list(two) == list(range(1, 7))
    # fp32 everywhere; only the order of the gradient sums differs (gloo average of two halves)
    np.testing.assert_allclose([two[s] for s in two], [one[s] for s in range(1, 7)], rtol=1e-5, atol=0)
    train(tmp_path / "other", data, *common, "--seed=2")  # the comparison can fail: another data order
    other = step_losses(tmp_path / "other")
    assert not np.allclose([other[s] for s in other], [one[s] for s in range(1, 7)], rtol=1e-5, atol=0)
