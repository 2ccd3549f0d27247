"""benchmarks/quant_quality.py on CPU with a tiny random model and a handful of tokens: the
held-out windows are the trainer's, the loss is the model's own cross-entropy, the baseline
compared with itself changes nothing, and a broken model is flagged as failing."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_module import load_benchmark
from safetensors.torch import load_file, save_file

ENGINE = {
    "dtype": "float32", "device": "cpu", "seed": 0, "max_num_batched_tokens": 8,
    "max_num_seqs": 8, "enable_prefix_caching": False, "enforce_eager": True,
}  # fmt: skip


@pytest.fixture(scope="module")
def bench():
    yield load_benchmark("quant_quality")
    sys.modules.pop("quant_quality", None)


@pytest.fixture
def scored(bench, ordinary_token_ids):
    stream = [ordinary_token_ids[(7 * i) % 200] for i in range(3 * 24 + 1)]
    return bench.windows(stream, 24, 0)


def _zeroed_copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    for shard in dest.glob("*.safetensors"):
        save_file({k: torch.zeros_like(v) for k, v in load_file(shard).items()}, shard)
    return dest


def _vocab_size(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_windows_are_the_trainers_validation_samples(bench, tmp_path):
    from parallm.data.shards import TokenShards, write_shards
    from parallm.train.data import ShuffledWindows

    stream = list(range(1, 100))
    write_shards(iter([stream]), tmp_path, "val", 1 << 20, np.uint16)
    trainer = ShuffledWindows(TokenShards(tmp_path, "val"), 16, seed=0, shuffle=False)
    ours = bench.windows(stream, 16, 0)
    assert len(ours) == len(trainer) == 6
    assert ours == [trainer.sample(i).tolist() for i in range(len(trainer))]
    assert bench.windows(stream, 16, 2) == ours[:2]


def test_agreement_counts_the_prefix_and_every_position(bench):
    base = [[1, 2, 3, 4], [5, 6, 7, 8]]
    other = [[1, 9, 3, 4], [5, 6, 7, 8]]
    assert bench.agreement(base, other) == {"prefix": 5 / 8, "overall": 7 / 8, "identical": 1}


def test_loss_is_the_models_cross_entropy(bench, tiny_model_dir, scored):
    from transformers import AutoModelForCausalLM

    from parallm import LLM

    model_dir = tiny_model_dir("llama3")
    llm = LLM(str(model_dir), **ENGINE)
    loss, count = bench.held_out_loss(llm, scored)
    llm.close()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ids = torch.tensor(scored)
        logits = hf(ids[:, :-1]).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    assert count == 3 * 24
    assert loss == pytest.approx(expected.item(), rel=1e-4)


def test_baseline_against_itself_changes_nothing_and_broken_weights_fail(
    bench, tiny_model_dir, scored, tmp_path
):
    model_dir = tiny_model_dir("llama3")
    broken = _zeroed_copy(model_dir, tmp_path / "zeroed")
    configs = [
        bench.QuantConfig("same", {}, 0.005),
        bench.QuantConfig("zeroed", {}, 0.01, model=str(broken)),
        bench.CONFIGS["int8"],
        bench.CONFIGS["fp8-kv"],
    ]
    prompts = bench.greedy_prompts(scored, 2, 6)
    results = bench.run_configs(str(model_dir), configs, scored, prompts, 5, ENGINE)

    assert [r.name for r in results] == ["baseline", "same", "zeroed", "int8", "fp8-kv"]
    base, same, zeroed = results[:3]
    assert all(len(g) == 5 for g in base.generations) and len(base.generations) == 2
    assert same.loss == base.loss and same.rel_loss_change == 0.0 and same.passed is True
    assert same.prefix_agreement == same.overall_agreement == 1.0
    assert same.identical_sequences == 2
    # All-zero weights give uniform logits: the loss is log(vocabulary), far from the random
    # model's (which is worse than uniform on this text: "within" the bound is both ways).
    assert zeroed.loss == pytest.approx(math.log(_vocab_size(model_dir)), rel=1e-5)
    assert zeroed.passed is False and abs(zeroed.rel_loss_change) > 0.01
    assert zeroed.prefix_agreement < 1.0
    # The fp8 cache is really read back: chunks of 8 tokens attend to earlier chunks' K/V.
    assert "KV cache (float8_e4m3fn)" in results[4].summary
    assert results[4].rel_loss_change != 0.0

    rows = bench.table_rows(results)
    assert [row[0] for row in rows] == ["baseline", "same", "zeroed", "int8", "fp8-kv"]
    assert all(len(row) == len(bench.TABLE_COLUMNS) for row in rows)
    assert rows[0][2:5] == ["+0.000%", "-", "-"]
    assert rows[1][2:7] == ["+0.000%", "0.5%", "pass", "100.0%", "100.0%"]
    assert rows[2][4] == "FAIL"
    table = bench.format_table(results).splitlines()
    assert table[0].split() == [w for c in bench.TABLE_COLUMNS for w in c.split()]
    assert len(table) == 2 + len(results)


def test_main_writes_every_config_to_json(bench, tiny_model_dir, tmp_path, capsys):
    model_dir = tiny_model_dir("llama3")
    text = tmp_path / "held_out.py"
    text.write_text("def add(a, b):\n    return a + b\n" * 8)
    out = tmp_path / "quality.json"
    code = bench.main([
        "--model", str(model_dir), "--text-files", str(text), "--seq-len", "16",
        "--max-windows", "2", "--prompts", "2", "--prompt-len", "4", "--new-tokens", "3",
        "--device", "cpu", "--max-num-batched-tokens", "8", "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    names = [c["name"] for c in result["configs"]]
    assert names == bench.DEFAULT_CONFIGS
    assert result["windows"] == 2 and result["held_out"]["documents"] == 1
    assert all(c["scored_tokens"] == 32 for c in result["configs"])
    assert {c["name"]: c["loss_bound"] for c in result["configs"]} == {
        "baseline": None, "fp8": 0.01, "int8": 0.005, "fp8-kv": 0.005, "fp8+fp8-kv": None,
    }  # fmt: skip
    assert "prefix_agreement" in result["definitions"]
    assert capsys.readouterr().out.splitlines()[0].startswith("config")


def test_unknown_config_is_rejected(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "baseline,fp4"])
