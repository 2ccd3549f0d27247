"""Training metrics: FLOPs and MFU, memory, a JSONL log, a progress bar and a loss plot."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from parallm.config import ModelConfig

# Dense bf16 tensor-core peak per device, FLOP/s (no sparsity).
PEAK_BF16_FLOPS = {"H100": 990e12, "H200": 990e12}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores and values.

    Embedding lookups and norms are not matmuls and are left out; the LM head counts even when
    tied. Attention is 12 x layers x heads x head_dim x seq_len (forward + backward of QK^T and
    AV, causal masking not discounted), the convention of PaLM and torchtitan.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size
    matmul_params = cfg.num_hidden_layers * per_layer + cfg.vocab_size * h
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * d * seq_len
    return 6 * matmul_params + attention


def device_peak_flops(device: torch.device, configured: float = 0.0) -> float | None:
    """The device's peak FLOP/s: ``configured`` if set, else the table, else None (no MFU)."""
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def memory_gib(device: torch.device) -> float:
    """Peak memory since the last call: CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsLog:
    """Appends one JSON object per line; a resumed run appends to the same file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss, learning rate and throughput."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=total, initial=initial, disable=not enabled, unit="step", file=sys.stderr,
            dynamic_ncols=True,
        )  # fmt: skip

    def update(self, metrics: dict[str, Any]) -> None:
        text = f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} {metrics['tokens_per_s']:,.0f} tok/s"
        if metrics.get("mfu") is not None:
            text += f" mfu {100 * metrics['mfu']:.1f}%"
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics file; for steps logged twice (re-run after a resume) the last wins."""
    by_key: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            kind = "val" if "val_loss" in record else "train"
            by_key[(kind, record["step"])] = record
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[1], k[0]))]


def plot_loss(metrics_path: Path, out: Path) -> Path:
    """Write a PNG of training (and validation) loss against step."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
