"""Token shards on disk and the loader that batches them for training.

Shard format (modded-nanogpt's `.bin`, so its cached fineweb-10B shards load as they are):
a header of 256 little-endian int32 -- [0] magic 20240520, [1] version, [2] token count --
then the tokens. Version 1 stores uint16 (vocabularies up to 65,536, e.g. GPT-2); version 2,
our extension, stores uint32 for larger ones (Llama 3's 128K, Qwen3's 151K).

    python -m shared.data prepare --input book.txt --out data/book   # text -> shards
    python -m shared.data prepare --input HuggingFaceFW/fineweb-edu --config sample-10BT --out data/edu
    python -m shared.data fineweb --shards 8                         # download fineweb-10B

`prepare` reads .txt, .jsonl/.json, .parquet or a hub dataset through Hugging Face `datasets`
and tokenizes with every core; see `python -m shared.data prepare --help`. It replaces --out
whole (a crash leaves the old or the new shards, never a mix) and refuses a directory holding
files it did not write; the prepare.json it leaves there says what was prepared.

`DataLoader` memory-maps the shards and yields (x, y) batches strided across DDP ranks, with
`state_dict()` for exact resume; given the model's vocab_size it checks each shard's ids.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from shared.tokenizer import ENDOFTEXT, TIKTOKEN_FILES, Tokenizer, gpt2_tokenizer, load_tokenizer

MAGIC = 20240520
HEADER_INTS = 256
VERSION_UINT16 = 1
VERSION_UINT32 = 2
DTYPES = {VERSION_UINT16: np.dtype("<u2"), VERSION_UINT32: np.dtype("<u4")}
HEADER_BYTES = HEADER_INTS * np.dtype("<i4").itemsize
SHAKESPEARE = Path(__file__).parent / "assets" / "shakespeare.txt"
# default_corpus: where each tokenizer's shards of it go (GPT-2's kept its old name)
DEFAULT_CORPUS_DIRS = {"bytes": "shakespeare_bytes", "gpt2": "shakespeare"}
FINEWEB_REPO = "kjj0/fineweb10B-gpt2"
FINEWEB_TRAIN_SHARDS = 103  # the repo's train shards, ~100M tokens each
PROGRESS_CHARS = 1 << 26  # prepare() reports progress every 64M characters of text


class DataError(ValueError):
    """A shard, data directory or corpus that cannot be used; the message names the file."""


# --- shard files ---------------------------------------------------------------------------


def shard_version(path: Path, tokens: np.ndarray, dtype) -> int:
    """The header version for `tokens`: uint16 when every id fits, unless `dtype` says otherwise."""
    if tokens.size and tokens.dtype.kind not in "iu":
        raise DataError(f"{path}: token ids must be integers, not {tokens.dtype}")
    if dtype is None:
        fits_uint16 = tokens.size == 0 or tokens.max() <= np.iinfo("<u2").max
        return VERSION_UINT16 if fits_uint16 else VERSION_UINT32
    version = next((v for v, d in DTYPES.items() if d == np.dtype(dtype).newbyteorder("<")), None)
    if version is None:
        raise DataError(f"{path}: token dtype must be uint16 or uint32, not {np.dtype(dtype)}")
    return version


def write_shard(path: str | Path, tokens, dtype=None) -> None:
    """Write tokens as one shard, atomically: readers see the old file or the whole new one."""
    path, tokens = Path(path), np.asarray(tokens)
    version = shard_version(path, tokens, dtype)
    limit = np.iinfo(DTYPES[version]).max
    if tokens.size and (tokens.min() < 0 or tokens.max() > limit):
        raise DataError(f"{path}: token ids {tokens.min()}..{tokens.max()} do not fit 0..{limit}")
    if tokens.size > np.iinfo("<i4").max:
        raise DataError(f"{path}: {tokens.size} tokens overflow the header's int32 count")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, version, tokens.size
    body = np.ascontiguousarray(tokens, dtype=DTYPES[version])
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name in the same directory (same filesystem, so os.replace is atomic) lets
    # several processes write the same shard at once; the last rename wins with equal content.
    # Mode 0o666 less the umask, as any new file (mkstemp's 0o600 would hide it from the group).
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(body.data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: str | Path) -> tuple[int, int]:
    """Validate a shard's header and size; return (version, token count)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < HEADER_BYTES:
                raise DataError(f"{path}: truncated: {size} bytes, less than the {HEADER_BYTES}-byte header")
            magic, version, count = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")[:3].tolist()
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from e
    if magic != MAGIC:
        raise DataError(f"{path}: bad magic {magic} (expected {MAGIC}); not a token shard")
    if version not in DTYPES:
        raise DataError(f"{path}: unsupported version {version} (1 = uint16 tokens, 2 = uint32 tokens)")
    held = (size - HEADER_BYTES) // DTYPES[version].itemsize
    if held < count:
        raise DataError(f"{path}: truncated: header says {count} tokens, file holds {held}")
    if size != HEADER_BYTES + count * DTYPES[version].itemsize:
        raise DataError(f"{path}: header says {count} tokens, but the file has {size} bytes")
    return version, count


