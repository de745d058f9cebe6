"""shared.data: the shard format, text and datasets -> shards, the fineweb downloader and the DataLoader."""

import functools
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import data
from shared.data import (
    HEADER_BYTES,
    HEADER_INTS,
    MAGIC,
    MARKER,
    VERSION_UINT16,
    VERSION_UINT32,
    DataError,
    DataLoader,
    default_corpus,
    download_fineweb,
    encode_documents,
    main,
    prepare,
    prepare_dataset,
    read_header,
    read_shard,
    unigram_entropy,
    write_shard,
    write_split,
)
from shared.tokenizer import ENDOFTEXT, gpt2_tokenizer


def make_shards(data_dir, lengths, split="train"):
    """Shards whose tokens are their global positions (0, 1, 2, ...), so a batch shows where it
    was read from. Returns the concatenated stream."""
    stream = np.arange(sum(lengths))
    for i, start in enumerate(np.cumsum([0, *lengths[:-1]])):
        write_shard(Path(data_dir) / f"t_{split}_{i:06d}.bin", stream[start : start + lengths[i]])
    return stream


# --- shard files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "top, version", [(65_535, VERSION_UINT16), (65_536, VERSION_UINT32), (151_935, VERSION_UINT32)]
)
def test_write_read_round_trip(tmp_path, top, version):
    tokens = np.array([0, 1, top, 7, top - 1])
    write_shard(tmp_path / "s.bin", tokens)
    assert read_header(tmp_path / "s.bin") == (version, len(tokens))
    read = read_shard(tmp_path / "s.bin")
    assert isinstance(read, np.memmap) and not read.flags.writeable
    np.testing.assert_array_equal(read, tokens)
    header = np.fromfile(tmp_path / "s.bin", dtype="<i4", count=HEADER_INTS)
    assert header[:3].tolist() == [MAGIC, version, len(tokens)] and not header[3:].any()
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind


def test_write_dtype_override_and_bad_ids(tmp_path):
    write_shard(tmp_path / "s.bin", [1, 2, 3], dtype=np.uint32)
    assert read_header(tmp_path / "s.bin") == (VERSION_UINT32, 3)
    write_shard(tmp_path / "empty.bin", [])
    assert len(read_shard(tmp_path / "empty.bin")) == 0
    with pytest.raises(DataError, match=r"s\.bin: token ids 0\.\.70000 do not fit 0\.\.65535"):
        write_shard(tmp_path / "s.bin", [0, 70_000], dtype=np.uint16)
    with pytest.raises(DataError, match="must be uint16 or uint32, not int64"):
        write_shard(tmp_path / "s.bin", [1], dtype=np.int64)
    with pytest.raises(DataError, match="do not fit"):
        write_shard(tmp_path / "s.bin", [-1])
    with pytest.raises(DataError, match="must be integers"):
        write_shard(tmp_path / "s.bin", [1.5])
    assert read_header(tmp_path / "s.bin") == (VERSION_UINT32, 3)  # failed writes left it alone


@pytest.fixture
def umask_002():
    """A group-writable umask, so a mode taken from it differs from both 0o600 and a fixed 0o644."""
    old = os.umask(0o002)
    yield
    os.umask(old)


def test_modes_follow_umask(tmp_path, umask_002):
    write_shard(tmp_path / "s.bin", [1, 2, 3])
    assert (tmp_path / "s.bin").stat().st_mode & 0o777 == 0o664  # not tempfile's 0o600
    (tmp_path / "in.txt").write_text("some text to prepare")
    out = prepare(tmp_path / "in.txt", tmp_path / "o", val_fraction=0.5)
    assert out.stat().st_mode & 0o777 == 0o775  # not mkdtemp's 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        ["in_train_000000.bin", "in_val_000000.bin", MARKER], 0o664
    )


