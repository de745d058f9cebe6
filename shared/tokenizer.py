"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eot_id`.

- Bytes: ids 0..255 are the UTF-8 bytes, 256 is <|endoftext|>. The default corpus uses it: with
  257 ids the tiny models' head and loss cost little, so a CPU run learns letters, words and
  line breaks in a minute or two (nanoGPT's shakespeare_char, which counts characters instead).
- GPT-2: tiktoken's r50k_base encoding, built offline from the bundled ranks file
  (`assets/gpt2.tiktoken`), so nothing is downloaded.
- Any checkpoint that ships a Hugging Face `tokenizer.json` (Llama 3.1, Qwen3, ...), through
  the `tokenizers` library.
- tiktoken-format ranks files (one "base64(token bytes) rank" a line), as their publishers ship
  them: Meta's Llama 3 `tokenizer.model`, Kimi K2's `tiktoken.model` (+ tokenizer_config.json),
  Qwen's `qwen.tiktoken`. The file holds only the merges; the split pattern and the special tokens
  live in the publisher's code, so each convention is a `TiktokenFormat` here, picked by file name
  or named (`load_tokenizer("qwen:path/to/qwen.tiktoken")`); `from_tiktoken` takes any other
  pattern + special tokens. Llama 3's ids are checked against llama-models' own Tokenizer.

Every tokenizer has an `identity` (shared/data.py writes it into prepare.json): its name, the
sha256 of its file, and a fingerprint of the ids it gives a fixed text, which is equal for the same
vocabulary in either file format (GPT-2's tokenizer.json and gpt2.tiktoken), so train.py can tell
whether data and checkpoint share a tokenizer.

`encode` treats its input as ordinary text: a literal "<|endoftext|>" in a document is spelled
out as text, never turned into the special token, so data cannot forge document boundaries.
Special tokens enter the stream only where code puts `eot_id` explicitly (see shared/data.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
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
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "[EOS]", "<|im_end|>", "<eos>")


class Tokenizer:
    """A tiktoken `Encoding` or a `tokenizers.Tokenizer`, with the end-of-text id beside it."""

    def __init__(
        self, backend: tiktoken.Encoding | tokenizers.Tokenizer, eot_id: int, name: str = "", file: Path | None = None
    ):
        self.backend = backend
        self.eot_id = eot_id
        self.name = name  # the format (gpt2, tokenizer.json, llama3, ...) and the file it came from
        self.file_sha256 = hashlib.sha256(file.read_bytes()).hexdigest() if file else None
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

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the ids of PROBE_TEXT, with the vocabulary size and eot id: the tokenizer's behaviour,
        whatever file it was read from."""
        ids = self.encode(PROBE_TEXT)
        return hashlib.sha256(json.dumps([self.vocab_size, self.eot_id, ids]).encode()).hexdigest()

    @property
    def identity(self) -> dict:
        return {"name": self.name, "file_sha256": self.file_sha256, "fingerprint": self.fingerprint}

    def __repr__(self) -> str:
        return f"Tokenizer({type(self.backend).__name__}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


N_BYTES = 256


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and <|endoftext|> as 256: no file, no merges, every text encodable."""

    def __init__(self):
        self.backend = None
        self.eot_id = N_BYTES
        self.vocab_size = N_BYTES + 1
        self.name = "bytes"
        self.file_sha256 = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        out = bytearray()
        for i in ids:
            if 0 <= i < N_BYTES:
                out.append(i)
            elif i == self.eot_id:  # spelled out, as tiktoken decodes GPT-2's
                out += ENDOFTEXT.encode()
            # padding ids (a model's vocabulary rounded up) decode to "", as in Tokenizer.decode
        # a character the model cut short or made up decodes to U+FFFD rather than failing
        return out.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id})"


@functools.lru_cache(maxsize=1)
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


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
    return Tokenizer(encoding, eot_id, name="gpt2", file=GPT2_RANKS)


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
    return Tokenizer(backend, eot_id, name=f"tokenizer.json:{file}", file=file)


# --- tiktoken-format ranks files: the publishers' split patterns and special tokens ---------------

# Llama 3 (llama-models' Tokenizer.pat_str): cl100k_base's pattern; digits split in groups of 1-3
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen (qwen.tiktoken, Qwen 1 and 1.5): the same with digits one at a time
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Kimi K2 (tokenization_kimi.py): runs of Han characters apart, then cased words (upper* lower+ or
# upper+ lower*) with an optional English contraction; `&&` is a class intersection (fancy-regex)
_KIMI_UPPER, _KIMI_LOWER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]", r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_K2_PATTERN = "|".join(
    [
        r"[\p{Han}]+",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_UPPER}*{_KIMI_LOWER}+{_CONTRACTION}",
        rf"[^\r\n\p{{L}}\p{{N}}]?{_KIMI_UPPER}+{_KIMI_LOWER}*{_CONTRACTION}",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
N_RESERVED = 256  # Llama 3 and Kimi K2 keep 256 ids after the ranks for special tokens


def llama3_specials(path: Path, n_ranks: int) -> list[str]:
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>"]  # fmt: skip
    return named + [f"<|reserved_special_token_{i}|>" for i in range(2, N_RESERVED - len(named) + 2)]


def qwen_specials(path: Path, n_ranks: int) -> list[str]:
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]


def kimi_k2_specials(path: Path, n_ranks: int) -> list[str]:
    """tokenizer_config.json beside the ranks names some of the 256 ids after them; the rest are reserved."""
    config = path.parent / "tokenizer_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: Kimi K2's special tokens are listed there; not found")
    named = {int(i): t["content"] for i, t in json.loads(config.read_text())["added_tokens_decoder"].items()}
    return [named.get(i, f"<|reserved_token_{i}|>") for i in range(n_ranks, n_ranks + N_RESERVED)]


