"""`OLMo.forward`'s one loss path (`olmo_fast.nn.causal_lm_loss`, also the trainer's, the evaluator's and the
patched transformers models'): unfused (through the logits) and fused (`ops.linear_cross_entropy`, no logits), mean
and sum, against float64 cross-entropy of a float64 copy of the model, values and gradients; and the checks at the
entry point."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import require_kernel

from olmo_fast import ModelConfig, OLMo


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[torch.rand(ids.shape) < 0.3] = -100
    return labels


def _grads(model: OLMo) -> dict[str, torch.Tensor]:
    return {name: p.grad.double() for name, p in model.named_parameters()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_and_unfused_losses_equal_a_float64_reference(backend, reduction):
    if backend != "torch":
        require_kernel("cross_entropy_chunk", backend, "cpu")
    cfg = ModelConfig.preset("test", n_kv_heads=2, clip_qkv=0.4, max_sequence_length=16)  # vocab 250 of 256 rows
    model = OLMo(cfg, backend="torch")
    ids = torch.randint(0, cfg.vocab_size, (3, 13))  # odd sizes
    labels = _labels(ids)
    reference = copy.deepcopy(model).double()
    logits64 = reference(ids)
    expected = F.cross_entropy(logits64[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction=reduction)
    expected.backward()
    for fused in (False, True):
        model.zero_grad()
        model.loss.backend = backend  # the head's loss on the backend under test; the blocks stay on torch
        logits, loss = model(ids, labels, reduction=reduction, fused=fused)
        assert loss.dtype == torch.float32 and (logits is None) == fused
        if not fused:
            torch.testing.assert_close(logits.double(), logits64, rtol=1e-5, atol=1e-5 * logits64.abs().max().item())
        # fp32 logits (~1e-7 relative each) summed over <= 39 scored tokens of loss ~5.5
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0, msg=f"fused={fused}")
        loss.backward()
        for name, grad in _grads(model).items():
            ref = reference.get_parameter(name).grad
            torch.testing.assert_close(grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(),
                                       msg=f"fused={fused} {name}")


def test_entry_point_checks_ids_labels_and_reduction():
    cfg = ModelConfig.preset("test")
    model = OLMo(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    labels = _labels(ids)
    for fused in (False, True):
        bad = labels.clone()
        bad[1, 4] = cfg.embedding_size
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 256\) or be -100; got labels from 0 to 256"):
            model(ids, bad, fused=fused)
        bad[1, 4] = -1
        with pytest.raises(ValueError, match="got labels from -1 to"):
            model(ids, bad, fused=fused)
        with pytest.raises(ValueError, match="labels must be an integer tensor of input_ids' shape"):
            model(ids, labels[:, 1:], fused=fused)
        with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
            model(ids, labels, reduction="none", fused=fused)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\); got ids from 0 to 300"):
        model(torch.tensor([[0, 300]]))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, cfg.max_sequence_length + 1, dtype=torch.long))


def test_check_inputs_false_skips_the_check(monkeypatch):
    """Callers that checked their data once (trainer, generator) skip the per-call check and its device sync."""
    model = OLMo(ModelConfig.preset("test"))
    ids = torch.randint(0, 250, (2, 5))
    calls = []
    monkeypatch.setattr(model, "check_inputs", lambda *args: calls.append(args))
    model(ids, ids, check_inputs=False)
    assert not calls
    model(ids, ids)
    assert len(calls) == 1 and calls[0][0] is ids and calls[0][1] is ids
