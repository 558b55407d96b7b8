"""No unsafe deserialization in what we ship: an AST scan of the project's sources.

Flags, with file:line: imports of the pickle family (pickle, cPickle, _pickle, cloudpickle, dill,
marshal, shelve, jsonpickle), `torch.load`, `numpy.load(..., allow_pickle=<not False>)` (and any
`allow_pickle=True`), `recv_pyobj`, calls of the builtins `eval` / `exec`, and `yaml.load` /
`yaml.load_all` without a safe loader (plus `yaml.unsafe_load` / `full_load`). Import aliases are
followed (`import torch as t; t.load(...)`, `from numpy import load as l`). Methods that merely
share a name (`model.eval()`, `create_subprocess_exec`) are not flagged.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]
SCANNED = ("epdserve", "services", "mmcache", "tuner", "bench", "scripts")

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve", "jsonpickle"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
YAML_UNSAFE = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("t" -> "torch", "l" -> "numpy.load")
        self.found: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] in UNSAFE_MODULES:
                self.found.append((node.lineno, f"import {alias.name}"))
            top = alias.name.split(".")[0]
            self.aliases[alias.asname or top] = alias.name if alias.asname else top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in UNSAFE_MODULES:
            self.found.append((node.lineno, f"from {module} import ..."))
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{module}.{alias.name}"

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        keywords = {k.arg: k.value for k in node.keywords if k.arg}
        if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
            self.found.append((node.lineno, f"{name}()"))
        elif name == "torch.load":
            self.found.append((node.lineno, "torch.load()"))
        elif name == "numpy.load" and not _is_false(keywords.get("allow_pickle")) and "allow_pickle" in keywords:
            self.found.append((node.lineno, "numpy.load(allow_pickle=...)"))
        elif name.endswith("recv_pyobj"):
            self.found.append((node.lineno, "recv_pyobj()"))
        elif name in ("yaml.load", "yaml.load_all") and not _safe_loader(node, keywords, self._dotted):
            self.found.append((node.lineno, f"{name}() without a safe Loader"))
        elif name.startswith("yaml.") and name.split(".", 1)[1] in YAML_UNSAFE:
            self.found.append((node.lineno, f"{name}()"))
        if "allow_pickle" in keywords and not _is_false(keywords["allow_pickle"]) and name != "numpy.load":
            self.found.append((node.lineno, "allow_pickle=True"))
        self.generic_visit(node)

    def _dotted(self, node: ast.AST) -> str:
        """The call target as a dotted name with import aliases resolved ("np.load" -> "numpy.load")."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return f"{base}.{node.attr}" if base else f".{node.attr}"
        return ""


def _is_false(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value in (False, None, 0)


def _safe_loader(node: ast.Call, keywords: dict, dotted) -> bool:
    loader = keywords.get("Loader", node.args[1] if len(node.args) > 1 else None)
    return loader is not None and dotted(loader).rpartition(".")[2] in SAFE_YAML_LOADERS


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner.found


def test_no_unsafe_deserialization_in_the_sources():
    offenders = []
    for package in SCANNED:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, what in unsafe_uses(path.read_text()):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert offenders == [], "unsafe deserialization:\n" + "\n".join(offenders)
    assert sum(1 for p in SCANNED for _ in (ROOT / p).rglob("*.py")) > 100  # the scan did see the tree


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cPickle",
    "import dill as d",
    "import marshal",
    "import cloudpickle",
    "from pickle import loads",
    "from _pickle import loads",
    "import os.path, pickle",
    "import torch\ntorch.load('w.pt')",
    "import torch as t\nt.load('w.pt', weights_only=True)",
    "from torch import load\nload('w.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "from numpy import load as npload\nnpload('x.npy', allow_pickle=flag)",
    "sock.recv_pyobj()",
    "eval('1 + 1')",
    "exec(code)",
    "import builtins\nbuiltins.eval(code)",
    "import yaml\nyaml.load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)",
    "import yaml\nyaml.load(text, yaml.UnsafeLoader)",
    "import yaml\nyaml.load_all(text)",
    "import yaml\nyaml.unsafe_load(text)",
    "import yaml\nyaml.full_load(text)",
    "def f():\n    x = 1\n    return eval('x')",
])
def test_the_scanner_catches_each_pattern(source):
    found = unsafe_uses(source)
    assert len(found) == 1, found
    assert found[0][0] == source.count("\n") + 1  # the line of the offending statement


@pytest.mark.parametrize("source", [
    "import json\njson.loads('{}')",
    "model.eval()",
    "import asyncio\nasyncio.create_subprocess_exec('ls')",
    "import numpy as np\nnp.load('x.npy')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=False)",
    "import yaml\nyaml.safe_load(text)",
    "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)",
    "from yaml import CSafeLoader\nimport yaml\nyaml.load(text, CSafeLoader)",
    "from safetensors.torch import load_file\nload_file('w.safetensors')",
    "def load(path):\n    return path\nload('x')",
])
def test_the_scanner_leaves_safe_code_alone(source):
    assert unsafe_uses(source) == []
