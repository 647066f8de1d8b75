"""Training checkpoints (olmo_fast/train/state.py): safetensors + JSON only, re-sharded between process counts,
never unpickled unless trusted, and never loaded into a model other than the one they hold."""
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from test_train import BASE, token_file, train

from olmo_fast import ModelConfig, OLMo
from olmo_fast.checkpoint import CheckpointError
from olmo_fast.cli import main
from olmo_fast.train import state
from olmo_fast.train.config import OptimizerConfig
from olmo_fast.train.dist import Dist
from olmo_fast.train.optim import build_optimizer


def stepped(seed: int, config: ModelConfig | None = None):
    """A model and AdamW after one step on random gradients (non-trivial moments), both drawn from `seed`."""
    torch.manual_seed(seed)
    model = OLMo(config or ModelConfig.preset("test"))
    optimizer = build_optimizer(model, OptimizerConfig(), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    return model, optimizer


def assert_same_training_state(a_model, a_opt, b_model, b_opt):
    for (name, p), q in zip(a_model.state_dict().items(), b_model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(a_model.parameters(), b_model.parameters()):
        for key, value in a_opt.state[p].items():
            assert torch.equal(value, b_opt.state[q][key]), key
    for g, h in zip(a_opt.param_groups, b_opt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}


def saved(folder: Path, model, optimizer, step: int = 3) -> Path:
    trainer = {"global_step": step, "global_train_tokens_seen": 7 * step, "rng": torch.get_rng_state(),
               "data": {"epoch": 0, "position": 2, "seed": 1, "size": 9}, "world_size": 1}
    return state.save(folder, step, model, optimizer, trainer, model.config, keep=-1, dist=Dist())


def test_checkpoint_is_safetensors_and_json_and_restores_exactly(tmp_path):
    model, optimizer = stepped(0)
    rng = torch.get_rng_state()  # what saved() records
    path = saved(tmp_path, model, optimizer)
    assert sorted(p.name for p in path.iterdir()) == ["index.json", "model.json", "optimizer.json",
                                                      "shard-00000-of-00001.safetensors", "trainer.json"]
    index = json.loads((path / "index.json").read_text())
    assert index["tensors"]["optim/transformer.wte.weight/exp_avg"]["shards"] == [
        {"file": "shard-00000-of-00001.safetensors", "start": 0, "rows": 256}]
    other_model, other_optimizer = stepped(1)
    assert not torch.equal(other_model.transformer["wte"].weight, model.transformer["wte"].weight)
    torch.manual_seed(99)
    trainer = state.load(path, other_model, other_optimizer)
    assert torch.equal(trainer["rng"], rng) and trainer["global_step"] == 3 and trainer["data"]["position"] == 2
    assert_same_training_state(model, optimizer, other_model, other_optimizer)
    assert state.latest_checkpoint(tmp_path) == path and state.is_checkpoint(path)


def test_checkpoint_model_config_is_the_truth(tmp_path):
    model, optimizer = stepped(0)
    path = saved(tmp_path, model, optimizer)
    test = ModelConfig.preset("test")
    assert state.checkpoint_model_config(path) == test == state.checkpoint_model_config(path, test)
    with pytest.raises(CheckpointError, match=r"differ from checkpoint .*: n_layers=1 \(checkpoint: 2\), "
                                              r"clip_qkv=8.0 \(checkpoint: None\); drop them"):
        state.checkpoint_model_config(path, ModelConfig.preset("test", n_layers=1, clip_qkv=8.0))


# ---------------------------------------------------------------------------------------------- pickles
class Payload:
    """Unpickling this writes its marker file: the proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "unpickled")


def payload(marker: Path) -> bytes:
    data = pickle.dumps(Payload(marker))
    pickle.loads(data)  # the payload is live: loading it runs it
    assert marker.read_text() == "unpickled"
    marker.unlink()
    return data


def legacy_checkpoint(folder: Path, model, optimizer, trainer: dict) -> Path:
    """The old layout: torch.distributed.checkpoint (a pickled .metadata) and torch.save's trainer.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    with warnings.catch_warnings():  # DCP's notice that it runs without a process group
        warnings.simplefilter("ignore")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
                 checkpoint_id=str(folder))
    torch.save(trainer, folder / "trainer.pt")
    (folder / "model.json").write_text(json.dumps(model.config.to_dict()))
    return folder


def test_old_pickle_checkpoint_is_read_only_when_trusted(tmp_path):
    model, optimizer = stepped(0)
    path = legacy_checkpoint(tmp_path / "step3", model, optimizer, {"global_step": 3})
    other_model, other_optimizer = stepped(1)
    assert state.latest_checkpoint(tmp_path) == path  # found by --resume, so that it is refused, not skipped
    for refused in (lambda: state.checkpoint_model_config(path),
                    lambda: state.load(path, other_model, other_optimizer)):
        with pytest.raises(CheckpointError, match="old format, whose .metadata and trainer.pt are pickles .* pass "
                                                  "--trust_pickle_checkpoint$"):
            refused()
    assert state.checkpoint_model_config(path, trust_pickle=True) == model.config
    assert state.load(path, other_model, other_optimizer, trust_pickle=True) == {"global_step": 3}
    assert_same_training_state(model, optimizer, other_model, other_optimizer)


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step run of the "test" model (checkpoint step2), its data and its config file."""
    folder = tmp_path_factory.mktemp("run")
    data = token_file(folder / "ids.npy", 64 * 16)
    train(folder / "run", data, "--max_duration=2")
    config = folder / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))
    return folder / "run", data, config


def cli_train(capsys, config, data, save_folder, *args) -> tuple[int, str]:
    code = main(["train", str(config), f"--save_folder={save_folder}", f"--data.paths=[{data}]", "--max_duration=3",
                 *map(str, args)])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit code 2 and one `error:` line holding every fragment (warnings aside), no traceback."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("how", ["resume", "load_path"])
@pytest.mark.parametrize("setting,named", [("--model.n_layers=1", "n_layers=1 (checkpoint: 2)"),
                                           ("--model.d_model=128", "d_model=128 (checkpoint: 64)")])
def test_checkpoint_of_another_model_is_refused(run, tmp_path, capsys, how, setting, named):
    folder, data, config = run
    before = sorted(p.name for p in folder.iterdir())
    target = folder if how == "resume" else tmp_path / "new"
    source = "--resume" if how == "resume" else f"--load_path={folder / 'step2'}"
    code, err = cli_train(capsys, config, data, target, source, setting)
    assert_one_line_error(code, err, named, "model.json", "--model=null")
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing written


def test_checkpoint_model_is_taken_without_model_settings(run, tmp_path, capsys):
    folder, data, config = run
    code, err = cli_train(capsys, config, data, tmp_path / "a", f"--load_path={folder / 'step2'}", "--model=null")
    assert code == 0, err
    assert state.checkpoint_model_config(tmp_path / "a" / "step3") == ModelConfig.preset("test")
    # the run's config.yaml records that model (not the default one), so it resumes the run
    code = main(["train", str(tmp_path / "a" / "config.yaml"), "--resume", "--max_duration=4"])
    assert code == 0, capsys.readouterr().err
    assert state.latest_checkpoint(tmp_path / "a").name == "step4"


def test_load_path_of_a_file_is_one_line(run, tmp_path, capsys):
    _, data, config = run
    (tmp_path / "weights.bin").write_bytes(b"not a checkpoint")
    code, err = cli_train(capsys, config, data, tmp_path / "a", f"--load_path={tmp_path / 'weights.bin'}")
    assert_one_line_error(code, err, "weights.bin is not a folder")


@pytest.mark.parametrize("planted", ["index.json", "model.json", "optimizer.json", "trainer.json",
                                     "shard-00000-of-00001.safetensors"])
def test_pickle_payload_in_a_checkpoint_file_is_never_executed(run, tmp_path, capsys, planted):
    folder, data, config = run
    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for file in (folder / "step2").iterdir():
        (ckpt / file.name).write_bytes(payload(marker) if file.name == planted else file.read_bytes())
    code, err = cli_train(capsys, config, data, tmp_path / "out", f"--load_path={ckpt}")
    assert_one_line_error(code, err, planted)
    assert not marker.exists()


def test_old_layout_files_planted_beside_ours_are_never_read(run, tmp_path, capsys):
    folder, data, config = run
    marker = tmp_path / "marker"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for file in (folder / "step2").iterdir():
        (ckpt / file.name).write_bytes(file.read_bytes())
    for name in (".metadata", "trainer.pt", "__0_0.distcp"):
        (ckpt / name).write_bytes(payload(marker))
    code, err = cli_train(capsys, config, data, tmp_path / "out", f"--load_path={ckpt}")
    assert code == 0, err
    assert not marker.exists()


@pytest.mark.parametrize("how", ["resume", "load_path"])
def test_old_pickle_checkpoint_with_a_payload_is_refused(run, tmp_path, capsys, how):
    _, data, config = run
    marker = tmp_path / "marker"
    old = tmp_path / "old" / "step2"
    old.mkdir(parents=True)
    (old / "model.json").write_text(json.dumps(ModelConfig.preset("test").to_dict()))
    for name in (".metadata", "trainer.pt", "__0_0.distcp"):
        (old / name).write_bytes(payload(marker))
    target = old.parent if how == "resume" else tmp_path / "new"
    source = "--resume" if how == "resume" else f"--load_path={old}"
    code, err = cli_train(capsys, config, data, target, source)
    assert_one_line_error(code, err, str(old), "pickles", "--trust_pickle_checkpoint")
    assert not marker.exists()


def test_trust_flag_loads_an_old_checkpoint_through_the_cli(run, tmp_path, capsys):
    _, data, config = run
    model, optimizer = stepped(0)
    old = legacy_checkpoint(tmp_path / "old", model, optimizer, {"global_step": 3})
    # one step at an LR far below fp32's resolution of the weights: it leaves them as loaded
    code, err = cli_train(capsys, config, data, tmp_path / "out", f"--load_path={old}", "--trust_pickle_checkpoint",
                          "--reset_trainer_state", "--max_duration=1", "--optimizer.learning_rate=1e-30")
    assert code == 0, err
    trained = OLMo(ModelConfig.preset("test"))
    state.load(tmp_path / "out" / "step1", trained, None)
    for (name, p), q in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(p, q), name  # the old checkpoint's weights


# ---------------------------------------------------------------------------------------------- re-sharding
# Tensors with rows that 3 and 2 processes split unevenly (7 rows: 3+3+1 / 4+3; 2 rows: 1+1+0 / 1+1), a 0-d one.
SHAPES = {"a": (7, 5), "b": (2,), "c": (13, 3, 2), "s": ()}


def reference_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(shape, generator=gen, dtype=torch.float64 if name == "c" else torch.float32)
            for name, shape in SHAPES.items()}


def _worker(rank: int, world: int, init: str, folder: str, write: bool) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full = reference_tensors()
        tensors = {name: t if t.dim() == 0 else
                   distribute_tensor(t if write else torch.full_like(t, float("nan")), mesh, [Shard(0)])
                   for name, t in full.items()}
        if write:
            index = state._write_shards(Path(folder), tensors, rank, world)
            if rank == 0:
                (Path(folder) / "index.json").write_text(json.dumps(index))
        else:
            tensors["s"] = torch.zeros(())
            entries = state._check_index(Path(folder), json.loads((Path(folder) / "index.json").read_text()))
            state._read_tensors(Path(folder), entries, tensors)
            for name, t in tensors.items():
                got = t.full_tensor() if t.dim() else t
                assert torch.equal(got, full[name]), name
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_three_process_shards_are_read_back_by_two_and_by_one(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(3, f"file://{tmp_path / 'rdv3'}", str(tmp_path), True), nprocs=3)
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(p["start"], p["rows"]) for p in index["tensors"]["b"]["shards"]] == [(0, 1), (1, 1)]  # rank 2: none
    assert [(p["start"], p["rows"]) for p in index["tensors"]["a"]["shards"]] == [(0, 3), (3, 3), (6, 1)]
    mp.spawn(_worker, args=(2, f"file://{tmp_path / 'rdv2'}", str(tmp_path), False), nprocs=2)
    one = {name: torch.full(shape, float("nan"), dtype=t.dtype) for (name, shape), t in
           zip(SHAPES.items(), reference_tensors().values())}
    state._read_tensors(tmp_path, state._check_index(tmp_path, index), one)
    for name, t in reference_tensors().items():
        assert torch.equal(one[name], t), name


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two(tmp_path):
    """The other direction of test_train_dist's 2 -> 1: FSDP2's parameters and AdamW moments filled by rows."""
    import subprocess
    import sys

    import numpy as np
    from test_train import step_losses
    from test_train_dist import base_yaml

    data = token_file(tmp_path / "ids.npy", 64 * 32)
    common = ["--max_duration=4", "--save_interval=2"]
    train(tmp_path / "one", data, *common)
    train(tmp_path / "two", data, *common, "--stop_at=2")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
              "olmo_fast.cli", "train", str(base_yaml(tmp_path)), f"--save_folder={tmp_path / 'two'}",
              f"--data.paths=[{data}]", *common, "--resume"]
    done = subprocess.run(launch, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "2 process(es)" in done.stdout
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert [two[s] for s in (1, 2)] == [one[s] for s in (1, 2)]  # the same one-process run up to the checkpoint
    # then fp32 on two processes: only the order of the gradient sums differs (gloo average of two halves)
    np.testing.assert_allclose([two[s] for s in (3, 4)], [one[s] for s in (3, 4)], rtol=1e-5, atol=0)
    assert len(list((tmp_path / "two" / "step4").glob("shard-*-of-00002.safetensors"))) == 2
