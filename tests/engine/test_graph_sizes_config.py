"""--cudagraph-capture-sizes (vLLM's flag): the decode graphs' batch sizes, checked where
they enter and kept sorted, each once."""

from __future__ import annotations

import pytest

from parallm.cli import build_parser
from parallm.commands.engine_args import engine_kwargs
from parallm.config import EngineConfig


def test_sizes_are_sorted_once_each() -> None:
    assert EngineConfig(cuda_graph_sizes=[8, 1, 4, 8]).cuda_graph_sizes == (1, 4, 8)
    assert EngineConfig().cuda_graph_sizes[:4] == (1, 2, 4, 8)


@pytest.mark.parametrize("sizes", [[], [0, 8], [2, -1], ["8"], [True], "1,2", 8, [1.5]])
def test_bad_sizes_name_the_field(sizes: object) -> None:
    with pytest.raises(ValueError, match="cuda_graph_sizes must be a"):
        EngineConfig(cuda_graph_sizes=sizes)


def test_the_flag_reaches_the_engine_config_and_unset_keeps_the_default() -> None:
    args = build_parser().parse_args(["serve", "x", "--cudagraph-capture-sizes", "16", "1", "8"])
    assert engine_kwargs(args)["cuda_graph_sizes"] == (16, 1, 8)
    assert EngineConfig(**{**engine_kwargs(args), "model": None}).cuda_graph_sizes == (1, 8, 16)
    assert "cuda_graph_sizes" not in engine_kwargs(build_parser().parse_args(["serve", "x"]))
    with pytest.raises(ValueError, match="cuda_graph_sizes must be a non-empty list"):
        engine_kwargs(build_parser().parse_args(["serve", "x", "--cudagraph-capture-sizes", "0"]))