def read_shard(path: str | Path) -> np.ndarray:
    """The shard's tokens as a read-only memory map (nothing is copied into RAM)."""
    version, count = read_header(path)
    if count == 0:  # mmap cannot map zero bytes
        return np.empty(0, dtype=DTYPES[version])
    return np.memmap(path, dtype=DTYPES[version], mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(data_dir: str | Path, split: str) -> list[Path]:
    data_dir = Path(data_dir)
    pattern = f"*_{split}_*.bin"
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory; give the directory that holds the shards {pattern}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data directory not found (looked for shards {pattern} in it)")
    paths = sorted(data_dir.glob(pattern))
    if not paths:
        present = sorted(p.name for p in data_dir.glob("*.bin")) or ["no .bin files"]
        raise DataError(f"{data_dir}: no shards matching {pattern}; found: {', '.join(present)}")
    return paths


# --- prepare's output directory: written beside it, then swapped in whole ------------------
# prepare writes the new shards into a fresh directory beside out_dir, under a unique name, and
# only when they are all there puts it in out_dir's place in one step. So a crash at any moment
# leaves out_dir old and whole or new and whole (plus the unfinished directory, which the next
# prepare beside it deletes), shards of an earlier, larger run never survive, and prepares run at
# once (ranks preparing the default corpus) cannot collide.

MARKER = "prepare.json"  # written last by write_split: what the directory holds, and who made it
SHARD_NAME = re.compile(r".+_(train|val)_\d{6}\.bin")
AT_FDCWD, RENAME_EXCHANGE = -100, 2  # Linux renameat2: paths from the working directory; swap


def check_replaceable(target: Path, shown) -> None:
    """Refuse to replace a directory holding anything prepare did not write: it would be deleted."""
    if not target.exists():
        return
    if not target.is_dir():
        raise DataError(f"{shown}: exists and is not a directory; choose another --out")
    try:
        entries = {e.name: e.is_file(follow_symlinks=False) for e in os.scandir(target)}
    except OSError as e:
        raise DataError(f"{shown}: cannot list it ({e.strerror})") from e
    foreign = sorted(n for n, is_file in entries.items() if not (is_file and (n == MARKER or SHARD_NAME.fullmatch(n))))
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(
            f"{shown}: not empty, and holds files prepare did not write ({listed}); choose another --out or empty it"
        )
    if entries and MARKER not in entries:  # e.g. downloaded fineweb shards: hours to fetch again
        raise DataError(
            f"{shown}: holds shards without a {MARKER} (downloaded, or made by an older prepare); "
            "choose another --out or delete them"
        )


def is_staging(path: Path, target: Path) -> bool:
    return re.fullmatch(rf"\.{re.escape(target.name)}\.prepare-[0-9a-f]{{32}}", path.name) is not None


def make_staging(target: Path) -> tuple[Path, int]:
    """A new empty directory beside target, and an open descriptor holding its lock. The kernel
    drops the lock when this process ends, however it ends: a later prepare then deletes it."""
    staging = target.with_name(f".{target.name}.prepare-{uuid.uuid4().hex}")
    creating = staging.with_name(staging.name + ".new")  # a name remove_abandoned leaves alone
    os.mkdir(creating)  # mode 0o777 less the umask, as any new directory
    fd = os.open(creating, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(creating, staging)
    return staging, fd


def remove_abandoned(target: Path) -> None:
    """Delete the staging directories beside target whose prepare died (nobody holds their lock)."""
    for entry in os.scandir(target.parent):
        path = Path(entry.path)
        if not (is_staging(path, target) and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # removed meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: its prepare is running
            # Its prepare may have finished and renamed it to out_dir just before we locked it.
            abandoned = os.path.samestat(os.stat(path), os.fstat(fd))
        except OSError:
            abandoned = False
        if abandoned:
            print(f"removing {path}, left by a prepare that did not finish", file=sys.stderr)
            shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories' names in one step (Linux renameat2 with RENAME_EXCHANGE), so b never
    goes missing. False where this system or filesystem cannot; then nothing has moved."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(staging: Path, target: Path, shown) -> Path | None:
    """Put staging at target; return where target's old contents went (None if there were none)."""
    while True:
        if not target.exists():
            try:
                os.rename(staging, target)
                return None
            except OSError as e:  # another prepare got there first: replace its output instead
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        check_replaceable(target, shown)
        if exchange(staging, target):
            return staging
        # Two renames where the swap is not available: a crash between them leaves no target,
        # but both complete directories beside it, for the next prepare to delete.
        aside = target.with_name(f".{target.name}.prepare-{uuid.uuid4().hex}")
        os.rename(target, aside)
        try:
            os.rename(staging, target)
        except OSError:
            os.rename(aside, target)
            raise
        return aside


def fsync_dir(path: Path) -> None:
    """Make the renames and creations inside `path` durable (train.py's checkpoints use it too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(out_dir: Path) -> Iterator[Path]:
    """An empty directory to write out_dir's new contents into. When the block ends without an
    error it takes out_dir's place whole, and out_dir's old contents are deleted."""
    target = out_dir.resolve()  # a symlink's target, so the swap stays on one filesystem
    check_replaceable(target, out_dir)  # before the hours of tokenizing; swap_in checks again
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(target)
        staging, fd = make_staging(target)
    except OSError as e:
        raise DataError(f"{out_dir}: cannot create a directory beside it ({e.strerror})") from e
    try:
        yield staging
        fsync_dir(staging)  # the shards' names are on disk before they appear at out_dir
        old = swap_in(staging, target, out_dir)
        fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(fd)


# --- one run per out-dir ----------------------------------------------------------------------

LOCK_NAME = ".lock"
HELD = {}  # directory -> the open lock file of this process's run there


def hold_dir(directory: str | Path):
    """Take `directory` (made if missing) for this process's run: an exclusive flock on its .lock file,
    which says who holds it. Returns the open file; the lock lasts until it is closed or the process
    ends, however it ends, so a killed run's lock is simply taken over (the kernel drops a dead
    process's flock; the stale line it left is overwritten). A live holder is refused in one line."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # a run of this process that ended in an exception may still be held by its traceback: one process
    # runs one run at a time, so its lock passes to the new one
    if (earlier := HELD.pop(directory.resolve(), None)) is not None:
        earlier.close()
    lock = open(directory / LOCK_NAME, "a+")  # noqa: SIM115 (the caller holds it open)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "which has not yet written who it is"
        lock.close()
        raise SystemExit(
            f"{directory} is in use by another run ({holder}): wait for it or pass another --out-dir"
        ) from None
    lock.truncate(0)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {shlex.join(sys.argv)}\n")
    lock.flush()
    HELD[directory.resolve()] = lock
    return lock


# --- text -> shards ------------------------------------------------------------------------


def read_documents(path: Path) -> list[str]:
    """The text's documents, split on the literal "<|endoftext|>"; empty ones dropped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from e
    return [doc for doc in text.split(ENDOFTEXT) if doc]


def encode_document(doc: str, tokenizer: Tokenizer, dtype=np.uint32) -> np.ndarray:
    # Every document is preceded by eot, as in the fineweb shards, so a sequence starting at
    # a document's eot conditions on "start of document".
    return np.array([tokenizer.eot_id, *tokenizer.encode(doc)], dtype=dtype)


def tokenize_file(path: Path, tokenizer: Tokenizer) -> np.ndarray:
    chunks, n_tokens, chars = [], 0, 0
    for doc in read_documents(path):
        chunks.append(encode_document(doc, tokenizer))
        n_tokens += len(chunks[-1])
        chars += len(doc)
        if chars >= PROGRESS_CHARS:  # only big files get here
            print(f"{path}: {n_tokens:,} tokens so far", file=sys.stderr)
            chars = 0
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint32)


def vocab_dtype(tokenizer: Tokenizer) -> np.dtype:
    # One dtype for the whole dataset, from the vocabulary rather than from each shard's ids.
    return DTYPES[VERSION_UINT16 if tokenizer.vocab_size <= 1 << 16 else VERSION_UINT32]


def check_options(source, name: str, val_fraction: float, shard_tokens: int) -> None:
    """prepare's options, checked before any tokenizing."""
    if not 0 < val_fraction < 1:  # also refuses NaN
        raise DataError(
            f"{source}: val_fraction must be between 0 and 1, exclusive (training needs a train and"
            f" a val split), got {val_fraction}"
        )
    if shard_tokens < 1:
        raise DataError(f"{source}: shard_tokens must be positive, got {shard_tokens}")
    if not name or Path(name).name != name or name in (".", ".."):
        raise DataError(f"{source}: the shard name {name!r} must be a plain file name, without '/'")


def write_split(
    chunks: Iterable[np.ndarray],
    n_tokens: int,
    out_dir: Path,
    name: str,
    tokenizer: Tokenizer,
    val_fraction: float,
    shard_tokens: int,
    source,
    log: Callable[[str], None] | None = None,
) -> None:
    """Write a token stream of known length, arriving in chunks, as {name}_train_000000.bin, ...
    and {name}_val_000000.bin, the stream's last `val_fraction`; then MARKER, saying what it wrote.

    The train split is cut into equal shards of at most `shard_tokens` (a short last shard could
    hold less than one batch, which the loader rejects). Shards are written as soon as they fill,
    so memory holds one shard, not the stream.
    """
    n_val = round(n_tokens * val_fraction)
    n_train = n_tokens - n_val
    if min(n_train, n_val) < 2:  # one input token and its target
        raise DataError(
            f"{source}: {n_tokens} tokens make a train split of {n_train} and a val split of {n_val}"
            f" (val_fraction={val_fraction}); each needs at least 2: give more text or another val_fraction"
        )
    dtype = vocab_dtype(tokenizer)
    n_shards = -(-n_train // shard_tokens)
    ends = {  # shard file -> the stream position where it ends
        f"{name}_train_{i:06d}.bin": n_train * (i + 1) // n_shards for i in range(n_shards)
    }
    ends[f"{name}_val_000000.bin"] = n_tokens
    log = log or (lambda line: print(line, file=sys.stderr))
    shards = iter(ends.items())
    file, end = next(shards)
    held, start, size = [], 0, 0  # chunks not written yet: `size` tokens from position `start`
    for chunk in chunks:
        held.append(chunk)
        size += len(chunk)
        while file is not None and start + size >= end:
            tokens = held[0] if len(held) == 1 else np.concatenate(held)
            write_shard(out_dir / file, tokens[: end - start], dtype=dtype)
            log(f"wrote {file}: {end - start:,} tokens")
            held, size, start = [tokens[end - start :]], size - (end - start), end
            file, end = next(shards, (None, None))
    if file is not None or size:
        raise DataError(f"{source}: expected {n_tokens} tokens, got {start + size}")
    about = {
        "source": str(source), "name": name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
        "train_tokens": n_train, "train_shards": n_shards, "val_tokens": n_val, "tokenizer": tokenizer.identity,
    }  # fmt: skip
    (out_dir / MARKER).write_text(json.dumps(about, indent=1) + "\n")
    log(f"{name}: {n_train:,} train tokens in {n_shards} shards, {n_val:,} val tokens")


def prepare(
    input_path: str | Path,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    name: str | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
) -> Path:
    """Tokenize a text file into {name}_train_000000.bin, ... and {name}_val_000000.bin in out_dir,
    which is replaced whole (see `replacing`).

    The direct path, in this process and without `datasets` (default_corpus uses it): the text
    and its token stream (4 bytes a token) are held in memory; fine up to a few GB of text.
    prepare_dataset writes the same shards from other formats, with every core.
    """
    input_path, out_dir = Path(input_path), Path(out_dir)
    tokenizer = tokenizer or gpt2_tokenizer()
    name = name or input_path.stem
    check_options(input_path, name, val_fraction, shard_tokens)
    if not input_path.is_file():
        raise DataError(f"{input_path}: input text file not found")
    with replacing(out_dir) as staging:
        tokens = tokenize_file(input_path, tokenizer)
        write_split([tokens], len(tokens), staging, name, tokenizer, val_fraction, shard_tokens, input_path)
    return out_dir


def default_corpus(root: str | Path = "data", tokenizer: str = "bytes") -> Path:
    """The bundled Shakespeare as shards, prepared on first use: in root/shakespeare_bytes with the
    byte tokenizer (the default runs' corpus), or in root/shakespeare with tokenizer="gpt2".

    Ranks launched together may all prepare it at once; each replaces the directory whole, so
    every rank finds complete shards.
    """
    out_dir = Path(root) / DEFAULT_CORPUS_DIRS[tokenizer]
    if not all((out_dir / f"shakespeare_{s}_000000.bin").exists() for s in ("train", "val")):
        prepare(SHAKESPEARE, out_dir, load_tokenizer(tokenizer), name="shakespeare")
    return out_dir


def unigram_entropy(data_dir: str | Path, split: str = "train", max_tokens: int = 1 << 24) -> float:
    """The loss, in nats a token, of predicting every token of `split` by its frequency there: the
    entropy of its unigram distribution. A model's val loss is worth reading against it (bytes of
    Shakespeare: 3.3 nats); a model at this loss has learnt only which tokens are common. Counted
    over the first `max_tokens` tokens (a few seconds' work, and plenty for an estimate)."""
    counts, seen = np.zeros(0, dtype=np.int64), 0
    for path in shard_paths(data_dir, split):
        tokens = read_shard(path)[: max_tokens - seen]
        shard_counts = np.bincount(tokens)
        counts = np.pad(counts, (0, max(0, len(shard_counts) - len(counts))))
        counts[: len(shard_counts)] += shard_counts
        seen += len(tokens)
        if seen >= max_tokens:
            break
    if seen == 0:
        raise DataError(f"{data_dir}: the {split} shards hold no tokens")
    p = counts[counts > 0] / seen
    return float(-(p * np.log(p)).sum())


# --- any corpus -> shards, through Hugging Face `datasets` ---------------------------------
# `datasets` is imported inside these functions: it takes seconds to import, and every
# train.py imports this module.

# Local inputs by suffix, as `datasets` builder names; any other input is a hub dataset name.
LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
READ_BYTES = 1 << 26  # text_file_documents reads 64 MB at a time
ROWS_PER_WRITE = 1000  # documents per batch read back from the tokenized Arrow files


def text_file_documents(path: str, stamp: tuple[int, int]) -> Iterator[dict[str, str]]:
    """read_documents' documents, one row each, reading the file a block at a time."""
    # `stamp` (size, mtime) goes unused here, but `datasets` hashes the arguments into its cache
    # key, so an edited file is read again rather than served from the cache.
    decoder = codecs.getincrementaldecoder("utf-8")()
    done, carry = 0, ""  # bytes read; the text after the last separator seen

    def decode(block: bytes) -> str:
        pending = len(decoder.getstate()[0])  # bytes of a character split across blocks
        try:
            return decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {done - pending + e.start})") from e

    with open(path, "rb") as f:
        while block := f.read(READ_BYTES):
            *docs, carry = (carry + decode(block)).split(ENDOFTEXT)
            done += len(block)
            yield from ({"text": doc} for doc in docs if doc)
    carry += decode(b"")  # fails on a character cut off by the end of the file
    if carry:
        yield {"text": carry}


def encode_documents(batch: dict[str, list], tokenizer: Tokenizer, column: str, dtype) -> dict[str, list]:
    # One row per document in, one row of ids per non-empty document out (a null is empty).
    return {"ids": [encode_document(doc, tokenizer, dtype) for doc in batch[column] if doc]}


def load_corpus(
    source: str, text_column: str, split: str, config: str | None, num_proc: int, cache_dir: str | None, scratch: str
):
    """The input as a `datasets.Dataset` of one document a row, and the name of its text column.

    Arrow files go to `cache_dir`, else for a local file to `scratch` (a temporary folder) and for a
    hub dataset to datasets' own cache, where the download is kept for the next run.
    """
    import datasets

    path = Path(source)
    kind = LOCAL_FORMATS.get(path.suffix.lower())
    if path.is_dir() or (path.exists() and kind is None):
        wanted = "a .txt, .jsonl, .json or .parquet file or a hub dataset name"
        raise DataError(f"{source}: unsupported input; give {wanted}")
    if kind is not None and not path.is_file():
        raise DataError(f"{source}: input file not found")
    try:
        if kind == "text":  # our reader, so documents split at <|endoftext|> as in prepare()
            args = {"path": str(path.resolve()), "stamp": (path.stat().st_size, path.stat().st_mtime_ns)}
            corpus = datasets.Dataset.from_generator(
                text_file_documents, gen_kwargs=args, cache_dir=cache_dir or scratch
            )
            text_column = "text"
        elif kind is not None:
            corpus = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache_dir or scratch)
        else:
            corpus = datasets.load_dataset(source, config, split=split, cache_dir=cache_dir, num_proc=num_proc)
    except datasets.exceptions.DatasetGenerationError as e:  # the builder could not read the file
        if isinstance(e.__cause__, DataError):
            raise e.__cause__ from None
        raise DataError(f"{source}: cannot read it as {kind} ({e.__cause__ or e})") from e
    except ConnectionError as e:  # also what offline mode (HF_HUB_OFFLINE=1) raises
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{source}: not a local file, and the Hugging Face hub is unreachable: {reason}") from e
    if text_column not in corpus.column_names:
        raise DataError(
            f"{source}: no text column {text_column!r}; its columns are "
            f"{', '.join(map(repr, corpus.column_names))} (choose one with --text-column)"
        )
    feature = corpus.features[text_column]
    if getattr(feature, "dtype", None) not in ("string", "large_string", "string_view"):
        raise DataError(f"{source}: column {text_column!r} holds {feature}, not text")
    return corpus, text_column


def prepare_dataset(
    source: str | Path,
    out_dir: str | Path,
    tokenizer: Tokenizer | None = None,
    name: str | None = None,
    val_fraction: float = 0.1,
    shard_tokens: int = 100_000_000,
    *,
    text_column: str = "text",
    split: str = "train",
    config: str | None = None,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """prepare() for a local .txt, .jsonl, .json or .parquet file or a hub dataset name, through
    `datasets`, tokenizing with `num_proc` processes (default: one per core).

    prepare()'s document rules: a .txt splits at the literal <|endoftext|>; other inputs hold one
    document a row, in `text_column`; empty documents are dropped; each starts with eot. The
    input and its tokens live in Arrow files on disk (see load_corpus for where) and shards are
    written as the tokens stream past, so memory holds one shard. The tokens' Arrow files go to a
    temporary folder beside the shards, deleted at the end; out_dir is replaced whole (see `replacing`).
    """
    import datasets
    import pyarrow.compute as pc
    from datasets.utils.tqdm import tqdm

    source, out_dir = str(source), Path(out_dir)
    tokenizer = tokenizer or gpt2_tokenizer()
    name = name or Path(source).stem
    check_options(source, name, val_fraction, shard_tokens)
    num_proc = (os.cpu_count() or 1) if num_proc is None else num_proc
    if num_proc < 1:
        raise DataError(f"{source}: num_proc must be positive, got {num_proc}")
    # The Arrow files go in a folder inside the new directory, deleted before it is swapped in.
    with replacing(out_dir) as staging, tempfile.TemporaryDirectory(dir=staging, prefix=".scratch-") as tmp:
        cache = None if cache_dir is None else str(cache_dir)
        corpus, column = load_corpus(source, text_column, split, config, num_proc, cache, scratch=tmp)
        dtype = vocab_dtype(tokenizer)
        tokens = corpus.map(
            encode_documents,
            batched=True,
            fn_kwargs={"tokenizer": tokenizer, "column": column, "dtype": dtype},
            remove_columns=corpus.column_names,
            features=datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype.name))}),
            num_proc=max(1, min(num_proc, len(corpus))),  # datasets refuses more processes than rows
            cache_file_name=os.path.join(tmp, "tokens.arrow"),
            new_fingerprint=uuid.uuid4().hex,  # a fresh file each run; hashing the tokenizer is slow
            desc="tokenizing",
        )
        n_tokens = pc.sum(pc.list_value_length(tokens.data.column("ids"))).as_py() or 0
        with tqdm(total=n_tokens, unit="tok", unit_scale=True, desc="writing shards") as bar:

            def chunks() -> Iterator[np.ndarray]:
                for table in tokens.with_format("arrow").iter(batch_size=ROWS_PER_WRITE):
                    ids = pc.list_flatten(table.column("ids")).to_numpy()
                    bar.update(len(ids))
                    yield ids

            write_split(chunks(), n_tokens, staging, name, tokenizer, val_fraction, shard_tokens, source, bar.write)
        corpus = tokens = None  # close the Arrow files before their folder goes
    return out_dir


