"""Both tokenizer families on real files, checked against Meta's own Llama 3 tokenizer class."""

import pytest
from sentencepiece import SentencePieceProcessor

from helpers import llama3_tokenizer_path, sentencepiece_32k_path
from llama.errors import UserError
from llama.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces, tabs\tand\nnewlines  ",
    "Zürich, naïve café, 東京, Москва, emoji 🦙🚀, math ∑∫",
    "<|eot_id|> and [INST] are plain text here",
    "a" * 30_000 + " " * 30_000 + "b",  # longer than tiktoken's per-call run limit
]


@pytest.fixture(scope="module")
def llama3():
    return Tokenizer(llama3_tokenizer_path())


def test_llama3_ids_and_specials(llama3):
    assert llama3.family == "llama3"
    assert llama3.n_words == 128256
    assert (llama3.bos_id, llama3.eos_id) == (128000, 128001)
    assert llama3.stop_ids == {128001, 128009}
    assert llama3.special_tokens["<|start_header_id|>"] == 128006
    assert llama3.special_tokens["<|reserved_special_token_245|>"] == 128255
    assert llama3.encode("hello world") == [128000, 15339, 1917]


@pytest.mark.parametrize("text", TEXTS)
def test_llama3_matches_meta_reference(llama3, text):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(llama3_tokenizer_path())
    ids = llama3.encode(text, bos=True, eos=True)
    assert ids == meta.encode(text, bos=True, eos=True)
    assert llama3.decode(ids[1:-1]) == text


def test_special_token_text_is_not_a_control_token(llama3):
    assert 128009 not in llama3.encode("<|eot_id|>")


@pytest.mark.parametrize("text", TEXTS)
def test_sentencepiece_32k_round_trip(text):
    tokenizer = Tokenizer(sentencepiece_32k_path())
    reference = SentencePieceProcessor(model_file=str(sentencepiece_32k_path()))
    assert tokenizer.family == "llama2"
    assert (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id) == (32000, 1, 2)
    ids = tokenizer.encode(text, bos=True, eos=False)
    assert ids == [1] + reference.encode(text)
    assert tokenizer.decode(ids[1:]) == reference.decode(reference.encode(text))


def test_sentencepiece_known_pieces():
    tokenizer = Tokenizer(sentencepiece_32k_path())
    assert tokenizer.encode("Hello world") == [1, 22557, 1526]
    assert tokenizer.decode([22557, 1526]) == "Hello world"


def test_unreadable_tokenizer_file(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(UserError, match="neither a sentencepiece model nor a Llama 3 tiktoken file"):
        Tokenizer(bad)
    with pytest.raises(UserError, match="file not found"):
        Tokenizer(tmp_path / "missing.model")
