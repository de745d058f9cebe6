"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eot_id`.

- GPT-2: tiktoken's r50k_base encoding, built offline from the bundled ranks file
  (`assets/gpt2.tiktoken`), so nothing is downloaded.
- Any checkpoint that ships a Hugging Face `tokenizer.json` (Llama 3.1, Qwen3, ...), through
  the `tokenizers` library.

`encode` treats its input as ordinary text: a literal "<|endoftext|>" in a document is spelled
out as text, never turned into the special token, so data cannot forge document boundaries.
Special tokens enter the stream only where code puts `eot_id` explicitly (see shared/data.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import tiktoken
import tokenizers
from tiktoken.load import load_tiktoken_bpe

GPT2_RANKS = Path(__file__).parent / "assets" / "gpt2.tiktoken"
# sha256 of OpenAI's r50k_base.tiktoken: a corrupted or swapped asset fails loudly.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer regex as tiktoken writes it for r50k_base: the original
# 's|'t|...| ?\p{L}+|... with possessive quantifiers, which split identically but run faster.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
# How model families spell "end of document"; the first one a tokenizer.json knows is its eot.
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<|im_end|>", "<eos>")


class Tokenizer:
    """A tiktoken `Encoding` or a `tokenizers.Tokenizer`, with the end-of-text id beside it."""

    def __init__(self, backend: tiktoken.Encoding | tokenizers.Tokenizer, eot_id: int):
        self.backend = backend
        self.eot_id = eot_id
        if isinstance(backend, tiktoken.Encoding):
            self.vocab_size = backend.n_vocab
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.encode_ordinary(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Both backends want a list of Python ints; tensors and arrays convert via tolist().
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        # Models pad their vocabulary (to a multiple of 64, for fast matmuls); the padding ids
        # never occur in data but an undertrained model can still sample them: they decode to "".
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if isinstance(self.backend, tiktoken.Encoding):
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.backend).__name__}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


@functools.lru_cache(maxsize=1)
def gpt2_tokenizer() -> Tokenizer:
    ranks = load_tiktoken_bpe(str(GPT2_RANKS), expected_hash=GPT2_RANKS_SHA256)
    eot_id = len(ranks)  # 50256: GPT-2 appends <|endoftext|> right after its 50,256 merges
    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: eot_id},
        explicit_n_vocab=eot_id + 1,
    )
    return Tokenizer(encoding, eot_id)


def from_tokenizer_json(path: str | Path) -> Tokenizer:
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tokenizer.json there")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
    # Special tokens in the text stay text, matching tiktoken's encode_ordinary.
    backend.encode_special_tokens = True
    eot_id = next((i for t in EOT_CANDIDATES if (i := backend.token_to_id(t)) is not None), None)
    if eot_id is None:
        raise ValueError(f"{file}: no end-of-text token; looked for {', '.join(EOT_CANDIDATES)}")
    return Tokenizer(backend, eot_id)


def load_tokenizer(name_or_path: str = "gpt2") -> Tokenizer:
    if name_or_path == "gpt2":
        return gpt2_tokenizer()
    if Path(name_or_path).exists():
        return from_tokenizer_json(name_or_path)
    raise ValueError(
        f"unknown tokenizer {name_or_path!r}: use 'gpt2' or the path of a tokenizer.json "
        "(or of a directory holding one)"
    )
