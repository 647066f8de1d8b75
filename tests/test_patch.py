"""`olmo_fast.patch` on tiny random-weight transformers models of each supported family (fp32, CPU):
the patched model's logits, loss and gradients match the unpatched one's, training converges the same, and
`unpatch` restores the original forwards exactly. Spies check that the fused ops really ran.

Tolerances (fp32; the fused ops differ from transformers' code in summation order only, logits are O(1)):
patched vs unpatched logits and gradients rtol 1e-4 / atol 1e-5, loss rtol 1e-5 / atol 1e-6 (a wrong rotation,
norm or mask is off by 1e-2 or more); loss curves over 15 AdamW steps rtol 1e-4 (fp32), 3e-2 (bf16). (A float64
copy of the transformers model is no float64 reference: its norms and loss upcast to fp32 only.)
"""
import collections
import contextlib
import copy
import gc
import weakref

import pytest
import torch
import transformers
from conftest import DEVICE, require_kernel
from torch import nn

import olmo_fast
from olmo_fast import ops

FAMILIES = {  # family -> (config class, causal LM class, extra config, expected norm op)
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(clip_qkv=0.3), "layer_norm"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "rms_norm"),
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "rms_norm"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=16), "rms_norm"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), "rms_norm"),
}
# op -> kernel names a compiled backend needs for it (as ops/__init__.py resolves them)
KERNELS = {"layer_norm": "layer_norm_fwd", "rms_norm": "norm_fwd", "silu_mul": "silu_mul_fwd", "rope": "rope",
           "attention": "attention_fwd", "linear_cross_entropy": "cross_entropy_chunk"}
VOCAB = 97


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):  # models and inputs (the CPU without a GPU: Triton runs in the interpreter)
        yield


def tiny_model(family: str, **overrides) -> nn.Module:
    config_cls, model_cls, extra, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, pad_token_id=0,
        bos_token_id=None, eos_token_id=1, **{**extra, **overrides})
    model = getattr(transformers, model_cls)(config).float()
    with torch.no_grad():  # norm weights start at ones: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def op_calls(monkeypatch):
    """Counts calls of the ops the patched forwards use."""
    calls = collections.Counter()

    def counted(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    for name in KERNELS:
        monkeypatch.setattr(ops, name, counted(name, getattr(ops, name)))
    return calls


def _loss_grads_logits(model, ids, **kw):
    model.train()
    out = model(ids, labels=ids, **kw)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    model.eval()
    with torch.no_grad():
        logits = model(ids).logits
    return out, grads, logits


def _assert_same_outputs(patched, unpatched):
    (out_a, grads_a, logits_a), (out_b, grads_b, logits_b) = patched, unpatched
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads_a]), torch.cat([g.flatten() for g in grads_b]),
                               rtol=1e-4, atol=1e-5)


