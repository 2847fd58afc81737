"""skresflow.core is pure torch: no sklearn, no joblib, no estimator layer."""

import ast
from pathlib import Path

import pytest

import skresflow.core

CORE_DIR = Path(skresflow.core.__file__).parent
FORBIDDEN_ROOTS = {"sklearn", "joblib"}


def forbidden_imports(source):
    """Imports in ``source`` (a module inside skresflow/core) that leave the layer."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                continue  # a sibling inside core
            if node.level > 1:
                found.append("." * node.level + (node.module or ""))
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            root = name.split(".")[0]
            outside_core = root == "skresflow" and not (
                name == "skresflow.core" or name.startswith("skresflow.core."))
            if root in FORBIDDEN_ROOTS or outside_core:
                found.append(name)
    return found


CORE_MODULES = sorted(CORE_DIR.rglob("*.py"))


def test_core_has_modules():
    names = {path.name for path in CORE_MODULES}
    assert {"lipschitz.py", "logdet.py", "inverse.py", "flow.py"} <= names


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: p.name)
def test_core_module_imports_stay_in_the_layer(path):
    assert forbidden_imports(path.read_text()) == []


@pytest.mark.parametrize("source, expected", [
    ("import sklearn", ["sklearn"]),
    ("from sklearn.base import BaseEstimator", ["sklearn.base"]),
    ("import joblib as jl", ["joblib"]),
    ("from skresflow import _density", ["skresflow"]),
    ("import skresflow._density", ["skresflow._density"]),
    ("from .. import _density", [".."]),
    ("from ..cli import main", ["..cli"]),
    ("def f():\n    import sklearn.utils", ["sklearn.utils"]),
    ("from . import logdet\nfrom .blocks import mlp_branch", []),
    ("import torch\nfrom skresflow.core import logdet", []),
])
def test_checker_catches_imports_leaving_the_layer(source, expected):
    assert forbidden_imports(source) == expected
