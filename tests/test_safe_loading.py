"""Safe loading: nothing the project runs (model/, service/, bench/) unpickles, evaluates or executes
what it reads. Checkpoints are safetensors and JSON, backbones safetensors (model/backbone.py);
torch.load, where it cannot be avoided, must say weights_only=True. The scan reads the syntax tree,
so `model.eval()` or a word in a string does not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("model", "service", "bench")
# Modules whose loading runs code: pickle and the formats built on it.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def dotted(node: ast.AST) -> str:
    """`torch.load` for the call target torch.load, '' for anything not a plain dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def is_true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_uses(source: str) -> list[str]:
    """What in `source` could run code read from disk or the network, one line per finding."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"line {node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if name in UNSAFE_BUILTINS or (name.startswith("builtins.") and name.split(".")[1] in UNSAFE_BUILTINS):
                found.append(f"line {node.lineno}: {name}()")
            elif name.endswith("torch.load") and not is_true(keywords.get("weights_only")):
                found.append(f"line {node.lineno}: {name}() without weights_only=True")
            elif name.endswith(("np.load", "numpy.load")) and is_true(keywords.get("allow_pickle")):
                found.append(f"line {node.lineno}: {name}(allow_pickle=True)")
            elif is_true(keywords.get("trust_remote_code")):
                found.append(f"line {node.lineno}: {name}(trust_remote_code=True)")
            elif name.endswith("yaml.load") and dotted(keywords.get("Loader", ast.Constant(None))) != "yaml.SafeLoader":
                found.append(f"line {node.lineno}: {name}() without yaml.SafeLoader")
    return found


def test_the_project_never_unpickles_or_evaluates_what_it_reads():
    files = [path for directory in SCANNED for path in sorted((REPO / directory).rglob("*.py"))]
    assert len(files) > 20
    findings = [f"{path.relative_to(REPO)} {finding}" for path in files for finding in unsafe_uses(path.read_text())]
    assert not findings, "\n".join(findings)


@pytest.mark.parametrize("source", [
    "import pickle",
    "import pickle as p",
    "from joblib import load",
    "x = torch.load(path)",
    "x = torch.load(path, weights_only=False)",
    "eval(text)",
    "exec(code)",
    "builtins.eval(text)",
    "np.load(path, allow_pickle=True)",
    "AutoModel.from_pretrained(name, trust_remote_code=True)",
    "yaml.load(text)",
])
def test_the_scan_finds_unsafe_code(source):
    assert unsafe_uses(source)


@pytest.mark.parametrize("source", [
    "x = torch.load(path, weights_only=True)",
    "model.eval()",
    "proc = await asyncio.create_subprocess_exec('ls')",
    "print('do not eval( this')",
    "np.load(path)",
    "yaml.load(text, Loader=yaml.SafeLoader)",
])
def test_the_scan_leaves_safe_code_alone(source):
    assert not unsafe_uses(source)
