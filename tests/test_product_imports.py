"""Product code never imports tests/: the model list that posttrain/ and bench/ read is shared/models.py,
and a file under a product folder runs wherever the package is installed, test suite or not."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2", "shared", "posttrain", "bench")
TEST_MODULES = {"tests", "registry", "train_helpers", "conftest"}  # tests/ and the helpers it imports top-level


def imported_modules(path):
    """The top-level names of every module the file imports, wherever the import statement stands."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_no_product_file_imports_tests():
    files = [path for folder in PRODUCT for path in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 20, "the product folders were not found"
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module in TEST_MODULES
    ]
    assert not offenders, "\n".join(offenders)