@dataclass(frozen=True)
class TiktokenFormat:
    pattern: str  # the pre-tokenizer regex (tiktoken's pat_str)
    specials: object  # (ranks file, number of ranks) -> special token names, given ids from len(ranks) on
    eot: str  # the special token that ends a document


TIKTOKEN_FORMATS = {
    "llama3": TiktokenFormat(LLAMA3_PATTERN, llama3_specials, "<|end_of_text|>"),
    "kimi_k2": TiktokenFormat(KIMI_K2_PATTERN, kimi_k2_specials, "[EOS]"),
    "qwen": TiktokenFormat(QWEN_PATTERN, qwen_specials, "<|endoftext|>"),
}
# the publishers' file names; any other name needs the format spelled out (e.g. "llama3:my.tiktoken")
TIKTOKEN_FILES = {"tokenizer.model": "llama3", "tiktoken.model": "kimi_k2", "qwen.tiktoken": "qwen"}


def read_ranks(file: Path) -> dict[bytes, int]:
    try:
        return load_tiktoken_bpe(str(file))
    except (ValueError, UnicodeDecodeError) as e:  # e.g. Llama 2's SentencePiece tokenizer.model (protobuf)
        raise ValueError(f"{file}: not a tiktoken ranks file (base64 token and rank on each line): {e}") from None


def from_tiktoken(
    path: str | Path,
    format: str | None = None,
    *,
    pattern: str | None = None,
    special_tokens: list[str] | None = None,
    eot: str | None = None,
) -> Tokenizer:
    """A tiktoken ranks file, split by `format`'s pattern with its special tokens (chosen by file name
    when not given), or by pattern + special_tokens (ids from len(ranks) on) + eot for any other."""
    file = Path(path)
    if file.is_dir():
        found = [file / name for name in TIKTOKEN_FILES if (file / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{file}: no {', '.join(TIKTOKEN_FILES)} there")
        file = found[0]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no tiktoken ranks file there")
    format = format or (None if pattern else TIKTOKEN_FILES.get(file.name))
    if format is None and (pattern is None or special_tokens is None or eot is None):
        raise ValueError(
            f"{file}: which tiktoken format? name one of {', '.join(TIKTOKEN_FORMATS)} (e.g. 'llama3:{file}')"
            " or give pattern, special_tokens and eot"
        )
    if format is not None and format not in TIKTOKEN_FORMATS:
        raise ValueError(f"unknown tiktoken format {format!r}; choose one of {', '.join(TIKTOKEN_FORMATS)}")
    ranks = read_ranks(file)
    if format is not None:  # what the caller gave wins over the format's own
        spec = TIKTOKEN_FORMATS[format]
        pattern, eot = pattern or spec.pattern, eot or spec.eot
        special_tokens = spec.specials(file, len(ranks)) if special_tokens is None else special_tokens
    specials = {t: len(ranks) + i for i, t in enumerate(special_tokens)}
    if eot not in specials:
        raise ValueError(f"{file}: the end-of-text token {eot!r} is not among its special tokens")
    encoding = tiktoken.Encoding(name=file.name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(encoding, specials[eot], name=f"{format or 'tiktoken'}:{file}", file=file)


def load_tokenizer(name_or_path: str = "gpt2") -> Tokenizer:
    """'gpt2' or 'bytes'; a tokenizer.json, tokenizer.model, tiktoken.model or qwen.tiktoken, or a directory
    holding one (tokenizer.json first); or FORMAT:PATH for a ranks file of another name."""
    if name_or_path == "gpt2":
        return gpt2_tokenizer()
    if name_or_path == "bytes":
        return byte_tokenizer()
    format, _, rest = name_or_path.partition(":")
    if rest and format in TIKTOKEN_FORMATS:
        return from_tiktoken(rest, format)
    path = Path(name_or_path)
    if path.is_dir() and not (path / "tokenizer.json").exists() and any((path / f).exists() for f in TIKTOKEN_FILES):
        return from_tiktoken(path)
    if path.is_file() and path.suffix != ".json":  # a ranks file: its name says which format, if any
        return from_tiktoken(path)
    if path.exists():
        return from_tokenizer_json(path)
    if re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name_or_path):  # reads as a hub id, "org/name"
        local = f"checkpoints/{name_or_path.rpartition('/')[2]}"
        raise ValueError(
            f"unknown tokenizer {name_or_path!r}: not a local path; a Hugging Face hub name must be downloaded "
            f"first, e.g. `hf download {name_or_path} --local-dir {local}` (or `huggingface-cli download ...`), "
            f"then pass {local}"
        )
    raise ValueError(
        f"unknown tokenizer {name_or_path!r}: use 'gpt2', 'bytes', the path of a tokenizer.json or tiktoken ranks file "
        f"({', '.join(TIKTOKEN_FILES)}) or of a directory holding one, or FORMAT:PATH with FORMAT one of "
        f"{', '.join(TIKTOKEN_FORMATS)}"
    )


# The fingerprint's text: prose, code, digits, whitespace runs and non-Latin scripts, so tokenizers that
# differ in merges, split pattern or byte fallback give different ids
PROBE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n  def f(x):\n\treturn x ** 2  # 3.14159, 1234567\n"
    "It's 2024-06-01 -- they'll say \"I've\" DON'T!!  \r\n Ünïcödé naïve café, Привет мир, 你好世界, こんにちは, 🙂👍🏽 "
)
