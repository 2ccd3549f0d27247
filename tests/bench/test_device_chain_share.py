"""benchmarks/device_chain_share.py on CPU: the bundled model's device-drafter steps counted over
held-out stdlib code; after the first steps of each request nearly every step is staged on the
device (full chains run to the request's end, 08c7459)."""

from __future__ import annotations

import pytest
from benchmark_module import load_benchmark

from parallm.bundled import BUNDLED_MODEL_DIR


@pytest.mark.skipif(not (BUNDLED_MODEL_DIR / "config.json").exists(), reason="no bundled model")
def test_rows_count_the_steps_staged_on_the_device():
    bench = load_benchmark("device_chain_share")
    rows = bench.main(["--k", "4", "--batch-sizes", "1,2", "--num-prompts", "2",
                       "--max-tokens", "32", "--prompt-len", "128"])  # fmt: skip
    assert [(r["k"], r["batch"]) for r in rows] == [(4, 1), (4, 2)]
    for r in rows:
        assert 1 <= r["tokens_per_engine_step"] <= r["batch"] * 5
        assert r["identical"] == r["outputs"] == 2  # float32: plain decoding's tokens
    # Batch 1: two requests, each with a prefill and the step that uploads its tokens from the
    # host; every other step is staged on the device.
    one = rows[0]
    assert one["overlapped_share"] >= 1 - 5 / one["steps"], one


def test_flags():
    args = load_benchmark("device_chain_share").build_parser().parse_args([])
    assert args.k == [8, 16] and args.batch_sizes == [1, 8] and args.corpus == "stdlib"
