"""ModelConfig presets, config readers, init, and the clear errors bad inputs and checkpoints must give."""
from __future__ import annotations

import json
import math

import pytest
import torch
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


def test_pickled_checkpoints_are_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "config.yaml").write_text("model: {d_model: 64, n_heads: 4, n_layers: 1}")
    torch.save({"x": Evil()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="tensor-only"):
        OLMo.from_pretrained(tmp_path)


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
