"""The post-training files share their skeleton: a function, class or constant defined under the same name
in several of posttrain/{sft,dpo,ppo,grpo}.py must be the same text in each, so `diff posttrain/grpo.py
posttrain/ppo.py` shows only the algorithmic difference. yarn.py is another kind of file and is left out.

Exempt, because they are where the methods differ (ALLOWED):
  parse_args  each method's defaults and its own flags
  train       the update loop: what a step samples, which loss it calls, what it logs
  main        may catch a method's own errors
The loss functions at the top of each file have names of their own (sft_loss, dpo_loss, grpo_loss, ...), so
they never meet here. Everything else, from the argument parser shared by all to the checkpoint writer,
is copied byte for byte; a deliberate difference gets a new name, not an exemption."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sft", "dpo", "ppo", "grpo")
ALLOWED = {"parse_args", "train", "main"}


def definitions(path):
    """{name: source text} of the module's top-level functions, classes and assigned names."""
    source = path.read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        else:
            continue
        text = ast.get_source_segment(source, node, padded=True)
        if getattr(node, "decorator_list", None):  # the decorators are part of the definition
            text = "\n".join(ast.get_source_segment(source, d) for d in node.decorator_list) + "\n" + text
        found.update(dict.fromkeys(names, text))
    return found


def present():
    return {
        m: definitions(ROOT / "posttrain" / f"{m}.py") for m in METHODS if (ROOT / "posttrain" / f"{m}.py").exists()
    }


def test_shared_definitions_are_identical():
    files = present()
    assert "sft" in files, "posttrain/sft.py is the skeleton the others copy"
    drifted = []
    names = {name for defs in files.values() for name in defs} - ALLOWED
    for name in sorted(names):
        holders = [m for m, defs in files.items() if name in defs]
        first = files[holders[0]][name]
        drifted += [
            f"{name}: posttrain/{m}.py differs from posttrain/{holders[0]}.py"
            for m in holders[1:]
            if files[m][name] != first
        ]
    assert not drifted, "\n".join(drifted)


def test_distributed_set_up_is_train_pys():
    """setup_distributed is train.py's own, so torchrun means the same thing in both."""
    ours = definitions(ROOT / "posttrain" / "sft.py")["setup_distributed"]
    assert ours == definitions(ROOT / "llama31" / "train.py")["setup_distributed"]
