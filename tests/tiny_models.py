"""Tiny random checkpoints of real model families, and a transformers reference to compare with.

Each model is float32, hidden 64, 4 query heads, 2 kv heads (GQA), intermediate 128, and has the
config.json layout of its real family, so the engine's loader sees what it would see on the hub.
Weights are drawn with a fixed seed and a large enough spread that greedy decoding does not
collapse into one repeated token.

RoPE keys in config.json: transformers 5.x writes one nested ``rope_parameters`` dict that holds the
base frequency and any scaling, e.g. for llama3::

    "rope_parameters": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
                        "rope_type": "llama3"}

and ``{"rope_theta": 10000.0, "rope_type": "default"}`` for plain RoPE; there is no top-level
``rope_theta`` or ``rope_scaling``. Checkpoints written by transformers 4.x (most of the hub) use
top-level ``"rope_theta": 500000.0`` and ``"rope_scaling": {...}`` (or ``null`` for plain RoPE)
instead. ``make_tiny_model(..., legacy_rope_keys=True)`` rewrites config.json into that older form
so tests can check the engine reads both. transformers 5.x itself reads both. Likewise 5.x writes
``"dtype": "float32"`` where 4.x wrote ``"torch_dtype"``.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig

try:  # tests/ is on sys.path under pytest's default import mode
    from tokenizer_factory import build_test_tokenizer
except ImportError:  # imported as the ``tests`` package from the repository root
    from tests.tokenizer_factory import build_test_tokenizer

ARCHS = ["llama2", "llama3", "mistral", "qwen2", "qwen3"]

WEIGHT_STD = 0.25
BIAS_STD = 0.2
NORM_STD = 0.1
MAX_POSITIONS = 512
SHARD_SIZE = "100KB"


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one family's tiny checkpoint."""

    config_cls: str
    tokenizer_kind: str
    num_layers: int
    rope_theta: float
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


_LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Far below the 512 positions, so the llama3 rule really rescales some frequencies.
    "original_max_position_embeddings": 64,
}

SPECS: dict[str, ArchSpec] = {
    "llama2": ArchSpec("LlamaConfig", "sentencepiece", num_layers=2, rope_theta=10000.0),
    "llama3": ArchSpec(
        "LlamaConfig",
        "bytelevel",
        num_layers=2,
        rope_theta=500000.0,
        tie_word_embeddings=True,  # like Llama 3.2 1B/3B
        extra={"rope_scaling": _LLAMA3_ROPE_SCALING},
    ),
    "mistral": ArchSpec(
        "MistralConfig",
        "sentencepiece",
        num_layers=3,
        rope_theta=1000000.0,
        extra={"sliding_window": None},  # Mistral 7B v0.2+ has no sliding window
    ),
    "qwen2": ArchSpec("Qwen2Config", "bytelevel", num_layers=2, rope_theta=1000000.0),
    "qwen3": ArchSpec(
        "Qwen3Config",
        "bytelevel",
        num_layers=3,
        rope_theta=1000000.0,
        extra={"head_dim": 32},  # != hidden / heads = 16, as in real Qwen3
    ),
}


def make_tiny_model(
    arch: str,
    path: Path,
    *,
    tie_word_embeddings: bool | None = None,
    sharded: bool = False,
    seed: int = 0,
    legacy_rope_keys: bool = False,
    head_dim: int | None = None,
) -> Path:
    """Write a tiny random ``arch`` checkpoint (weights, config, tokenizer, generation config) to ``path``.

    ``head_dim`` widens the model to 4 query heads of that size (hidden 4 x head_dim), for
    kernels whose tiles depend on it.
    """
    spec = SPECS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_test_tokenizer(spec.tokenizer_kind)
    tie = spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    config = _build_config(spec, tokenizer, tie, head_dim)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    model.save_pretrained(
        path, safe_serialization=True, max_shard_size=SHARD_SIZE if sharded else "10GB"
    )
    tokenizer.save_pretrained(path)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(path)
    if legacy_rope_keys:
        _rewrite_legacy_rope_keys(path / "config.json")
    return path


def _build_config(
    spec: ArchSpec, tokenizer: Any, tie: bool, head_dim: int | None = None
) -> PretrainedConfig:
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": tie,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
        **spec.extra,
    }
    if head_dim is not None:
        kwargs.update(hidden_size=4 * head_dim, intermediate_size=8 * head_dim, head_dim=head_dim)
    config = getattr(transformers, spec.config_cls)(**kwargs)
    config.architectures = [spec.config_cls.replace("Config", "ForCausalLM")]
    return config


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Redraw every parameter: norms near 1, biases and matrices N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:  # input/post-attention/final norms and Qwen3's q_norm/k_norm
            param.copy_(1.0 + NORM_STD * noise)
        elif name.endswith(".bias"):
            param.copy_(BIAS_STD * noise)
        else:
            param.copy_(WEIGHT_STD * noise)


def _rewrite_legacy_rope_keys(config_path: Path) -> None:
    """Turn 5.x ``rope_parameters`` into 4.x top-level ``rope_theta`` + ``rope_scaling``."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters", None)
    if rope is None:  # already the legacy form
        return
    rope = dict(rope)
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def hf_greedy(
    path: Path | str, prompts: list[list[int]], max_new_tokens: int
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations from transformers, ignoring EOS, and the chosen tokens' logprobs.

    Runs one prompt at a time (no padding). Logprobs are log_softmax of the raw logits.
    """
    key = tuple(tuple(p) for p in prompts)
    tokens, logprobs = _hf_greedy_cached(str(Path(path).resolve()), key, max_new_tokens)
    return [list(t) for t in tokens], [list(lp) for lp in logprobs]


@functools.lru_cache(maxsize=64)
def _hf_greedy_cached(
    path: str, prompts: tuple[tuple[int, ...], ...], max_new_tokens: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    model = _load_hf_model(path)
    gen_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=None,  # never stop early, but EOS may still be chosen, like ignore_eos
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    all_tokens, all_logprobs = [], []
    for prompt in prompts:
        input_ids = torch.tensor([prompt], dtype=torch.long)
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=gen_config
        )
        new = out.sequences[0, len(prompt) :]
        assert len(new) == max_new_tokens, f"HF generated {len(new)} tokens, not {max_new_tokens}"
        logits = torch.stack(out.logits, dim=0)[:, 0].double()
        chosen = torch.log_softmax(logits, dim=-1).gather(1, new[:, None])[:, 0]
        all_tokens.append(tuple(new.tolist()))
        all_logprobs.append(tuple(chosen.tolist()))
    return tuple(all_tokens), tuple(all_logprobs)


@functools.lru_cache(maxsize=8)
def _load_hf_model(path: str) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    # generate() merges the checkpoint's generation_config.json into ours, where EOS would stop it.
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model.eval()
