"""ModelConfig presets, config readers, init, and the clear errors bad inputs and checkpoints must give."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from olmo_fast import ConfigError, ModelConfig, OLMo
from olmo_fast.checkpoint import CheckpointError


@pytest.mark.parametrize("name,d,heads,layers,mlp,ctx,clip,tied,params", [
    ("olmo-1b", 2048, 16, 16, 16384, 2048, None, True, 1.177e9),
    ("olmo-7b", 4096, 32, 32, 22016, 2048, None, False, 6.888e9),
    ("olmo-1.7-7b", 4096, 32, 32, 22016, 4096, 8.0, False, 6.888e9),
])
def test_official_presets(name, d, heads, layers, mlp, ctx, clip, tied, params):
    c = ModelConfig.preset(name)
    assert (c.d_model, c.n_heads, c.n_layers, c.mlp_hidden_size, c.max_sequence_length) == (d, heads, layers, mlp, ctx)
    assert (c.clip_qkv, c.weight_tying, c.rope_theta, c.head_dim) == (clip, tied, 10000.0, 128)
    assert (c.vocab_size, c.embedding_size, c.eos_token_id, c.pad_token_id) == (50280, 50304, 50279, 1)
    assert abs(c.num_params() - params) / params < 1e-3


def test_tiny_preset_size_and_hf_roundtrip():
    tiny = ModelConfig.preset("tiny")
    assert 10e6 <= tiny.num_params() <= 30e6
    for name in ("olmo-1b", "olmo-1.7-7b"):
        c = ModelConfig.preset(name)
        back = ModelConfig.from_hf(c.to_hf())
        # HF stores the padded embedding as its vocab; everything else round-trips.
        assert back == ModelConfig.preset(name, vocab_size=c.embedding_size)


def test_hf_config_json_gives_the_same_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.OlmoConfig(hidden_size=2048, num_attention_heads=16, num_hidden_layers=16,
                                 intermediate_size=8192, max_position_embeddings=2048, vocab_size=50304,
                                 tie_word_embeddings=True, clip_qkv=None, pad_token_id=1, eos_token_id=50279)
    hf.save_pretrained(tmp_path)
    assert ModelConfig.from_file(tmp_path) == ModelConfig.preset("olmo-1b", vocab_size=50304)


def test_mitchell_init_stds():
    c = ModelConfig.preset("test", d_model=128, n_layers=3, mlp_hidden_size=512)
    model = OLMo(c)
    block = model.transformer["blocks"][2]
    for weight, std in [(model.transformer["wte"].weight, 1 / math.sqrt(128)),
                        (block.att_proj.weight, 1 / math.sqrt(128)),
                        (block.attn_out.weight, 1 / math.sqrt(2 * 128 * 3)),
                        (block.ff_out.weight, 1 / math.sqrt(2 * 256 * 3))]:
        assert weight.abs().max() <= 3 * std + 1e-7  # truncated at 3 sigma
        # a truncated normal at ±3σ has std 0.9866σ
        assert abs(weight.std().item() / std - 0.9866) < 0.05


def test_bad_token_ids_and_lengths_raise_clear_errors():
    model = OLMo(ModelConfig.preset("test"), backend="torch")
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        model(torch.tensor([[3, 256]]))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor"):
        model(torch.zeros(1, 4))


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("olmo-70b")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="cannot parse"):
        ModelConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="lacks the key"):
        ModelConfig.from_file(tmp_path)
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="cannot parse"):
        ModelConfig.from_file(tmp_path / "bad.yaml")


def _saved_checkpoint(tmp_path):
    model = OLMo(ModelConfig.preset("test"))
    model.save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    file = _saved_checkpoint(tmp_path)
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.down_proj.weight"):
        OLMo.from_pretrained(tmp_path)


def test_misshaped_tensor_is_named(tmp_path):
    file = _saved_checkpoint(tmp_path)
    tensors = load_file(str(file))
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 63)
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=r"blocks.0.attn_out.weight.*\(64, 63\)"):
        OLMo.from_pretrained(tmp_path)


def test_missing_or_corrupt_weights(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        OLMo.from_pretrained(tmp_path / "nowhere")
    file = _saved_checkpoint(tmp_path)
    file.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        OLMo.from_pretrained(tmp_path)
    file.unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        OLMo.from_pretrained(tmp_path)


@pytest.mark.parametrize("config,weights,match", [
    ("config.yaml", "model.pt", "tensor-only"), ("config.json", "pytorch_model.bin", "tensor-only"),
    ("config.json", "model.safetensors", "cannot read"), ("config.yaml", "model.safetensors", "cannot read")])
def test_pickled_weights_are_never_unpickled(tmp_path, config, weights, match):
    """A pickle is refused unread unless trusted; trusted, torch's tensor-only loader still refuses the payload."""
    from test_train_state import payload

    marker = tmp_path / "marker"
    test = ModelConfig.preset("test")
    text = json.dumps(test.to_hf()) if config == "config.json" else yaml.safe_dump({"model": test.to_olmo()})
    (tmp_path / config).write_text(text)
    (tmp_path / weights).write_bytes(payload(marker))
    if weights != "model.safetensors":
        with pytest.raises(CheckpointError, match="is a pickle .* trust_pickle=True"):
            OLMo.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=match):
        OLMo.from_pretrained(tmp_path, trust_pickle=True)
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["hf", "olmo"])
def test_trusted_pickled_weights_load(tmp_path, layout):
    """pytorch_model.bin (HF) and model.pt (allenai/OLMo) of plain tensors load when the caller trusts them."""
    model = OLMo(ModelConfig.preset("test"))
    model.save_pretrained(tmp_path / "hf")
    from olmo_fast.checkpoint import read_weights, save_olmo

    if layout == "hf":
        folder, name = tmp_path / "hf", "pytorch_model.bin"
    else:
        folder, name = tmp_path / "olmo", "model.pt"
        save_olmo(model, folder)
    tensors = read_weights(folder)
    for file in folder.glob("model*.safetensors*"):
        file.unlink()
    torch.save(tensors, folder / name)
    loaded = OLMo.from_pretrained(folder, trust_pickle=True)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_backend_errors_are_clear():
    from olmo_fast import ops

    x = torch.randn(4, 8)
    with pytest.raises(ops.BackendError, match="backend must be one of"):
        ops.layer_norm(x, backend="cuda")


