"""minllm/__init__.py of the installed wheel (pyproject.toml force-includes this file there).

The wheel keeps every package under one namespace, minllm/, so it adds no generic top-level name
(`shared`) to site-packages. Inside a package, model.py and hf.py import relatively and work as
they are; the scripts (train.py, posttrain/) import absolutely, `from shared.data import ...`, as
they do from the checkout. The finder below resolves those seven names to minllm's packages, for
imports made by minllm's own code only, so that `python -m minllm.gpt2.train` works and a user's
own module called `shared` is neither shadowed nor replaced. The checkout does not use this file.
"""

import importlib
import importlib.abc
import importlib.util
import sys

PACKAGES = ("gpt2", "llama31", "qwen3", "deepseek3", "kimi_k2", "shared", "posttrain")


def _importer_name():
    """__name__ of the module whose code asked for the import (a script run with -m: its real
    name), skipping the import system's own frames and importlib.import_module."""
    frame = sys._getframe(2)
    while frame and (
        frame.f_code.co_filename.startswith("<frozen importlib")
        or frame.f_globals.get("__name__", "").startswith("importlib")
    ):
        frame = frame.f_back
    if frame is None:
        return ""
    name = frame.f_globals.get("__name__", "")
    spec = frame.f_globals.get("__spec__")
    return spec.name if name == "__main__" and spec else name


class _AliasFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`gpt2.hf` -> the module object of `minllm.gpt2.hf` (one object under both names, so classes
    and module state are never duplicated)."""

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top not in PACKAGES:
            return None
        ours = sys.modules.get(f"{__name__}.{top}")
        if top in sys.modules and sys.modules[top] is not ours:
            return None  # a module of this name that is not ours came first: leave it alone
        if top not in sys.modules and not _importer_name().startswith(__name__ + "."):
            return None  # someone else's import of e.g. `shared`: not ours to answer
        if importlib.util.find_spec(f"{__name__}.{fullname}") is None:
            return None  # no such module in minllm either: the usual ModuleNotFoundError follows
        return importlib.util.spec_from_loader(fullname, self)

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds under the name once this returns.
        sys.modules[module.__name__] = importlib.import_module(f"{__name__}.{module.__name__}")


if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
    # first, so that `gpt2.hf` is not found a second time, as a new module, through minllm.gpt2's path
    sys.meta_path.insert(0, _AliasFinder())
