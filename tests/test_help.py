"""train.py --help: the docstring's example commands come out as written (not reflowed to the
terminal's width), and no option states its default twice."""

import importlib
import re

import pytest

PACKAGES = ["gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2"]


def help_text(package, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")  # narrower than the examples: a reflowing formatter would wrap them
    train = importlib.import_module(f"{package}.train")
    with pytest.raises(SystemExit) as done:
        train.parse_args(["--help"])
    assert done.value.code == 0
    return train.__doc__, capsys.readouterr().out


@pytest.mark.parametrize("package", PACKAGES)
def test_help_prints_the_examples_as_written(package, monkeypatch, capsys):
    doc, out = help_text(package, monkeypatch, capsys)
    examples = [line for line in doc.splitlines() if line.lstrip().startswith(("python ", "torchrun "))]
    assert len(examples) >= 3, doc
    lines = out.splitlines()
    missing = [line for line in examples if line not in lines]
    assert not missing, f"reflowed or dropped in --help: {missing}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_option_states_its_default_twice(package, monkeypatch, capsys):
    _, out = help_text(package, monkeypatch, capsys)
    options = re.split(r"\n(?=  -)", out.split("options:", 1)[1])  # one entry per option, its wrapped lines with it
    twice = [" ".join(entry.split()) for entry in options if entry.lower().count("default") > 1]
    assert not twice, f"options whose help says default twice: {twice}"