def _backend_plan(backend: str, used: list[str]):
    """(patch's backend, context): `backend` itself where it has a kernel for every op used; otherwise (cpp has
    no attention or cross-entropy kernel) backend=None under `ops.prefer(backend)`: its kernels where it has
    them, the best other backend elsewhere. An unbuilt backend skips (fails under CI) in `require_kernel`."""
    if backend == "torch":
        return "torch", contextlib.nullcontext()
    from olmo_fast.ops import dispatch

    registered = dispatch.status().get(backend, {}).get("ops", [])
    have = [op for op in used if KERNELS[op] in registered]
    for op in have or used:
        require_kernel(KERNELS[op], backend)
    return (backend, contextlib.nullcontext()) if have == used else (None, ops.prefer(backend))


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_matches_unpatched(family, backend, op_calls):
    used = [FAMILIES[family][3], "silu_mul", "rope", "attention", "linear_cross_entropy"]
    patch_backend, context = _backend_plan(backend, used)
    model = tiny_model(family)
    ids = torch.randint(2, VOCAB, (2, 9))
    ids[1, :3] = 0  # padding-id tokens, but no attention mask: every position is attended as usual
    before = _loss_grads_logits(model, ids)
    assert op_calls == {}
    record = olmo_fast.patch(model, backend=patch_backend)
    assert len(record.replaced) == 4 and "Attention" in repr(record)
    with context:
        after = _loss_grads_logits(model, ids)
        assert ops.dispatch.resolve(KERNELS[used[0]], patch_backend, torch.device(DEVICE)) == backend  # its norm
    assert after[0].logits is None  # training with labels: the fused loss, no [tokens, vocab] logits
    _assert_same_outputs(after, before)
    for op in used:
        assert op_calls[op] > 0, f"the fused {op} never ran"
    olmo_fast.unpatch(record)
    assert _loss_grads_logits(model, ids)[2].equal(before[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_converges_the_same(family, dtype):
    """15 AdamW steps on one batch: the loss curves agree (fp32 rtol 1e-4; bf16 parameters and activations
    rtol 3e-2, rounding differences compounding over the steps: ~1e-2 seen) and the loss falls."""
    torch.manual_seed(1)
    reference = tiny_model(family).to(dtype)
    patched = copy.deepcopy(reference)
    olmo_fast.patch(patched)  # default backend: the best available on this device
    ids = torch.randint(2, VOCAB, (4, 12))
    curves = []
    for model in (reference, patched):
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        curve = []
        for _ in range(15):
            loss = model(ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(torch.tensor(curve))
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4 if dtype == torch.float32 else 3e-2, atol=0)
    assert curves[1][-1] < 0.8 * curves[1][0], f"the patched model did not learn: {curves[1]}"
    olmo_fast.unpatch(patched)


def test_unpatch_restores_exactly():
    model = tiny_model("olmo2")
    ids = torch.randint(2, VOCAB, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    record = olmo_fast.patch(model, rope=False, attention=False)  # norms, MLP, loss: attention left alone
    assert sorted(record.replaced) == ["Olmo2ForCausalLM", "Olmo2MLP", "Olmo2RMSNorm"]
    assert any("forward" in vars(m) for m in model.modules())
    olmo_fast.unpatch(model)
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert model(ids).logits.equal(before)
    with pytest.raises(ValueError, match="not patched"):
        olmo_fast.unpatch(model)


def test_a_patched_model_is_freed_without_unpatch():
    model = tiny_model("llama")
    olmo_fast.patch(model)
    with pytest.raises(RuntimeError, match="already patched"):
        olmo_fast.patch(model)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_patch_classes_before_loading(tmp_path, op_calls):
    from transformers.models.llama import modeling_llama as ml

    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    ids = torch.randint(2, VOCAB, (2, 8))
    with torch.no_grad():
        before = model(ids).logits
    originals = {name: getattr(ml, name).forward for name in ("LlamaRMSNorm", "LlamaMLP", "LlamaAttention")}
    record = olmo_fast.patch(transformers.LlamaForCausalLM, backend="torch")
    try:
        assert sorted(record.replaced) == ["LlamaAttention", "LlamaForCausalLM", "LlamaMLP", "LlamaRMSNorm"]
        loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).to(DEVICE).eval()
        assert not any("forward" in vars(m) for m in loaded.modules())  # the classes carry the patch
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-5, atol=1e-6)
        assert op_calls["rms_norm"] and op_calls["silu_mul"] and op_calls["rope"] and op_calls["attention"]
        with pytest.raises(RuntimeError, match="already patched"):
            olmo_fast.patch(ml)  # the same classes, through their module
    finally:
        olmo_fast.unpatch(record)
    assert all(getattr(ml, name).forward is fn for name, fn in originals.items())
    every = olmo_fast.patch(transformers)  # the package: all five families
    assert {"OlmoLayerNorm", "Olmo2RMSNorm", "MistralMLP", "Qwen2Attention"} <= set(every.replaced)
    olmo_fast.unpatch(every)
    assert all(getattr(ml, name).forward is fn for name, fn in originals.items())


def test_unsupported_models_get_a_clear_error():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11))
    with pytest.raises(ValueError, match="OLMo .*OLMo2 .*Llama .*Mistral .*Qwen2"):
        olmo_fast.patch(gpt2)
    with pytest.raises(ValueError, match="supports"):
        olmo_fast.patch(transformers.GPT2LMHeadModel)
    with pytest.raises(TypeError, match="model"):
        olmo_fast.patch("llama")