def test_save_removes_leftovers_of_a_crashed_write(tmp_path):
    stale = tmp_path / ".tmp-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    OLMo(ModelConfig.preset("test")).save_pretrained(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# ---------------------------------------------------------------------------------------------- configs olmo-fast
# would misread: refused (or, for dropout, which only training would apply, warned about), never ignored
def _tiny_hf_folder(tmp_path, **overrides):
    pytest.importorskip("transformers")
    from tiny_hf import hf_olmo

    hf_olmo(**overrides).save_pretrained(tmp_path)
    return tmp_path


def _edit_json(file, **changes):
    values = json.loads(file.read_text())
    values.update(changes)
    file.write_text(json.dumps(values))


@pytest.mark.parametrize("overrides,match", [
    (dict(attention_bias=True), "attention_bias=True; olmo-fast supports only False"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'; olmo-fast supports only 'silu'"),
])
def test_hf_settings_olmo_fast_would_ignore_are_refused(tmp_path, overrides, match):
    folder = _tiny_hf_folder(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=match):
        OLMo.from_pretrained(folder)


def test_hf_config_of_another_family_is_refused(tmp_path):
    folder = _tiny_hf_folder(tmp_path)
    _edit_json(folder / "config.json", model_type="llama")
    with pytest.raises(ConfigError, match="model_type='llama'; olmo-fast supports only 'olmo' or 'olmo2' or 'olmo3'"):
        OLMo.from_pretrained(folder)


def test_hf_weights_the_config_does_not_account_for_are_refused(tmp_path):
    folder = _tiny_hf_folder(tmp_path)  # 2 layers, untied
    assert OLMo.from_pretrained(folder).config.n_layers == 2  # loads as saved
    _edit_json(folder / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"hold 7 tensor\(s\) the config does not account for, e.g. "
                                              r"'model.layers.1.mlp.down_proj.weight'"):
        OLMo.from_pretrained(folder)
    _edit_json(folder / "config.json", num_hidden_layers=2, tie_word_embeddings=True)  # a head of its own
    with pytest.raises(CheckpointError, match="'lm_head.weight'"):
        OLMo.from_pretrained(folder)


def test_tied_head_saved_as_a_copy_of_the_embedding_loads(tmp_path):
    folder = _tiny_hf_folder(tmp_path, tie_word_embeddings=True)
    tensors = load_file(str(folder / "model.safetensors"))
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(folder / "model.safetensors"))
    model = OLMo.from_pretrained(folder)
    assert torch.equal(model.transformer["wte"].weight, tensors["model.embed_tokens.weight"])


