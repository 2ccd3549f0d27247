"""The trainer in one process (gloo, world size 1): FSDP vs plain PyTorch, activation
checkpointing, checkpoint bookkeeping, telemetry, the CLI and export to transformers/parallm.

The multi-process tests (FSDP and TP over 2 ranks, resharding, kill and resume) are in
test_train_distributed.py and reuse the helpers here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from parallm.train.checkpoint import complete_checkpoints
from parallm.train.config import TrainConfig
from parallm.train.telemetry import flops_per_token, read_metrics
from parallm.train.trainer import Trainer

TINY = {
    "model": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
    "data": {
        "corpus": "stdlib",
        "max_files": 12,
        "vocab_size": 512,
        "seq_len": 32,
        "val_fraction": 0.2,
    },
    "training": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "eval_samples": 8},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "checkpoint": {"every": 5},
    "logging": {"progress_bar": False},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # strings, numbers and lists of them are valid TOML this way


def write_config(path: Path, dataset_dir: Path, run_dir: Path, **overrides: Any) -> Path:
    """A tiny-model TOML config; ``overrides`` are ``section__key=value``."""
    sections = {name: dict(values) for name, values in TINY.items()}
    sections["data"]["dataset_dir"] = str(dataset_dir)
    sections["logging"]["dir"] = str(run_dir)
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        sections.setdefault(section, {})[key] = value
    return write_toml(path, sections)


def write_toml(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """``sections`` (name -> key -> value) as a TOML file at ``path``."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from a run's metrics log (the last record of a step wins)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny tokenized corpus, built once for every training test."""
    from parallm.train.data import prepare_dataset

    path = tmp_path_factory.getbasetemp() / "train-dataset"
    cfg = TrainConfig.from_dict({"data": {**TINY["data"], "dataset_dir": str(path)}})
    prepare_dataset(cfg.data)
    return path


def tiny_cfg(tmp_path: Path, dataset_dir: Path, *overrides: str) -> TrainConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    file = write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run")
    return TrainConfig.load(file, list(overrides))


def run_trainer(cfg: TrainConfig, steps: int | None = None) -> list[dict[str, Any]]:
    with Trainer(cfg) as trainer:
        return trainer.train(steps)


def test_fsdp_trainer_matches_plain_pytorch(tmp_path: Path, dataset_dir: Path) -> None:
    """parallelize() is transparent: the same numbers as an unwrapped model and AdamW."""
    from parallm.train.data import DataLoader, prepare_dataset, sample_sources
    from parallm.train.model import build_train_model
    from parallm.train.optim import build_optimizer, lr_at, set_lr

    cfg = tiny_cfg(tmp_path, dataset_dir, "training.steps=4", "optim.grad_clip=0.5")
    got = [m["loss"] for m in run_trainer(cfg)]

    model = build_train_model(cfg.model_config(), 64, torch.device("cpu"), 0.02, seed=0)
    optimizer = build_optimizer(model, cfg.optim)
    source, _ = sample_sources(cfg.data, prepare_dataset(cfg.data, build=False))
    loader = DataLoader(source, 8, 2, 0, 1)
    expected = []
    for step in range(4):
        total = 0.0
        for tokens in loader.next_batch():
            logits = model.compute_logits(model(tokens[:, :-1]))
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()) / 4
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        set_lr(optimizer, lr_at(step, cfg.optim, 4))
        optimizer.step()
        optimizer.zero_grad()
        expected.append(total)
    assert got == pytest.approx(expected, abs=1e-5)


def test_activation_checkpointing_keeps_losses(tmp_path: Path, dataset_dir: Path) -> None:
    base = tiny_cfg(tmp_path / "a", dataset_dir, "training.steps=3")
    with_ac = tiny_cfg(
        tmp_path / "b", dataset_dir, "training.steps=3", "parallel.activation_checkpointing=true"
    )
    expected = [m["loss"] for m in run_trainer(base)]
    assert [m["loss"] for m in run_trainer(with_ac)] == pytest.approx(expected, abs=1e-6)