def test_fallbacks_where_a_fused_op_does_not_apply(op_calls):
    """A padding mask or a sliding window shorter than the keys: transformers' attention runs (RoPE stays
    fused); scaled RoPE: transformers' rotation runs. Outputs match either way."""
    scaled = dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0))
    cases = [  # family, config overrides, padded, fused (rope, attention)
        ("llama", {}, True, (True, False)), ("mistral", dict(sliding_window=4), False, (True, False)),
        ("llama", scaled, False, (False, True))]
    for family, overrides, padded, fused in cases:
        op_calls.clear()
        model = tiny_model(family, **overrides).eval()
        ids = torch.randint(2, VOCAB, (2, 9))
        mask = torch.ones_like(ids)
        if padded:
            mask[0, :3] = 0
        with torch.no_grad():
            before = model(ids, attention_mask=mask).logits
            record = olmo_fast.patch(model, backend="torch")
            after = model(ids, attention_mask=mask).logits
        olmo_fast.unpatch(record)
        keep = mask.bool()  # padded queries attend to nothing real: compare the others
        torch.testing.assert_close(after[keep], before[keep], rtol=1e-5, atol=1e-6)
        assert op_calls["silu_mul"] > 0
        assert (op_calls["rope"] > 0, op_calls["attention"] > 0) == fused, (family, overrides)


def test_logits_loss_and_generation_options():
    model = tiny_model("qwen2")
    ids = torch.randint(2, VOCAB, (2, 8))
    labels = ids.clone()
    labels[:, :3] = -100
    reference = copy.deepcopy(model)
    olmo_fast.patch(model, backend="torch")
    model.train(), reference.train()
    ref = reference(ids, labels=labels)
    kept = model(ids, labels=labels, skip_logits=False)  # asked for logits: transformers' path
    torch.testing.assert_close(kept.logits, ref.logits)
    fused = model(ids, labels=labels)
    torch.testing.assert_close(fused.loss, ref.loss, rtol=1e-5, atol=1e-6)
    as_tuple = model(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], ref.loss, rtol=1e-5, atol=1e-6)
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(7))
    ref_summed = reference(ids, labels=labels, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed.loss, ref_summed.loss, rtol=1e-5, atol=1e-6)
    model.eval(), reference.eval()
    with torch.no_grad():  # eval with labels: logits and loss as transformers gives them
        torch.testing.assert_close(model(ids, labels=labels).logits, reference(ids, labels=labels).logits)
        prompt = ids[:1, :5]
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert model.generate(prompt, **greedy).equal(reference.generate(prompt, **greedy))  # KV-cache decode


def test_accelerate_style_hooks_are_kept():
    """accelerate's hooks move the real forward to `_old_forward` and put a wrapper in `forward`: the patch
    replaces `_old_forward` and leaves the wrapper (here one that counts calls) in place."""
    model = tiny_model("llama").eval()
    ids = torch.randint(2, VOCAB, (1, 6))
    calls = []
    for module in model.modules():  # what accelerate.hooks.add_hook_to_module does, minus the device moves
        module._old_forward = module.forward

        def hooked(*args, _module=module, **kwargs):
            calls.append(type(_module).__name__)
            return _module._old_forward(*args, **kwargs)

        module.forward = hooked
    with torch.no_grad():
        before = model(ids).logits
        wrappers = {name: m.forward for name, m in model.named_modules()}
        record = olmo_fast.patch(model, backend="torch")
        calls.clear()
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-6)
        assert "LlamaRMSNorm" in calls and "LlamaAttention" in calls  # the hooks still run
        assert all(m.forward is wrappers[name] for name, m in model.named_modules())
        assert model.model.norm._old_forward.__func__.__module__ == "olmo_fast.patch.forwards"
        olmo_fast.unpatch(record)
        assert model.model.norm._old_forward.__func__.__module__.startswith("transformers.")


def test_fused_loss_under_bf16_autocast():
    """Under autocast the head runs in bf16, as `lm_head` would: the loss matches the unpatched model's."""
    model = tiny_model("olmo2")
    reference = copy.deepcopy(model)
    olmo_fast.patch(model, backend="torch")
    ids = torch.randint(2, VOCAB, (2, 8))
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        fused, plain = model(ids, labels=ids), reference(ids, labels=ids)
    assert fused.logits is None and plain.logits.dtype == torch.bfloat16
    torch.testing.assert_close(fused.loss, plain.loss, rtol=2e-2, atol=0)
