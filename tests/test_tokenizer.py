"""shared.tokenizer: GPT-2 built offline, tokenizer.json loading, exact round trips."""

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers, trainers

from shared.tokenizer import ENDOFTEXT, GPT2_RANKS, byte_tokenizer, from_tokenizer_json, gpt2_tokenizer, load_tokenizer

# Read directly rather than via shared.data, which would import torch for nothing here.
SHAKESPEARE = GPT2_RANKS.parent / "shakespeare.txt"


def test_gpt2_known_ids():
    tok = gpt2_tokenizer()
    assert tok.encode("hello world") == [31373, 995]
    assert tok.decode([31373, 995]) == "hello world"
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert load_tokenizer("gpt2") is tok  # built once, then cached


def test_gpt2_special_tokens_in_text_stay_text():
    tok = gpt2_tokenizer()
    ids = tok.encode(f"a{ENDOFTEXT}b")
    assert tok.eot_id not in ids
    assert tok.decode(ids) == f"a{ENDOFTEXT}b"
    assert tok.decode([tok.eot_id]) == ENDOFTEXT


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_gpt2_round_trip(text):
    tok = gpt2_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_bytes_known_ids():
    tok = load_tokenizer("bytes")
    assert tok is byte_tokenizer()  # built once, then cached
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "bytes")
    assert tok.encode("Hi é") == [72, 105, 32, 0xC3, 0xA9]  # UTF-8: é is two bytes
    assert tok.encode(ENDOFTEXT) == list(ENDOFTEXT.encode())  # in text, only text
    assert tok.decode([72, tok.eot_id, 105]) == f"H{ENDOFTEXT}i"
    assert tok.decode([72, 300, 105]) == "Hi"  # a padding id (vocabulary rounded up) decodes to nothing
    assert tok.decode([72, 0xC3]) == "H\ufffd"  # a character cut short is replaced, not an error
    assert tok.identity == {"name": "bytes", "file_sha256": None, "fingerprint": tok.fingerprint}


@settings(max_examples=150, deadline=None)
@given(st.text())
def test_bytes_round_trip(text):
    tok = byte_tokenizer()
    assert tok.decode(tok.encode(text)) == text


@pytest.fixture(scope="module")
def trained_json(tmp_path_factory):
    """A byte-level BPE (GPT-2 style, 400 tokens) trained here on a slice of the corpus."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([SHAKESPEARE.read_text(encoding="utf-8")[:20_000]], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_file_and_directory(trained_json):
    tok = from_tokenizer_json(trained_json)
    assert tok.eot_id == 0 and tok.decode([tok.eot_id]) == "</s>"  # first special token trained
    assert tok.vocab_size == 400
    assert from_tokenizer_json(trained_json.parent).vocab_size == 400
    assert load_tokenizer(str(trained_json.parent)).eot_id == 0
    assert tok.eot_id not in tok.encode("a</s>b")  # special tokens in text stay text


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_tokenizer_json_round_trip(trained_json, text):
    tok = load_tokenizer(str(trained_json))
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_json_without_eot(tmp_path):
    tok = tokenizers.Tokenizer(models.BPE())
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json: no end-of-text token; looked for <\|endoftext"):
        from_tokenizer_json(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json there"):
        from_tokenizer_json(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        from_tokenizer_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a valid tokenizer.json"):
        from_tokenizer_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt-2'"):
        load_tokenizer("gpt-2")
