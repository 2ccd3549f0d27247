"""Shared fixtures: tiny checkpoints built once per session, a deterministic prompt batch, GPU skips."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny_model
from tokenizer_factory import build_test_tokenizer

PROMPT_LENGTHS = [1, 5, 17, 48, 97, 150]

TinyModelFactory = Callable[..., Path]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """``tiny_model_dir(arch, **make_tiny_model_kwargs) -> Path``, each variant built once."""
    built: dict[tuple, Path] = {}

    def get(arch: str, **kwargs: object) -> Path:
        key = (arch, *sorted(kwargs.items()))
        if key not in built:
            name = "-".join([arch, *(f"{k}={v}" for k, v in sorted(kwargs.items()))])
            built[key] = make_tiny_model(arch, tmp_path_factory.mktemp(name), **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def ordinary_token_ids() -> list[int]:
    """Token ids that are valid and not special in every tiny model's vocab."""
    tokenizers = [build_test_tokenizer(kind) for kind in ("bytelevel", "sentencepiece")]
    vocab = min(len(t) for t in tokenizers)
    special = {i for t in tokenizers for i in t.all_special_ids}
    return [i for i in range(vocab) if i not in special]


@pytest.fixture(scope="session")
def prompts(ordinary_token_ids: list[int]) -> list[list[int]]:
    """Six prompts of 1 to 150 random ordinary tokens, valid for every tiny model."""
    rng = random.Random(1234)
    return [rng.choices(ordinary_token_ids, k=n) for n in PROMPT_LENGTHS]


@pytest.fixture
def fake_graph_capture(monkeypatch: pytest.MonkeyPatch) -> list:
    """CUDA graph capture faked, for CPU tests of a capture's bookkeeping: graphs report the
    pool "pool", synchronize does nothing, and each ``torch.cuda.graph`` context appends the
    pool it was given to the returned list."""
    pools: list = []

    class FakeGraph:
        def pool(self):
            return "pool"

    @contextlib.contextmanager
    def fake_graph(graph, pool=None):
        pools.append(pool)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return pools
