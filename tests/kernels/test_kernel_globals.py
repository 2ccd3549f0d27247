"""Compiled Triton (unlike its CPU interpreter) refuses a kernel that reads a module-level
number that is not a ``tl.constexpr(...)`` instance ("Cannot access global variable ...");
this finds such reads in every kernel module without a GPU."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

triton = pytest.importorskip("triton")

import parallm.kernels as kernels  # noqa: E402

MODULES = [m.name for m in pkgutil.iter_modules(kernels.__path__)]


def _jit_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    def is_jit(dec: ast.expr) -> bool:
        target = dec.func if isinstance(dec, ast.Call) else dec
        return isinstance(target, ast.Attribute) and target.attr == "jit"

    return [
        f
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and any(map(is_jit, f.decorator_list))
    ]


@pytest.mark.parametrize("name", MODULES)
def test_kernels_read_only_constexpr_globals(name):
    module = importlib.import_module(f"parallm.kernels.{name}")
    tree = ast.parse(inspect.getsource(module))
    bad = []
    for fn in _jit_functions(tree):
        local = {a.arg for a in fn.args.args}
        for node in ast.walk(fn):
            if (
                isinstance(node, ast.Name)
                and isinstance(node.ctx, ast.Load)
                and node.id not in local
            ):
                value = getattr(module, node.id, None)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    bad.append(f"{fn.name}: {node.id}")
    assert not bad, f"kernels read plain numbers (write NAME = tl.constexpr(value)): {bad}"