def corrupt(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_bad_shards(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100))
    corrupt(path, 0, np.int32(1234).tobytes())
    with pytest.raises(DataError, match=r"s\.bin: bad magic 1234 \(expected 20240520\)"):
        read_shard(path)
    write_shard(path, np.arange(100))
    corrupt(path, 4, np.int32(3).tobytes())
    with pytest.raises(DataError, match=r"s\.bin: unsupported version 3"):
        read_shard(path)
    write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 150)
    with pytest.raises(DataError, match=r"s\.bin: truncated: header says 100 tokens, file holds 75"):
        read_shard(path)
    with open(path, "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"truncated: 10 bytes, less than the 1024-byte header"):
        read_shard(path)
    write_shard(path, np.arange(100))
    with open(path, "ab") as f:
        f.write(b"xx")
    with pytest.raises(DataError, match="header says 100 tokens, but the file has 1226 bytes"):
        read_shard(path)
    with pytest.raises(DataError, match=r"missing\.bin: cannot read shard"):
        read_shard(tmp_path / "missing.bin")


# --- text -> shards ------------------------------------------------------------------------

DOCS = ["First document.\n", "Second, with  spaces\nand lines.", "Third: ünïcödé ✓"]


def test_prepare_splits_and_marks_documents(tmp_path):
    text = ENDOFTEXT + ENDOFTEXT.join(DOCS) + ENDOFTEXT  # empty documents at both ends
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    tok = gpt2_tokenizer()
    out = prepare(tmp_path / "corpus.txt", tmp_path / "out", val_fraction=0.25, shard_tokens=8)
    train = sorted(out.glob("corpus_train_*.bin"))
    assert [p.name for p in train[:2]] == ["corpus_train_000000.bin", "corpus_train_000001.bin"]
    sizes = [len(read_shard(p)) for p in train]  # 20 train tokens: equal shards of at most 8
    assert sizes == [6, 7, 7]
    stream = np.concatenate([read_shard(p) for p in [*train, out / "corpus_val_000000.bin"]])
    expected = np.concatenate([[tok.eot_id, *tok.encode(doc)] for doc in DOCS])
    np.testing.assert_array_equal(stream, expected)
    assert len(read_shard(out / "corpus_val_000000.bin")) == round(0.25 * len(expected))
    assert tok.decode(stream) == ENDOFTEXT + ENDOFTEXT.join(DOCS)


def test_prepare_bad_input(tmp_path, monkeypatch):
    out = tmp_path / "o"
    with pytest.raises(DataError, match=r"nope\.txt: input text file not found"):
        prepare(tmp_path / "nope.txt", out)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DataError, match=r"latin1\.txt: not UTF-8 text"):
        prepare(tmp_path / "latin1.txt", out)
    (tmp_path / "t.txt").write_text("a")
    with pytest.raises(DataError, match=r"the shard name 'a/b' must be a plain file name"):
        prepare(tmp_path / "t.txt", out, name="a/b")

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(DataError, match=r"t\.txt: cannot read it \(Permission denied\)"):
        prepare(tmp_path / "t.txt", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "t.txt"]  # nothing written


def test_default_corpus_concurrent_and_cached(tmp_path):
    # Two "ranks" preparing at once must each end with complete, valid shards.
    with ThreadPoolExecutor(2) as pool:
        out, _ = pool.map(default_corpus, [tmp_path, tmp_path])  # re-raises a thread's error
    assert out == tmp_path / "shakespeare_bytes"
    train, val = (read_shard(out / f"shakespeare_{split}_000000.bin") for split in ("train", "val"))
    assert train[0] == 256 and len(val) == round(0.1 * (len(train) + len(val)))  # 256: the bytes' eot
    assert bytes(train[1:15].tolist()) == data.SHAKESPEARE.read_bytes()[:14]  # the text's UTF-8 bytes, as they are
    stamp = (out / "shakespeare_val_000000.bin").stat().st_mtime_ns
    assert default_corpus(tmp_path) == out
    assert (out / "shakespeare_val_000000.bin").stat().st_mtime_ns == stamp  # not prepared again


def test_default_corpus_in_gpt2_tokens(tmp_path):
    out = default_corpus(tmp_path, tokenizer="gpt2")
    assert out == tmp_path / "shakespeare"
    train = read_shard(out / "shakespeare_train_000000.bin")
    assert train[0] == gpt2_tokenizer().eot_id and train.max() < 50257
    assert json.loads((out / MARKER).read_text())["tokenizer"]["name"] == "gpt2"


def test_unigram_entropy(tmp_path):
    # train: ids 0,0,1,2 in two shards -> frequencies 1/2, 1/4, 1/4: entropy 1.5 bits; val: uniform over 4 ids
    write_shard(tmp_path / "u_train_000000.bin", [0, 0])
    write_shard(tmp_path / "u_train_000001.bin", [1, 2])
    write_shard(tmp_path / "u_val_000000.bin", [3, 1, 2, 0])
    assert unigram_entropy(tmp_path) == pytest.approx(1.5 * np.log(2))
    assert unigram_entropy(tmp_path, "val") == pytest.approx(np.log(4))
    assert unigram_entropy(tmp_path, max_tokens=2) == 0.0  # the first shard alone: one id
    assert unigram_entropy(tmp_path, max_tokens=3) == pytest.approx(-(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3))
    write_shard(tmp_path / "empty" / "e_train_000000.bin", [])
    with pytest.raises(DataError, match="the train shards hold no tokens"):
        unigram_entropy(tmp_path / "empty")


