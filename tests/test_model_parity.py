"""OLMo model parity: HF transformers' OlmoForCausalLM and allenai's original `olmo.model.OLMo`, same weights.

fp32 on the CPU; tolerance: max |logit error| <= 1e-5 x max |logit| (relative to the logit scale), and every
parameter's gradient of the loss within 1e-4 relative (summed over many terms, so a little looser than logits).
"""
from __future__ import annotations

import pytest
import torch
from tiny_hf import hf_olmo, require_transformers

from olmo_fast import ModelConfig, OLMo
from olmo_fast.checkpoint import hf_to_olmo, olmo_to_hf, save_olmo

# (name, kwargs for transformers.OlmoConfig): tied and untied heads, GQA, and clip_qkv small enough to bite.
HF_CONFIGS = {
    "untied-mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=None),
    "tied-gqa-clip": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, clip_qkv=0.05),
    "untied-mqa-clip": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False, clip_qkv=0.3),
}


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), f"max logit error {err:.3g} vs logit scale {ref.abs().max():.3g}"


def assert_grads_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name in ref:
        scale = ref[name].abs().max().item() + 1e-12
        err = (ours[name] - ref[name]).abs().max().item()
        assert err <= 1e-4 * scale, f"gradient of {name}: error {err:.3g}, scale {scale:.3g}"


def ragged_ids(vocab: int):
    # No pad token (id 1) in the inputs: HF's embedding has padding_idx (no gradient into that row), OLMo's has not.
    ids = torch.randint(2, vocab, (3, 37))
    labels = ids.clone()
    labels[0, :5] = -100  # masked positions are ignored, as in OLMo's label masks
    return ids, labels


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hf_checkpoint_loads_and_matches(name, tmp_path):
    ref = hf_olmo(**HF_CONFIGS[name])
    ref.save_pretrained(tmp_path)
    ours = OLMo.from_pretrained(tmp_path, dtype=torch.float32, backend="torch")
    assert ours.config.clip_qkv == HF_CONFIGS[name]["clip_qkv"]
    ids, labels = ragged_ids(96)

    ref_out = ref(input_ids=ids, labels=labels)
    logits, loss = ours(ids, labels=labels)
    assert_logits_close(logits, ref_out.logits)
    torch.testing.assert_close(loss, ref_out.loss, rtol=1e-6, atol=1e-6)

    ref_out.loss.backward()
    loss.backward()
    ref_grads = hf_to_olmo({n: p.grad for n, p in ref.named_parameters()}, ours.config)
    if ours.config.weight_tying:  # HF holds one tied tensor; its gradient covers both uses
        ref_grads["transformer.wte.weight"] = ref.model.embed_tokens.weight.grad
    assert_grads_close({n: p.grad for n, p in ours.named_parameters()}, ref_grads)


def test_clipping_really_happens():
    """The tight-clip config must clamp some q/k/v values, else the parity tests would not test the clip."""
    ref = hf_olmo(**HF_CONFIGS["tied-gqa-clip"])
    h = torch.nn.functional.layer_norm(ref.model.embed_tokens(torch.randint(0, 96, (1, 16))), (64,))
    q = ref.model.layers[0].self_attn.q_proj(h)
    assert (q.abs() > 0.05).float().mean() > 0.5


@pytest.mark.parametrize("name", ["untied-mha", "tied-gqa-clip"])
def test_our_checkpoint_loads_in_transformers(name, tmp_path):
    ref = hf_olmo(**HF_CONFIGS[name])
    ref.save_pretrained(tmp_path / "hf")
    ours = OLMo.from_pretrained(tmp_path / "hf", backend="torch")
    ours.save_pretrained(tmp_path / "ours")
    back = require_transformers().OlmoForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids, _ = ragged_ids(96)
    assert_logits_close(ours(ids), back(input_ids=ids).logits)
    for key, tensor in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], tensor, rtol=0, atol=0)


