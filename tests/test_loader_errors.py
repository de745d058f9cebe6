"""The public loaders refuse what they cannot read in one line that names the path: a path that does not
exist, a Hugging Face hub name not yet downloaded (with how to download it), a directory without
config.json, another architecture's checkpoint (with the loader that reads it), a config.json without a
field the loader needs. Each model's Transformer.from_pretrained, posttrain's --init-from and
shared.tokenizer.load_tokenizer (issue #21 part 6)."""

import json

import pytest

from posttrain import common, sft
from registry import MODELS, by_name
from shared.tokenizer import load_tokenizer

FIVE = [by_name(name) for name in ("gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2")]
assert {spec.package for spec in FIVE} == {spec.package for spec in MODELS}
loaders = pytest.mark.parametrize("spec", FIVE, ids=lambda s: s.name)


def refusal(load, path):
    """The message load(path) raises; it must be one line that names the path."""
    with pytest.raises(ValueError) as caught:
        load(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


@loaders
def test_a_missing_directory(spec, tmp_path):
    message = refusal(spec.model.Transformer.from_pretrained, tmp_path / "nowhere")
    assert message == f"{tmp_path / 'nowhere'}: no such directory"


@loaders
@pytest.mark.parametrize("name", ["openai-community/gpt2", "gpt2-medium"])
def test_a_hub_name_says_to_download_it_first(spec, name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run from the repository, "gpt2" would be the package's folder
    message = refusal(spec.model.Transformer.from_pretrained, name)
    assert message.startswith(f"{name}: not a local directory; a Hugging Face hub name must be downloaded first")
    assert f"`hf download {name} --local-dir checkpoints/" in message


def test_a_hub_name_that_is_also_a_local_folder_gets_the_hint_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    message = refusal(by_name("gpt2").model.Transformer.from_pretrained, "gpt2")
    assert message.startswith("gpt2: no config.json there") and "`hf download gpt2 --local-dir" in message


@loaders
def test_a_directory_without_config_json(spec, tmp_path):
    message = refusal(spec.model.Transformer.from_pretrained, tmp_path)
    assert message.startswith(f"{tmp_path}: no config.json there (a checkpoint directory holds config.json")
    assert ("Meta's params.json" in message) == (spec.package == "llama31")  # llama31 also reads Meta's layout


@loaders
def test_a_file_is_not_a_checkpoint_directory(spec, tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert "a file, not a checkpoint directory" in refusal(spec.model.Transformer.from_pretrained, tmp_path / "ckpt.pt")


@loaders
def test_another_architectures_checkpoint_names_its_loader(spec, tmp_path):
    other = by_name("llama31" if spec.package == "gpt2" else "gpt2")
    other.build().save_pretrained(tmp_path)
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    message = refusal(spec.model.Transformer.from_pretrained, tmp_path)
    assert message == (
        f"{tmp_path} holds a {model_type!r} checkpoint; this is {spec.package}'s loader: "
        f"use {other.package}.model.Transformer.from_pretrained"
    )


@pytest.mark.parametrize(("saver", "loader"), [("deepseek3", "kimi_k2"), ("kimi_k2", "deepseek3")])
def test_deepseek3_and_kimi_k2_read_each_others_checkpoints(saver, loader, tmp_path):
    """K2 is DeepSeek-V3's architecture: the check lets either loader read either model_type."""
    by_name(saver).build().save_pretrained(tmp_path)
    assert by_name(loader).model.Transformer.from_pretrained(tmp_path).cfg.n_layer == by_name(saver).small["n_layer"]


@loaders
def test_a_config_json_without_a_needed_field(spec, tmp_path):
    spec.build().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["vocab_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = refusal(spec.model.Transformer.from_pretrained, tmp_path)
    assert message == f"{tmp_path / 'config.json'}: no 'vocab_size' field, which this loader needs"


@loaders
def test_a_config_json_that_is_not_json(spec, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json: not a JSON object (" in refusal(spec.model.Transformer.from_pretrained, tmp_path)


# posttrain's --init-from and the tokenizer say the same, prefixed by the flag


def policy_refusal(*argv):
    with pytest.raises(SystemExit) as caught:
        common.read_policy(sft.parse_args([str(a) for a in argv]), tokenizer=None, log=print)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_posttrain_names_the_other_architecture_and_the_flag(tmp_path):
    by_name("llama31").build().save_pretrained(tmp_path)
    message = policy_refusal("--model", "gpt2", "--init-from", tmp_path)
    assert message.startswith(f"--init-from {tmp_path} holds a 'llama' checkpoint; this is gpt2's loader")
    assert message.endswith("posttrain picks the loader with --model")


def test_posttrain_says_to_download_a_hub_name_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = policy_refusal("--model", "llama31", "--init-from", "meta-llama/Llama-3.2-1B")
    assert message.startswith("--init-from meta-llama/Llama-3.2-1B: not a local directory; a Hugging Face hub name")
    assert "`hf download meta-llama/Llama-3.2-1B --local-dir checkpoints/Llama-3.2-1B`" in message


def test_the_tokenizer_says_to_download_a_hub_name_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refusal(load_tokenizer, "Qwen/Qwen3-0.6B")
    assert "not a local path; a Hugging Face hub name must be downloaded first" in message
    assert "`hf download Qwen/Qwen3-0.6B --local-dir checkpoints/Qwen3-0.6B`" in message