# --- fineweb-10B ---------------------------------------------------------------------------


def download_fineweb(
    num_shards: int, out_dir: str | Path = "data/fineweb10B", download: Callable | None = None
) -> Path:
    """Fetch modded-nanogpt's GPT-2-tokenized fineweb-10B: the val shard and `num_shards` train
    shards of ~100M tokens. Files already present are kept; every file's header is checked."""
    if not 1 <= num_shards <= FINEWEB_TRAIN_SHARDS:
        raise DataError(f"{FINEWEB_REPO}: num_shards must be 1..{FINEWEB_TRAIN_SHARDS}, got {num_shards}")
    if download is None:  # imported here so the rest of the module works without hub access
        from huggingface_hub import hf_hub_download as download
    out_dir = Path(out_dir)
    names = ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, num_shards + 1)]
    for name in names:
        if not (out_dir / name).exists():
            print(f"downloading {FINEWEB_REPO}/{name} -> {out_dir}", file=sys.stderr)
            download(repo_id=FINEWEB_REPO, filename=name, repo_type="dataset", local_dir=out_dir)
        read_header(out_dir / name)
    return out_dir


# --- loader --------------------------------------------------------------------------------


def check_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Every id in the shard indexes a vocabulary of vocab_size: one pass over the file."""
    if len(tokens) == 0 or np.iinfo(tokens.dtype).max < vocab_size:  # no id can be out of range
        return
    if (top := int(tokens.max())) >= vocab_size:
        raise DataError(
            f"{path}: token id {top} is outside the model's vocabulary of {vocab_size}"
            " (were the shards made with another tokenizer?)"
        )


def check_tokenizer(data_dir: str | Path, vocab_size: int, checkpoint: str | Path | None = None) -> str:
    """The tokenizer that made data_dir's shards (its MARKER) against the model's: a DataError when
    the model's vocabulary is smaller than the tokenizer's, or when the checkpoint directory ships a
    tokenizer (tokenizer.json, tokenizer.model, ...) that tokenizes differently; else a line to log."""
    marker = Path(data_dir) / MARKER
    if not marker.is_file():  # e.g. downloaded fineweb; each shard's ids are still checked when opened
        return f"{data_dir}: no {MARKER}, so the tokenizer of its shards is unknown (ids are checked per shard)"
    about = json.loads(marker.read_text())
    made_by = about.get("tokenizer") or {"name": "an unrecorded tokenizer (an older prepare)"}
    if about["vocab_size"] > vocab_size:
        raise DataError(
            f"{data_dir}: tokenized by {made_by['name']} with {about['vocab_size']} ids, more than the model's "
            f"vocabulary of {vocab_size}: prepare the data with the model's tokenizer"
        )
    ships = checkpoint is not None and any(
        (Path(checkpoint) / f).is_file() for f in ("tokenizer.json", *TIKTOKEN_FILES)
    )
    if ships and made_by.get("fingerprint") != (theirs := load_tokenizer(str(checkpoint))).fingerprint:
        raise DataError(
            f"{data_dir}: tokenized by {made_by['name']}, not by the tokenizer {checkpoint} ships ({theirs.name}): "
            f"prepare it with --tokenizer {checkpoint}"
        )
    line = f"{data_dir}: tokenized by {made_by['name']}"
    if vocab_size > about["vocab_size"]:  # e.g. GPT-2's 50,257 padded to 50,304 for fast matmuls
        line += f", {about['vocab_size']:,} ids; the model's {vocab_size:,} leave {vocab_size - about['vocab_size']:,} unused"
    return line


class DataLoader:
    """(x, y) batches of shape (batch_size, seq_len) from the shards of one split.

    Rank r of world_size reads C + 1 tokens at p + r*C (C = batch_size * seq_len), then every
    rank advances p by world_size * C. The ranks' reads are disjoint and, in rank order, tile
    the stream; within a shard one rank taking world_size micro-batches reads exactly what
    world_size ranks read in one step. A shard's last < world_size*C tokens are skipped; after
    the last shard the loader starts the first again (a new epoch).

    With `vocab_size` (the model's), each shard's ids are checked once, when it is first opened:
    an id the embedding cannot look up fails there, naming the shard, not inside the model.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int | None = None,
    ):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"{data_dir}: batch_size {batch_size} and seq_len {seq_len} must be positive")
        if not 0 <= rank < world_size:
            raise DataError(f"{data_dir}: rank {rank} outside world_size {world_size}")
        if vocab_size is not None and vocab_size < 1:
            raise DataError(f"{data_dir}: vocab_size must be positive, got {vocab_size}")
        self.paths = shard_paths(data_dir, split)
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.vocab_size, self._checked = vocab_size, set()  # indices of the shards whose ids were checked
        # Headers are checked up front, so a bad shard fails now rather than hours into a run.
        need = world_size * batch_size * seq_len + 1
        for path in self.paths:
            if (count := read_header(path)[1]) < need:
                raise DataError(
                    f"{path}: too short: {count} tokens, but one step needs world_size*batch_size*seq_len"
                    f" + 1 = {world_size}*{batch_size}*{seq_len}+1 = {need}"
                )
        self._mapped: tuple[int, np.ndarray] | None = None
        self.reset()

    def reset(self) -> None:
        self.shard, self.pos = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        try:
            shard, pos = int(state["shard"]), int(state["pos"])
        except (KeyError, TypeError, ValueError):
            shard, pos = -1, -1
        if not (0 <= shard < len(self.paths) and pos >= 0):
            where = self.paths[0].parent
            raise DataError(f"{where}: loader state {state} does not fit its {len(self.paths)} shards")
        self.shard, self.pos = shard, pos

    def _tokens(self) -> np.ndarray:
        # Only the current shard stays mapped, so a long run holds one file open, not 100.
        if self._mapped is None or self._mapped[0] != self.shard:
            tokens = read_shard(self.paths[self.shard])
            if self.vocab_size is not None and self.shard not in self._checked:
                check_ids(self.paths[self.shard], tokens, self.vocab_size)
                self._checked.add(self.shard)
            self._mapped = (self.shard, tokens)
        return self._mapped[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        C = B * T
        if self.pos + self.world_size * C + 1 > len(self._tokens()):
            self.shard, self.pos = (self.shard + 1) % len(self.paths), 0
        start = self.pos + self.rank * C
        buf = torch.from_numpy(self._tokens()[start : start + C + 1].astype(np.int64))  # (C+1,)
        self.pos += self.world_size * C
        return buf[:-1].view(B, T), buf[1:].view(B, T)  # y is x shifted left by one token

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()


# --- command line --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.data",
        description="Make token shards (modded-nanogpt .bin format) for shared.data.DataLoader.",
        epilog="examples:\n  python -m shared.data prepare --input book.txt --out data/book\n"
        "  python -m shared.data fineweb --shards 8",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    about = "tokenize a corpus into {name}_train_*.bin and {name}_val_000000.bin"
    inputs = f"""{about}, through Hugging Face datasets.

--input is one of:
  FILE.txt             UTF-8 text; the literal <|endoftext|> separates documents
  FILE.jsonl, .json    JSON objects, one a line; each is a document, its text in --text-column
  FILE.parquet         one document a row, its text in --text-column
  OWNER/NAME           a Hugging Face hub dataset (needs the network), with --config and
                       --split: --input HuggingFaceFW/fineweb-edu --config sample-10BT
Every document starts with the eot token; empty ones are dropped. The last --val-fraction of
the token stream is the val shard. --num-proc processes tokenize (default: all cores).
datasets' Arrow copy of a local file is deleted at the end unless --cache-dir is given; a hub
dataset is cached in --cache-dir, else $HF_DATASETS_CACHE (default ~/.cache/huggingface/datasets)."""
    p = commands.add_parser(
        "prepare", help=about, description=inputs, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", required=True, help="a .txt, .jsonl, .json or .parquet file, or a hub dataset name")
    out_help = "directory for the .bin shards, replaced whole; refused if it holds other files"
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--text-column", default="text", help="the documents' column in .jsonl/.json/.parquet/hub (text)")
    p.add_argument("--config", help="hub dataset configuration (subset), e.g. sample-10BT")
    p.add_argument("--split", default="train", help="hub dataset split, e.g. train or 'train[:1%%]' (train)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizing processes (all cores)")
    p.add_argument("--cache-dir", type=Path, help="where datasets keeps its Arrow copy of the input")
    p.add_argument("--val-fraction", type=float, default=0.1, help="last fraction of tokens for val, in (0, 1) (0.1)")
    tok_help = "'gpt2', 'bytes', a tokenizer.json or tokenizer.model (or their directory), or FORMAT:PATH (llama3, kimi_k2, qwen)"
    p.add_argument("--tokenizer", default="gpt2", help=tok_help)
    p.add_argument("--name", help="shard name prefix (default: the input's file or dataset name)")
    shard_help = "at most this many tokens per train shard (1e8)"
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help=shard_help)
    about = f"download GPT-2-tokenized fineweb-10B shards from the Hugging Face dataset {FINEWEB_REPO}"
    f = commands.add_parser("fineweb", help=about, description=f"{about}; files already present are kept.")
    shards_help = f"number of ~100M-token train shards: 1..{FINEWEB_TRAIN_SHARDS}"
    f.add_argument("--shards", required=True, type=int, help=shards_help)
    f.add_argument("--out", type=Path, default=Path("data/fineweb10B"), help="directory (data/fineweb10B)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            tokenizer = load_tokenizer(args.tokenizer)
            prepare_dataset(
                args.input,
                args.out,
                tokenizer,
                args.name,
                args.val_fraction,
                args.shard_tokens,
                text_column=args.text_column,
                split=args.split,
                config=args.config,
                num_proc=args.num_proc,
                cache_dir=args.cache_dir,
            )
        else:
            download_fineweb(args.shards, args.out)
    except (ValueError, OSError) as e:  # DataError, unknown tokenizer, download failure
        parser.exit(1, f"error: {e}\n")


if __name__ == "__main__":
    main()