def our_olmo(**overrides) -> OLMo:
    """The random-init "test" preset: our checkpoint round trips need no transformers."""
    torch.manual_seed(3)
    return OLMo(ModelConfig.preset("test", **overrides), backend="torch").eval()


def test_sharded_checkpoint_roundtrip(tmp_path):
    ours = our_olmo()
    ours.save_pretrained(tmp_path / "sharded", max_shard_bytes=60_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    again = OLMo.from_pretrained(tmp_path / "sharded", backend="torch")
    ids, _ = ragged_ids(96)
    torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def _saved(model, path):
    model.save_pretrained(path)
    return path


def test_hf_name_mapping_is_a_bijection(tmp_path):
    ref = hf_olmo(**HF_CONFIGS["untied-mqa-clip"])
    ours = OLMo.from_pretrained(_saved(ref, tmp_path), backend="torch")
    roundtrip = olmo_to_hf(hf_to_olmo(ref.state_dict(), ours.config), ours.config)
    assert roundtrip.keys() == {k for k in ref.state_dict() if "rotary" not in k}
    for key, tensor in roundtrip.items():
        assert torch.equal(tensor, ref.state_dict()[key]), key


# ------------------------------------------------------------------------ allenai/OLMo's own implementation
def reference_olmo(clip_qkv, weight_tying, n_kv_heads):
    """allenai's OLMo with weights ~N(0, 0.2); skips the calling test where ai2-olmo is not installed."""
    pytest.importorskip("olmo", reason="comparing with allenai's OLMo needs ai2-olmo: pip install 'olmo-fast[olmo]'")
    from olmo.config import ModelConfig as RefConfig
    from olmo.model import OLMo as RefOLMo

    cfg = RefConfig(d_model=64, n_heads=4, n_kv_heads=n_kv_heads, n_layers=2, mlp_hidden_size=176,
                    max_sequence_length=48, vocab_size=90, embedding_size=96, weight_tying=weight_tying,
                    clip_qkv=clip_qkv, rope=True, rope_full_precision=True, include_bias=False,
                    layer_norm_type="default", layer_norm_with_affine=False, attention_layer_norm=False,
                    bias_for_layer_norm=False, activation_type="swiglu", block_type="sequential", alibi=False,
                    attention_dropout=0.0, residual_dropout=0.0, embedding_dropout=0.0, init_device="cpu",
                    init_fn="mitchell", eos_token_id=0, pad_token_id=1)
    torch.manual_seed(2)
    model = RefOLMo(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("clip_qkv,weight_tying,n_kv_heads", [(None, True, 4), (0.3, False, 2)])
def test_original_olmo_checkpoint_matches(clip_qkv, weight_tying, n_kv_heads, tmp_path):
    import yaml
    from safetensors.torch import save_file

    ref = reference_olmo(clip_qkv, weight_tying, n_kv_heads)
    # OLMo's own layout: config.yaml with a `model:` section, weights under OLMo's names.
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"model": ref.config.asdict()}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = OLMo.from_pretrained(tmp_path, backend="torch")

    ids = torch.randint(0, 90, (2, 41))
    ref_logits = ref(ids).logits
    logits = ours(ids)
    assert_logits_close(logits, ref_logits)

    # OLMo's training loss: labels shifted, summed CE / all tokens; ours: mean over scored tokens (no masks here).
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    _, loss = ours(ids, labels=ids)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    ref_loss.backward()
    loss.backward()
    assert_grads_close({n: p.grad for n, p in ours.named_parameters()},
                       {n: p.grad for n, p in ref.named_parameters()})


def test_save_olmo_roundtrip(tmp_path):
    ours = our_olmo(n_kv_heads=2, weight_tying=True, clip_qkv=0.3)
    save_olmo(ours, tmp_path / "orig")
    again = OLMo.from_pretrained(tmp_path / "orig", backend="torch")
    assert again.config == ours.config
    ids, _ = ragged_ids(96)
    torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
