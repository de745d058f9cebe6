"""The post-training files keep their layout: each method file (posttrain/{sft,dpo,grpo,ppo}.py) holds its
loss, its arguments and its loop, and what they share is written once, in posttrain/cli.py (the command
line), posttrain/common.py (plumbing) or posttrain/tasks.py (tasks and data). So no top-level name is defined in two method files, nor in a
method file and a shared module (a second copy would drift), and each method file stays within the
length that keeps it readable top to bottom. yarn.py is another kind of file and is left out."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the longest each method file may grow: its loss, arguments and loop, the rest imported
LINE_TARGETS = {"sft": 150, "dpo": 330, "grpo": 350, "ppo": 450}
SHARED = ("cli", "common", "tasks")
EVERY_METHOD_DEFINES = {"parse_args", "train", "main"}  # the skeleton: each method's own


def top_level_names(path):
    """The names a module's top level defines: functions, classes and assigned names."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def posttrain(name):
    return ROOT / "posttrain" / f"{name}.py"


def test_each_method_defines_the_skeleton():
    for method in LINE_TARGETS:
        missing = EVERY_METHOD_DEFINES - top_level_names(posttrain(method))
        assert not missing, f"posttrain/{method}.py lacks {', '.join(sorted(missing))}"


def test_shared_code_is_written_once():
    owners = {}
    for module in (*LINE_TARGETS, *SHARED):
        names = top_level_names(posttrain(module))
        if module in LINE_TARGETS:
            names -= EVERY_METHOD_DEFINES
        for name in names:
            owners.setdefault(name, []).append(module)
    twice = {name: where for name, where in owners.items() if len(where) > 1}
    assert not twice, (
        "defined in more than one posttrain file (move it to cli.py, common.py or tasks.py): "
        + "; ".join(f"{name} in {', '.join(where)}" for name, where in sorted(twice.items()))
    )


def test_method_files_stay_within_their_length():
    over = [
        f"posttrain/{method}.py: {n} lines, target {target}"
        for method, target in LINE_TARGETS.items()
        if (n := len(posttrain(method).read_text().splitlines())) > target
    ]
    assert not over, "\n".join(over)


def definitions(path):
    """{name: source text} of the module's top-level functions."""
    source = path.read_text()
    return {
        node.name: ast.get_source_segment(source, node)
        for node in ast.parse(source).body
        if isinstance(node, ast.FunctionDef)
    }


def test_distributed_set_up_is_train_pys():
    """setup_distributed is train.py's own (or its sibling's, where train.py's machinery moved), so
    torchrun means the same thing in both."""
    ours = definitions(posttrain("common"))["setup_distributed"]
    theirs = [definitions(path).get("setup_distributed") for path in sorted((ROOT / "llama31").glob("*.py"))]
    assert ours in theirs, "posttrain/common.py's setup_distributed differs from llama31's"
