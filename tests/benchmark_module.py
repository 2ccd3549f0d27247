"""Load a script of benchmarks/ as a module (benchmarks/ is not a package), its folder on the
path first, since scripts import their neighbours."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/NAME.py`` (NAME may hold a folder: ``peers/run_vllm``), registered in
    ``sys.modules`` under its file's stem (dataclasses look their module up while being made),
    loaded afresh each call."""
    for folder in (BENCHMARKS, (BENCHMARKS / name).parent):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    stem = Path(name).name
    spec = importlib.util.spec_from_file_location(stem, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    spec.loader.exec_module(module)
    return module