def test_hf_dropout_is_warned_about(tmp_path):
    folder = _tiny_hf_folder(tmp_path, attention_dropout=0.1)
    with pytest.warns(UserWarning, match="trains without dropout; ignoring attention_dropout=0.1"):
        OLMo.from_pretrained(folder)


OLMO_BLOCK = {"d_model": 64, "n_heads": 4, "n_layers": 2, "mlp_ratio": 4, "max_sequence_length": 64,
              "vocab_size": 250, "embedding_size": 256, "weight_tying": False, "include_bias": False,
              "layer_norm_with_affine": False, "rope": True, "eos_token_id": 0, "pad_token_id": 1}


def test_olmo_model_block_keys():
    assert ModelConfig.from_olmo(OLMO_BLOCK) == ModelConfig.preset("test")
    assert ModelConfig.from_olmo({**OLMO_BLOCK, "layer_norm_eps": 1e-6}).layer_norm_eps == 1e-6
    with pytest.raises(ConfigError, match="^unknown OLMo model key 'weigth_tying'; did you mean 'weight_tying'\\?$"):
        ModelConfig.from_olmo({**OLMO_BLOCK, "weigth_tying": True})
    with pytest.raises(ConfigError, match="OLMo config sets include_bias=True; olmo-fast supports only False"):
        ModelConfig.from_olmo({**OLMO_BLOCK, "include_bias": True})
    with pytest.raises(ConfigError, match="unknown model config key 'n_layer'; did you mean 'n_layers'"):
        ModelConfig.from_dict({"n_layer": 2})
    with pytest.warns(UserWarning, match="ignoring residual_dropout=0.1"):
        ModelConfig.from_olmo({**OLMO_BLOCK, "residual_dropout": 0.1, "attention_dropout": 0.0})


def test_olmo_model_keys_are_allenais():
    """The embedded list of allenai/OLMo's ModelConfig fields (olmo-fast does not import ai2-olmo at runtime)."""
    import dataclasses

    from olmo_fast.config import OLMO_MODEL_KEYS

    olmo_config = pytest.importorskip("olmo.config")
    assert OLMO_MODEL_KEYS == {f.name for f in dataclasses.fields(olmo_config.ModelConfig)}
    written = olmo_config.ModelConfig(**{k: v for k, v in OLMO_BLOCK.items() if k != "mlp_ratio"},
                                      mlp_hidden_size=256, layer_norm_eps=1e-6, attention_dropout=0.0,
                                      residual_dropout=0.0, embedding_dropout=0.0)
    assert ModelConfig.from_olmo(dataclasses.asdict(written)) == ModelConfig.preset("test", layer_norm_eps=1e-6)


# ---------------------------------------------------------------------------------------------- the same, by CLI
def test_cli_refuses_models_it_would_misread(tmp_path, capsys):
    from test_train import BASE, markov_tokens
    from test_train_state import assert_one_line_error

    from olmo_fast.cli import main

    data = tmp_path / "ids.npy"
    markov_tokens(48 * 16, vocab=96)[0].tofile(data)  # the tiny HF models' vocabulary and context
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**BASE, "model": None}))

    def train(*args):
        code = main(["train", str(config), f"--save_folder={tmp_path / 'out'}", f"--data.paths=[{data}]", *args])
        return code, capsys.readouterr().err

    biased = _tiny_hf_folder(tmp_path / "biased", attention_bias=True)
    fewer = _tiny_hf_folder(tmp_path / "fewer")
    _edit_json(fewer / "config.json", num_hidden_layers=1)
    capsys.readouterr()  # transformers' progress bars
    assert_one_line_error(*train(f"--load_path={biased}"), "attention_bias=True")
    code = main(["generate", "--model", str(biased), "--token-ids", "3 4", "--max-new-tokens", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "attention_bias=True")
    assert_one_line_error(*train(f"--load_path={fewer}"), "the config does not account for")
    block = yaml.safe_dump({**BASE, "model": {**OLMO_BLOCK, "weigth_tying": False}})
    config.write_text(block)
    assert_one_line_error(*train(), "unknown OLMo model key 'weigth_tying'; did you mean 'weight_tying'?")
    assert not (tmp_path / "out").exists()