def test_cli_prepare(tmp_path, capsys):
    (tmp_path / "in.txt").write_text(ENDOFTEXT.join(DOCS), encoding="utf-8")
    args = ["--input", str(tmp_path / "in.txt"), "--out", str(tmp_path / "o"), "--val-fraction=0.5", "--num-proc=1"]
    main(["prepare", *args])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["in_train_000000.bin", "in_val_000000.bin", MARKER]
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert exit_.value.code == 1 and "missing.txt: input file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["fineweb", "--help"])
    assert exit_.value.code == 0 and "kjj0/fineweb10B-gpt2" in capsys.readouterr().out


# What a newcomer might add to `prepare --input in.txt --out o`, and the one line each gets.
BAD_PREPARE = {
    "--val-fraction 0": "in.txt: val_fraction must be between 0 and 1, exclusive (training needs a train and a val split), got 0.0",
    "--val-fraction 1": "in.txt: val_fraction must be between 0 and 1, exclusive (training needs a train and a val split), got 1.0",
    "--val-fraction nan": "in.txt: val_fraction must be between 0 and 1, exclusive (training needs a train and a val split), got nan",
    "--val-fraction 0.99": "in.txt: 7 tokens make a train split of 0 and a val split of 7 (val_fraction=0.99); each needs at least 2: give more text or another val_fraction",
    "--shard-tokens 0": "in.txt: shard_tokens must be positive, got 0",
    "--name a/b": "in.txt: the shard name 'a/b' must be a plain file name, without '/'",
    "--num-proc 0": "in.txt: num_proc must be positive, got 0",
    "--tokenizer nope": "unknown tokenizer 'nope': use 'gpt2', 'bytes', the path of a tokenizer.json or tiktoken ranks file "
    "(tokenizer.model, tiktoken.model, qwen.tiktoken) or of a directory holding one, or FORMAT:PATH with FORMAT one of "
    "llama3, kimi_k2, qwen",
    "--input missing.txt": "missing.txt: input file not found",
    "--input in.csv": "in.csv: unsupported input; give a .txt, .jsonl, .json or .parquet file or a hub dataset name",
    "--out in.txt": "in.txt: exists and is not a directory; choose another --out",
    "--out .": ".: not empty, and holds files prepare did not write (in.csv, in.txt); choose another --out or empty it",
}  # fmt: skip


@pytest.mark.parametrize("args", BAD_PREPARE)
def test_cli_prepare_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.txt").write_text("a b c d e f")  # 7 tokens, with the leading eot
    (tmp_path / "in.csv").write_text("a,b\n")
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "--input", "in.txt", "--out", "o", "--num-proc", "1", *args.split()])
    err = capsys.readouterr().err  # progress bars, for a run that stops after tokenizing, and the error
    assert exit_.value.code == 1 and err.splitlines()[-1] == f"error: {BAD_PREPARE[args]}" and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "in.txt"]  # nothing written


# --- any corpus -> shards, through datasets ------------------------------------------------

# Empty documents are dropped wherever they are; "x" is a one-token document at the very end.
CORPUS = [*DOCS, "", "A fourth, longer one. " * 20, "x"]
SPLIT = {"val_fraction": 0.2, "shard_tokens": 40}  # several train shards and a val shard


def shard_bytes(out) -> dict:
    """Every file in the folder, so a temporary file left behind shows up too; MARKER's contents
    less the input's name (which differs between the paths compared)."""
    files = {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}
    if MARKER in files:
        files[MARKER] = {k: v for k, v in json.loads(files[MARKER]).items() if k != "source"}
    return files


def decoded(out) -> str:
    paths = sorted(Path(out).glob("*_train_*.bin")) + sorted(Path(out).glob("*_val_*.bin"))
    return gpt2_tokenizer().decode(np.concatenate([read_shard(p) for p in paths]))


