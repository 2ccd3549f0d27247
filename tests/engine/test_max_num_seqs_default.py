"""max_num_seqs left unset follows the GPU, as vLLM 0.26's default: 1,024 sequences on a GPU of
70 GiB or more (an A100 excepted), 256 elsewhere; a value given is kept."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from parallm.commands.engine_args import add_engine_args
from parallm.config import EngineConfig, default_max_num_seqs

GIB = 1 << 30


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device whose properties the test sets."""
    props = SimpleNamespace(name="", total_memory=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    def make(name: str, gib: float) -> torch.device:
        props.name, props.total_memory = name, int(gib * GIB)
        return torch.device("cuda", 0)

    return make


@pytest.mark.parametrize(
    ("name", "gib", "want"),
    [
        ("NVIDIA H200", 139.8, 1024),
        ("NVIDIA H100 80GB HBM3", 79.1, 1024),
        ("NVIDIA A100-SXM4-80GB", 79.2, 256),
        ("NVIDIA L40S", 44.4, 256),
        ("a 70 GiB card", 70, 1024),
        ("a card just under 70 GiB", 69.99, 256),
    ],
)
def test_an_unset_max_num_seqs_follows_the_gpu(gpu, name, gib, want):
    device = gpu(name, gib)
    assert default_max_num_seqs(device) == want
    assert EngineConfig().scheduler_config(4096, device).max_num_seqs == want
    assert EngineConfig(max_num_seqs=48).scheduler_config(4096, device).max_num_seqs == 48


def test_off_the_gpu_or_with_no_device_it_is_256():
    assert default_max_num_seqs(None) == 256
    assert default_max_num_seqs(torch.device("cpu")) == 256
    assert EngineConfig().scheduler_config(4096).max_num_seqs == 256


def test_a_bad_value_is_still_refused_by_name(gpu):
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        EngineConfig(max_num_seqs=0).scheduler_config(4096, gpu("NVIDIA H200", 139.8))


def test_the_flag_defaults_to_unset_and_its_help_says_what_that_means():
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert parser.parse_args([]).max_num_seqs is None
    assert parser.parse_args(["--max-num-seqs", "64"]).max_num_seqs == 64
    (action,) = [a for a in parser._actions if a.dest == "max_num_seqs"]
    assert "1024 on a GPU of 70 GiB or more" in action.help and "256 elsewhere" in action.help
