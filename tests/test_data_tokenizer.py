"""Shards remember their tokenizer (prepare.json), and train.py refuses data a checkpoint's tokenizer
did not make, or whose ids the model cannot embed; a larger (padded) vocabulary is only logged."""

import json

import pytest

from registry import by_name
from shared.data import MARKER, DataError, check_tokenizer, prepare
from shared.tokenizer import GPT2_RANKS, from_tiktoken, gpt2_tokenizer
from train_helpers import run_in_process, train_args

TEXT = (GPT2_RANKS.parent / "shakespeare.txt").read_text(encoding="utf-8")[:6000]


def small_tokenizer(tmp_path, name, fmt="llama3"):
    """GPT-2's first 600 ranks as a publisher's ranks file in its own directory: 600 + 256 ids."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "tokenizer.model").write_text("\n".join(GPT2_RANKS.read_text().splitlines()[:600]) + "\n")
    return folder, from_tiktoken(folder / "tokenizer.model", fmt)


def prepared(tmp_path, name, tokenizer):
    (tmp_path / "in.txt").write_text(TEXT, encoding="utf-8")
    return prepare(tmp_path / "in.txt", tmp_path / name, tokenizer, shard_tokens=10**6)


def test_prepare_records_the_tokenizer(tmp_path):
    about = json.loads((prepared(tmp_path, "d", gpt2_tokenizer()) / MARKER).read_text())
    assert about["tokenizer"] == gpt2_tokenizer().identity and about["tokenizer"]["name"] == "gpt2"


def test_check_tokenizer(tmp_path):
    data = prepared(tmp_path, "d", gpt2_tokenizer())
    assert "50,257 ids; the model's 50,304 leave 47 unused" in check_tokenizer(data, 50304)
    with pytest.raises(DataError, match="tokenized by gpt2 with 50257 ids, more than the model's vocabulary of 50000"):
        check_tokenizer(data, 50000)
    folder, _ = small_tokenizer(tmp_path, "ckpt")
    with pytest.raises(DataError, match=rf"tokenized by gpt2, not by the tokenizer {folder} ships \(llama3:"):
        check_tokenizer(data, 128256, folder)
    assert check_tokenizer(data, 50257, tmp_path / "no_tokenizer_here") == f"{data}: tokenized by gpt2"
    (data / MARKER).unlink()  # e.g. downloaded shards
    assert "no prepare.json, so the tokenizer of its shards is unknown" in check_tokenizer(data, 50257, folder)


def test_train_refuses_data_of_another_tokenizer(tmp_path, capsys):
    spec = by_name("llama31")
    folder, tok = small_tokenizer(tmp_path, "ckpt")
    spec.build(vocab_size=tok.vocab_size).save_pretrained(folder)  # a checkpoint shipping its tokenizer.model
    _, other = small_tokenizer(tmp_path, "other", fmt="qwen")  # same ranks, Qwen's digits and specials
    args = [a for a in train_args(spec, prepared(tmp_path, "d", other), tmp_path / "run") if not a.startswith("--set=")]
    with pytest.raises(SystemExit, match=rf"not by the tokenizer {folder} ships .*: prepare it with --tokenizer"):
        run_in_process(spec, *args, "--init-from", folder)
    args = train_args(spec, prepared(tmp_path, "d", tok), tmp_path / "run", "--max-steps", 1)
    run_in_process(spec, *[a for a in args if not a.startswith("--set=")], "--init-from", folder)
    assert f"tokenized by llama3:{folder}" in capsys.readouterr().out
    # from scratch, a vocabulary smaller than the data's tokenizer: refused before any shard is read
    with pytest.raises(SystemExit, match="856 ids, more than the model's vocabulary of 97"):
        run_in_process(spec, *train_args(spec, tmp_path / "d", tmp_path / "scratch"))