@pytest.fixture
def plain(tmp_path):
    """What the direct plain-text path, prepare(), writes for CORPUS: shards named c_*."""
    (tmp_path / "c.txt").write_text(ENDOFTEXT.join(CORPUS), encoding="utf-8")
    shards = shard_bytes(prepare(tmp_path / "c.txt", tmp_path / "plain", **SPLIT))
    assert len(shards) > 3 and decoded(tmp_path / "plain") == ENDOFTEXT + ENDOFTEXT.join(d for d in CORPUS if d)
    return shards


def test_prepare_dataset_text_file_with_two_processes(tmp_path, monkeypatch, plain):
    # 5-byte blocks cut separators and multi-byte characters in two: the reader must join them.
    monkeypatch.setattr(data, "READ_BYTES", 5)
    seen = tmp_path / "pids"
    seen.mkdir()

    def spy(batch, **kwargs):  # notes which process tokenized a batch
        (seen / str(os.getpid())).touch()
        return encode_documents(batch, **kwargs)

    monkeypatch.setattr(data, "encode_documents", spy)
    out = prepare_dataset(tmp_path / "c.txt", tmp_path / "o", **SPLIT, num_proc=2, cache_dir=tmp_path / "cache")
    assert shard_bytes(out) == plain
    workers = {p.name for p in seen.iterdir()}
    assert len(workers) == 2 and str(os.getpid()) not in workers


def test_cli_prepare_jsonl_text_column(tmp_path, plain):
    # The decoy "text" column, datasets' usual name, must not be read; a null document is empty.
    rows = [{"id": i, "text": "decoy", "body": doc} for i, doc in enumerate(CORPUS)]
    rows.insert(2, {"id": -1, "text": "decoy", "body": None})
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out, cache = tmp_path / "o", tmp_path / "cache"
    main([
        "prepare", "--input", str(tmp_path / "c.jsonl"), "--out", str(out), "--text-column", "body",
        "--val-fraction", "0.2", "--shard-tokens", "40", "--num-proc", "1", "--cache-dir", str(cache),
    ])  # fmt: skip
    assert shard_bytes(out) == plain
    assert list(cache.iterdir())  # datasets' Arrow copy went where it was told


