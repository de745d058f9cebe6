"""shared.tokenizer on tiktoken-format ranks files, against the publisher's tokenizer: Meta's own
`llama_models.llama3.tokenizer.Tokenizer`, on the real Llama 3 tokenizer.model that llama-models
ships and on a small ranks file written here. Kimi K2's and Qwen's conventions have no oracle
installable here (their tokenizers are hub code): their special-token ids and patterns are checked
against the rules their tokenization files state. And the identity that prepare.json records."""

import hashlib
import json
from pathlib import Path

import pytest
import regex  # tiktoken's own dependency: the same Unicode classes
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import import_transformers
from shared.tokenizer import (
    GPT2_RANKS,
    PROBE_TEXT,
    TIKTOKEN_FORMATS,
    from_tiktoken,
    gpt2_tokenizer,
    load_tokenizer,
)

meta_tokenizer = import_transformers("llama_models.llama3.tokenizer")  # skipped without llama-models, except in CI
META_FILE = Path(meta_tokenizer.__file__).parent / "tokenizer.model"
# text that exercises Llama 3's pattern where it differs from GPT-2's: digit groups, contractions in
# capitals, punctuation followed by newlines, and special-token spellings, which must stay text
TRICKY = [
    "1234567 12 3.14159",
    "I'LL DON'T we've",
    "a!!\n\n\nb  \t c",
    "<|begin_of_text|>x<|end_of_text|><|eot_id|><|reserved_special_token_250|>",
    "ÜNÏ 你好世界 🙂👍🏽",
    "",
]


@pytest.fixture(scope="module")
def llama3():
    return load_tokenizer(str(META_FILE.parent)), meta_tokenizer.Tokenizer(META_FILE)


@pytest.fixture(scope="module")
def small_llama3(tmp_path_factory):
    """GPT-2's first 3,000 ranks written as a Llama 3 tokenizer.model: special tokens from id 3,000."""
    lines = GPT2_RANKS.read_text().splitlines()[:3000]
    path = tmp_path_factory.mktemp("meta") / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return from_tiktoken(path), meta_tokenizer.Tokenizer(path)


def same_ids(ours, meta, text):
    ids = ours.encode(text)
    assert ids == meta.encode(text, bos=False, eos=False)
    assert ours.decode(ids) == meta.decode(ids) == text


def test_llama3_tokenizer_model_matches_meta(llama3):
    ours, meta = llama3
    assert (ours.vocab_size, ours.eot_id) == (meta.n_words, meta.eos_id) == (128256, 128001)
    assert ours.backend._special_tokens == meta.special_tokens  # all 256, same ids
    for text in [*TRICKY, PROBE_TEXT]:
        same_ids(ours, meta, text)
    assert ours.decode([meta.bos_id, meta.eot_id]) == "<|begin_of_text|><|eot_id|>"


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_llama3_ids_equal_meta_on_any_text(llama3, text):
    same_ids(*llama3, text)


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab1 2\n'!<|>_SDLVé你")), max_size=40))
def test_small_ranks_file_matches_meta(small_llama3, text):
    # a vocabulary where few merges exist, so the split pattern alone decides most boundaries
    same_ids(*small_llama3, text)


def test_small_ranks_file_special_tokens(small_llama3):
    ours, meta = small_llama3
    assert ours.vocab_size == meta.n_words == 3256 and ours.eot_id == meta.eos_id == 3001
    assert ours.backend._special_tokens == meta.special_tokens


def test_kimi_k2_specials_from_tokenizer_config(tmp_path):
    # Kimi K2: tiktoken.model + tokenizer_config.json naming some of the 256 ids after the ranks
    (tmp_path / "tiktoken.model").write_text("\n".join(GPT2_RANKS.read_text().splitlines()[:500]) + "\n")
    named = {"500": "[BOS]", "501": "[EOS]", "503": "<|im_end|>"}
    config = {"added_tokens_decoder": {i: {"content": t, "special": True} for i, t in named.items()}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.eot_id) == (756, 501)
    assert tok.backend._special_tokens["<|im_end|>"] == 503
    assert tok.backend._special_tokens["<|reserved_token_502|>"] == 502
    assert tok.decode(tok.encode("Hello你好World's")) == "Hello你好World's"
    # Han runs apart from other letters, cased words with their contraction (regex's V1 reads `&&` as
    # tiktoken's fancy-regex does: a class intersection)
    pieces = regex.findall(TIKTOKEN_FORMATS["kimi_k2"].pattern, "HelloWorld's你好abc 12345", flags=regex.V1)
    assert pieces == ["Hello", "World's", "你好", "abc", " ", "123", "45"]


def test_qwen_format_by_name(tmp_path):
    path = tmp_path / "vocab.tiktoken"
    path.write_text("\n".join(GPT2_RANKS.read_text().splitlines()[:400]) + "\n")
    tok = load_tokenizer(f"qwen:{path}")
    assert (tok.vocab_size, tok.eot_id) == (400 + 3 + 205, 400)
    assert tok.backend._special_tokens["<|im_end|>"] == 402
    # Qwen splits digits one by one, Llama 3 in threes
    assert regex.findall(TIKTOKEN_FORMATS["qwen"].pattern, "12345") == list("12345")
    assert regex.findall(TIKTOKEN_FORMATS["llama3"].pattern, "12345") == ["123", "45"]
    assert load_tokenizer(f"llama3:{path}").eot_id == 401
    with pytest.raises(ValueError, match="which tiktoken format"):
        load_tokenizer(str(path))
    custom = from_tiktoken(path, pattern=r"\S+|\s+", special_tokens=["<s>", "</s>"], eot="</s>")
    assert (custom.vocab_size, custom.eot_id) == (402, 401)


def test_not_a_ranks_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(
        b"\x0a\x0b\x0a\x05<unk>\x15\x00\x00\x00\x00\x18\x02"
    )  # SentencePiece-like
    with pytest.raises(ValueError, match="not a tiktoken ranks file"):
        load_tokenizer(str(tmp_path))


def test_identity():
    gpt2 = gpt2_tokenizer()
    assert gpt2.identity["file_sha256"] == hashlib.sha256(GPT2_RANKS.read_bytes()).hexdigest()
    llama = load_tokenizer(str(META_FILE))
    assert llama.identity["file_sha256"] == hashlib.sha256(META_FILE.read_bytes()).hexdigest()
    assert llama.fingerprint != gpt2.fingerprint
    # the fingerprint is behaviour: the same ranks under the name of another format differ
    assert load_tokenizer(f"qwen:{META_FILE}").fingerprint != llama.fingerprint