def test_metrics_and_mfu_flag(tmp_path: Path, dataset_dir: Path) -> None:
    cfg = tiny_cfg(tmp_path, dataset_dir, "training.steps=2", "logging.peak_flops=1e12")
    metrics = run_trainer(cfg)
    last = metrics[-1]
    assert last["step"] == 2 and last["lr"] > 0 and last["tokens_per_s"] > 0
    assert 0 < last["mfu"] < 1 and last["memory_gib"] > 0 and "val_loss" in last
    expected_mfu = last["tokens_per_s"] * flops_per_token(cfg.model_config(), 32) / 1e12
    assert last["mfu"] == pytest.approx(expected_mfu)
    log = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 2]  # two steps, then the validation record


def test_flops_per_token_counts_matmuls() -> None:
    cfg = TrainConfig.from_dict({"model": TINY["model"], "data": TINY["data"]}).model_config()
    # q, k, v, o: 64x64, 64x32, 64x32, 64x64; MLP 3 x 64x128; LM head 512x64.
    matmuls = 2 * (4096 + 2048 + 2048 + 4096 + 3 * 8192) + 512 * 64
    assert flops_per_token(cfg, 32) == 6 * matmuls + 12 * 2 * 4 * 16 * 32


def test_checkpoints_keep_last_k_and_skip_partial(tmp_path: Path, dataset_dir: Path) -> None:
    cfg = tiny_cfg(
        tmp_path, dataset_dir, "training.steps=6", "checkpoint.every=2", "checkpoint.keep=2"
    )
    run_trainer(cfg)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(ckpt_dir)] == ["step-00000004", "step-00000006"]
    # A killed save leaves a .partial folder; a folder without DCP metadata is not complete.
    shutil.copytree(ckpt_dir / "step-00000006", ckpt_dir / "step-00000008.partial")
    (ckpt_dir / "step-00000010").mkdir()
    assert complete_checkpoints(ckpt_dir)[-1].name == "step-00000006"
    cfg.training.steps = 7
    with Trainer(cfg) as trainer:
        assert trainer.step == 6
        assert not (ckpt_dir / "step-00000008.partial").exists()  # cleaned up on start
        trainer.train()
    assert complete_checkpoints(ckpt_dir)[-1].name == "step-00000007"


def test_cli_train_plot_and_errors(tmp_path: Path, dataset_dir: Path) -> None:
    from parallm.cli import main

    file = write_config(tmp_path / "run.toml", dataset_dir, tmp_path / "run")
    assert main(["train", "--config", str(file), "--set", "training.steps=2", "--plot"]) == 0
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "--config", str(file), "--set", "model.hidden=3"]) == 2


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, dataset_dir: Path) -> Path:
    tmp_path = tmp_path_factory.mktemp("export-run")
    run_trainer(tiny_cfg(tmp_path, dataset_dir, "training.steps=6"))
    return tmp_path / "run" / "checkpoints"


def test_export_matches_transformers_logits(tmp_path: Path, trained_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from parallm.train.export import export_checkpoint, load_checkpoint_model

    source = export_checkpoint(trained_checkpoint, tmp_path / "hf", dtype="float32")
    assert source.name == "step-00000006"
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= files
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("def add(a, b):\n    return a + b\n", return_tensors="pt")["input_ids"]
    trained, _ = load_checkpoint_model(source)
    with torch.no_grad():
        expected = trained.compute_logits(trained(ids))
        got = hf(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_export_greedy_tokens_match_in_parallm(tmp_path: Path, trained_checkpoint: Path) -> None:
    from transformers import AutoModelForCausalLM

    from parallm import LLM, SamplingParams
    from parallm.train.export import export_checkpoint

    export_checkpoint(trained_checkpoint, tmp_path / "hf", dtype="float32")
    llm = LLM(
        model=str(tmp_path / "hf"), dtype="float32", device="cpu", kv_cache_memory=8 << 20,
        enforce_eager=True,
    )  # fmt: skip
    prompt = "def add(a, b):\n"
    ids = llm.get_tokenizer()(prompt)["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ours = list(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
    assert ours == theirs.tolist()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_export_file_modes_follow_umask(
    tmp_path: Path, trained_checkpoint: Path, umask: int
) -> None:
    """Every exported file, the weights included, gets 0666 minus the umask (0644 usually)."""
    import os
    import stat

    from parallm.train.export import export_checkpoint

    old = os.umask(umask)
    try:
        export_checkpoint(trained_checkpoint, tmp_path / "hf", dtype="float32")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask, modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