def test_prepare_dataset_parquet(tmp_path, plain):
    table = pa.table({"text": CORPUS, "n": list(range(len(CORPUS)))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=2)
    # No cache_dir: a local file's Arrow copy goes to a temporary folder in out, then away.
    out = prepare_dataset(tmp_path / "c.parquet", tmp_path / "o", **SPLIT, num_proc=1)
    assert shard_bytes(out) == plain


def test_prepare_dataset_missing_text_column(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"id": 1, "body": "a b c"}\n{"id": 2, "body": "d e"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl: no text column 'text'; its columns are 'id', 'body'"):
        prepare_dataset(tmp_path / "c.jsonl", tmp_path / "o", num_proc=1)
    with pytest.raises(DataError, match=r"c\.jsonl: column 'id' holds .*int64.*, not text"):
        prepare_dataset(tmp_path / "c.jsonl", tmp_path / "o", text_column="id", num_proc=1)
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no shards and no temporary folder


def test_prepare_dataset_hub_name_offline(tmp_path, monkeypatch, capsys):
    import datasets
    import huggingface_hub

    # Offline mode, as HF_HUB_OFFLINE=1 sets it, so nothing here can reach the network.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["--input", "nobody/no-such-dataset", "--config", "sample", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", *args, "--num-proc", "1", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1, err
    assert err.startswith("error: nobody/no-such-dataset: not a local file, and the Hugging Face hub is unreachable")


def test_prepare_dataset_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_BYTES", 2)
    for raw, where in [(b"caf\xe9", "unexpected end of data at byte 3"), (b"ab\xffcd", "invalid start byte at byte 2")]:
        (tmp_path / "bad.txt").write_bytes(raw)
        for make in (prepare, functools.partial(prepare_dataset, num_proc=1)):  # same message on both paths
            with pytest.raises(DataError, match=rf"bad\.txt: not UTF-8 text \({where}\)"):
                make(tmp_path / "bad.txt", tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: cannot read it as json"):
        prepare_dataset(tmp_path / "bad.jsonl", tmp_path / "o", num_proc=1)
    (tmp_path / "t.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"t\.csv: unsupported input; give a \.txt, \.jsonl"):
        prepare_dataset(tmp_path / "t.csv", tmp_path / "o")
    with pytest.raises(DataError, match=r"nope\.parquet: input file not found"):
        prepare_dataset(tmp_path / "nope.parquet", tmp_path / "o")
    with pytest.raises(DataError, match="num_proc must be positive, got 0"):
        prepare_dataset(tmp_path / "bad.jsonl", tmp_path / "o", num_proc=0)


def test_prepare_dataset_rereads_an_edited_text_file(tmp_path):
    # Both runs share a cache: the second must see the new text, not datasets' cached copy.
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    for text in ["first version of the text", "second, longer version of the same text"]:
        path.write_text(text)
        out = prepare_dataset(path, tmp_path / "o", val_fraction=0.5, num_proc=1, cache_dir=cache)
        assert decoded(out) == ENDOFTEXT + text


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_write_split_writes_shards_as_chunks_arrive(tmp_path, chunk):
    stream = np.arange(100, dtype=np.uint32)  # 75 train tokens in shards of 15, then 25 val tokens

    def chunks():
        for start in range(0, 100, chunk):
            for i in range(min(start, 75) // 15):  # every shard that ends before `start` is on disk
                assert (tmp_path / f"s_train_{i:06d}.bin").exists()
            yield stream[start : start + chunk]

    write_split(chunks(), 100, tmp_path, "s", gpt2_tokenizer(), val_fraction=0.25, shard_tokens=15, source="test")
    names = [f"s_train_{i:06d}.bin" for i in range(5)] + ["s_val_000000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [MARKER, *names]
    np.testing.assert_array_equal(np.concatenate([read_shard(tmp_path / n) for n in names]), stream)
    assert len(read_shard(tmp_path / "s_val_000000.bin")) == 25
    with pytest.raises(DataError, match="test: expected 101 tokens, got 100"):
        write_split(iter([stream]), 101, tmp_path, "s", gpt2_tokenizer(), 0.25, 15, "test")


def test_import_leaves_datasets_unloaded():
    # Every train.py imports shared.data; `datasets` (seconds to import) loads only to prepare.
    code = "import sys, shared.data; assert 'datasets' not in sys.modules, 'datasets was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- fineweb -------------------------------------------------------------------------------


def test_download_fineweb_with_fake_hub(tmp_path):
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        assert (repo_id, repo_type) == ("kjj0/fineweb10B-gpt2", "dataset")
        calls.append(filename)
        write_shard(Path(local_dir) / filename, np.arange(1000) % 50257)
        return str(Path(local_dir) / filename)

    out = download_fineweb(2, tmp_path / "fw", download=fake_download)
    assert calls == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    calls.clear()
    assert download_fineweb(3, out, download=fake_download) == out
    assert calls == ["fineweb_train_000003.bin"]  # the first three were already there
    x, _ = DataLoader(out, "train", batch_size=2, seq_len=8).next_batch()
    assert x.shape == (2, 8)

    def bad_download(repo_id, filename, repo_type, local_dir):
        (Path(local_dir) / filename).write_bytes(b"<html>rate limited</html>")

    with pytest.raises(DataError, match=r"fineweb_train_000004\.bin: truncated"):
        download_fineweb(4, out, download=bad_download)
    with pytest.raises(DataError, match=r"num_shards must be 1\.\.103"):
        download_fineweb(0, out, download=fake_download)


# --- loader --------------------------------------------------------------------------------


def test_loader_batches_walk_shards_and_wrap(tmp_path):
    B, T = 2, 3
    stream = make_shards(tmp_path, [2 * B * T + 1, B * T + 4])
    loader = DataLoader(tmp_path, "train", B, T)
    starts = []
    for _ in range(4):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one
        start = int(x[0, 0])
        assert torch.equal(y.flatten(), torch.from_numpy(stream[start + 1 : start + 1 + B * T]))
        starts.append(start)
    # shard 0 at 0 and 6; shard 1 (global offset 13) at 0; its last 4 tokens skipped; wrap to 0
    assert starts == [0, 6, 13, 0]


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3),
    T=st.integers(1, 5),
    W=st.integers(1, 3),
    steps_per_shard=st.lists(st.integers(1, 3), min_size=1, max_size=3),
)
def test_ranks_equal_micro_batches(B, T, W, steps_per_shard):
    # Shards holding whole global steps: one rank doing W micro-batches per step then reads
    # exactly what W ranks read, across shard ends and the wrap to a new epoch.
    C = B * T
    with tempfile.TemporaryDirectory() as d:
        make_shards(d, [k * W * C + 1 for k in steps_per_shard])
        ranks = [DataLoader(d, "train", B, T, rank=r, world_size=W) for r in range(W)]
        single = DataLoader(d, "train", B, T)
        for _ in range(sum(steps_per_shard) + 2):
            xs = [loader.next_batch()[0] for loader in ranks]
            for x in xs:
                assert torch.equal(single.next_batch()[0], x)
            union = torch.cat([x.flatten() for x in xs])  # disjoint and contiguous, in rank order
            assert torch.equal(union, torch.arange(int(union[0]), int(union[0]) + W * C))


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("uneven")
    make_shards(path, [47, 90, 61])
    return path


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 5), W=st.integers(1, 3), steps=st.integers(1, 60))
def test_ranks_tile_a_wider_batch(uneven_shards, B, T, W, steps):
    # With any shard lengths, W ranks together read what one rank with batch W*B reads.
    ranks = [DataLoader(uneven_shards, "train", B, T, rank=r, world_size=W) for r in range(W)]
    wide = DataLoader(uneven_shards, "train", W * B, T)
    for _ in range(steps):
        union = torch.cat([loader.next_batch()[0].flatten() for loader in ranks])
        assert torch.equal(union, wide.next_batch()[0].flatten())


def test_state_dict_resume(tmp_path):
    make_shards(tmp_path, [40, 25, 33])
    loader = DataLoader(tmp_path, "train", batch_size=2, seq_len=4, rank=1, world_size=2)
    first = loader.next_batch()
    for _ in range(3):  # past the end of shard 0
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    expected = [loader.next_batch() for _ in range(5)]
    resumed = DataLoader(tmp_path, "train", batch_size=2, seq_len=4, rank=1, world_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)
    resumed.reset()
    assert torch.equal(resumed.next_batch()[0], first[0])
    with pytest.raises(DataError, match="does not fit its 3 shards"):
        resumed.load_state_dict({"shard": 3, "pos": 0})
    with pytest.raises(DataError, match=r"loader state \{'shard': 0\} does not fit"):
        resumed.load_state_dict({"shard": 0})


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data directory not found \(looked for shards \*_train_\*"):
        DataLoader(tmp_path / "nowhere", "train", 1, 8)
    make_shards(tmp_path, [20])
    with pytest.raises(DataError, match=r"no shards matching \*_val_\*\.bin; found: t_train_000000\.bin"):
        DataLoader(tmp_path, "val", 1, 8)
    with pytest.raises(DataError, match=r"t_train_000000\.bin: too short: 20 tokens.* = 1\*1\*20\+1 = 21"):
        DataLoader(tmp_path, "train", 1, 20)
    with pytest.raises(DataError, match=r"too short: 20 tokens.* = 2\*1\*10\+1 = 21"):
        DataLoader(tmp_path, "train", 1, 10, rank=1, world_size=2)
    with pytest.raises(DataError, match="rank 2 outside world_size 2"):
        DataLoader(tmp_path, "train", 1, 4, rank=2, world_size=2)
    with pytest.raises(DataError, match=r"t_train_000000\.bin: not a directory; give the directory that holds"):
        DataLoader(tmp_path / "t_train_000000.bin", "train", 1, 4)
    with pytest.raises(DataError, match="vocab_size must be positive, got 0"):
        DataLoader(tmp_path, "train", 1, 4, vocab_size=0)


def test_loader_checks_ids_against_the_vocabulary(tmp_path, monkeypatch):
    make_shards(tmp_path, [40, 30])  # ids 0..39, then 40..69
    checked, check_ids = [], data.check_ids
    monkeypatch.setattr(data, "check_ids", lambda path, *args: checked.append(path.name) or check_ids(path, *args))
    loader = DataLoader(tmp_path, "train", 2, 4, vocab_size=70)
    for _ in range(20):  # 8 tokens a batch: 4 from the first shard, 3 from the second, for 3 epochs
        loader.next_batch()
    assert checked == ["t_train_000000.bin", "t_train_000001.bin"]  # each shard once, when opened
    loader = DataLoader(tmp_path, "train", 2, 4, vocab_size=60)
    for _ in range(4):
        loader.next_batch()
    with pytest.raises(DataError, match=r"t_train_000001\.bin: token id 69 is outside the model's vocabulary of 60 "):
        loader.next_batch()
    write_shard(tmp_path / "t_train_000001.bin", [0, 70_000] * 20)  # uint32 ids
    loader = DataLoader(tmp_path, "train", 2, 4, vocab_size=50_304)
    loader.load_state_dict({"shard": 1, "pos": 0})
    with pytest.raises(
        DataError, match=r"t_train_000001\.bin: token id 70000 is outside .* of 50304 \(were the shards made"
    ):
        loader.next_batch()
