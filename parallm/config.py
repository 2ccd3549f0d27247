"""Engine configuration: plain dataclasses, validated once where the values enter."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from parallm.engine.profiler import ProfilerConfig
from parallm.engine.spec.config import SpeculativeConfig
from parallm.layers.quantization import check_quantization

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass
class ModelConfig:
    """The decoder's shape, read from a Hugging Face ``config.json`` (4.x or 5.x form)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    sliding_window: int | None
    config_dtype: str | None
    hidden_act: str = "silu"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        arch = _architecture(d)
        heads = d["num_attention_heads"]
        rope_theta, rope_scaling = _rope(d)
        is_qwen2 = arch == "Qwen2ForCausalLM"
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act must be 'silu' for {arch}, got {act!r}")
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)) or is_qwen2,
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=_sliding_window(d),
            config_dtype=d.get("torch_dtype") or d.get("dtype"),
            raw=d,
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a model directory or a path to the file itself."""
        p = Path(path)
        file = p / "config.json" if p.is_dir() else p
        if not file.exists():
            raise ValueError(f"model: no config.json at {file}")
        return cls.from_dict(json.loads(file.read_text()))

    @property
    def num_params(self) -> int:
        """Parameter count, embeddings included once when tied."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads
        attn = h * self.head_dim * (2 * self.num_attention_heads + 2 * kv)
        layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + h


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"architectures {archs} are not supported; supported: {list(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Transformers 5 writes ``rope_parameters``; 4.x wrote ``rope_theta`` + ``rope_scaling``."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or params or None
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(
                f"rope_scaling type {kind!r} is not supported; supported: default, llama3"
            )
        if kind == "default":
            scaling = None
    return float(theta), scaling


def _sliding_window(d: dict[str, Any]) -> int | None:
    window = d.get("sliding_window")
    if d.get("use_sliding_window") is False:
        return None
    return int(window) if window else None


def resolve_dtype(
    dtype: str | torch.dtype, model: ModelConfig, device: torch.device
) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype on CUDA and float32 on CPU (bf16 GEMMs are slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu" or model.config_dtype is None:
            return torch.float32
        dtype = str(model.config_dtype).replace("torch.", "")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {['auto', *_DTYPES]}, got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when present."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    resolved = torch.device(device)
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r}: this process sees {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return resolved


# vLLM's names: "fp8" is e4m3 (float8_e4m3fn), with per-layer float32 k/v scales.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype must be one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}"
        )


def resolve_kv_cache_dtype(kv_cache_dtype: str, dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type: the model's ``dtype`` for ``auto``, else float8 e4m3."""
    _check_kv_cache_dtype(kv_cache_dtype)
    return dtype if kv_cache_dtype == "auto" else torch.float8_e4m3fn


def _graph_sizes(sizes: object) -> tuple[int, ...]:
    """``cuda_graph_sizes`` sorted, each once; a ValueError unless they are integers >= 1."""
    if isinstance(sizes, str) or not hasattr(sizes, "__iter__"):
        raise ValueError(f"cuda_graph_sizes must be a list of integers >= 1, got {sizes!r}")
    sizes = list(sizes)
    bad = [s for s in sizes if isinstance(s, bool) or not isinstance(s, int) or s < 1]
    if bad or not sizes:
        raise ValueError(f"cuda_graph_sizes must be a non-empty list of integers >= 1, got "
                         f"{sizes!r}")  # fmt: skip
    return tuple(sorted(set(sizes)))


def _check_parallel_size(size: object, name: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {size!r}")


@dataclass
class CacheConfig:
    """KV cache geometry and sizing."""

    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; overrides gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks: int = 0  # set by the runner once memory is measured
    cache_dtype: str = "auto"  # EngineConfig.kv_cache_dtype (vLLM's CacheConfig name)

    def validate(self) -> None:
        _check_kv_cache_dtype(self.cache_dtype)
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


# max_num_seqs when unset, as vLLM 0.26 chooses it: 1,024 sequences on a GPU of 70 GiB or more
# (an A100 excepted), 256 elsewhere. On an H200, Llama-3.1-8B at 16x the Azure conversation
# trace: goodput 30.00 -> 32.08 req/s and TTFT p99 1,023 -> 175 ms against 256 (RESULTS,
# eighteenth session).
DEFAULT_MAX_NUM_SEQS = 256
LARGE_GPU_MAX_NUM_SEQS = 1024
LARGE_GPU_BYTES = 70 << 30


def default_max_num_seqs(device: torch.device | None) -> int:
    """``max_num_seqs`` when the user leaves it unset, on ``device`` (None: not known)."""
    if device is None or device.type != "cuda":
        return DEFAULT_MAX_NUM_SEQS
    props = torch.cuda.get_device_properties(device)
    if props.total_memory >= LARGE_GPU_BYTES and "A100" not in props.name:
        return LARGE_GPU_MAX_NUM_SEQS
    return DEFAULT_MAX_NUM_SEQS


@dataclass
class SchedulerConfig:
    """Per-step limits of continuous batching."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 0  # set from the model when 0
    enable_chunked_prefill: bool = True

    def validate(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len when chunked prefill is off "
                f"({self.max_num_batched_tokens} < {self.max_model_len})"
            )


@dataclass
class EngineConfig:
    """Everything ``LLM(...)`` and ``parallm serve`` accept; see ``docs`` for each field."""

    model: str | None = None  # a local directory or a Hugging Face Hub id
    tokenizer: str | None = None  # default: the model's
    # A file or the Jinja text itself; replaces the tokenizer's own template (None: keep it).
    chat_template: str | None = None
    # Hub ids: the branch, tag or commit to fetch, and the cache folder (default: HF's cache).
    revision: str | None = None
    download_dir: str | None = None
    # No tokenizer at all: prompts must be token ids, and outputs carry token ids and no text.
    skip_tokenizer_init: bool = False
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    max_num_seqs: int | None = None  # None: default_max_num_seqs(the engine's device)
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    enforce_eager: bool = False
    # Triton RMSNorm(+residual), rotary and SiLU-mul, and for one-token steps the norm and SiLU-mul
    # fused into the GEMVs. None: on for CUDA (fewer, larger kernels per decode step), off
    # elsewhere (Triton needs a GPU).
    fused_kernels: bool | None = None
    # Launch the next decode step before post-processing the current one. None: on for CUDA.
    async_scheduling: bool | None = None
    # Decode graphs' batch sizes (--cudagraph-capture-sizes, vLLM's flag; sorted, each once);
    # those above max_num_seqs are not captured. Up to 512, as
    # vLLM caps its own: an engine that admits more sequences than 256 (vLLM's defaults admit
    # 1,024 on an H100) would otherwise run its largest decode steps eagerly.
    cuda_graph_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 320,
                                         384, 448, 512)  # fmt: skip
    # vLLM's speculative_config: a dict, a JSON object string or a SpeculativeConfig (None: off).
    speculative_config: SpeculativeConfig | None = None
    # Online weight quantization at load, vLLM's name: "fp8" (e4m3) or "int8", one scale per
    # output channel, every linear layer but the LM head (None: weights stay in dtype).
    quantization: str | None = None
    # The KV cache's element type: "auto" is the model's dtype; "fp8" (= "fp8_e4m3") stores
    # keys and values as float8 e4m3 with per-layer scales, twice the tokens per byte.
    kv_cache_dtype: str = "auto"
    # Ranks the model is sharded over (Megatron style), one process each; >1 is CPU/gloo so far.
    tensor_parallel_size: int = 1
    # Engine replicas, one process each, behind a prefix-aware router.
    data_parallel_size: int = 1
    # LLM(...) steps its one engine in a process of its own (an engine core behind ZeroMQ, as
    # the server and data-parallel replicas do) instead of in the caller's.
    engine_process: bool = False
    # vLLM's profiler_config: a dict, a JSON object string or a ProfilerConfig (None: off);
    # LLM.start_profile()/stop_profile() and the server's /start_profile, /stop_profile use it.
    profiler_config: ProfilerConfig | None = None

    def __post_init__(self) -> None:
        # Checked where the value enters, before anything loads.
        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        self.profiler_config = ProfilerConfig.from_value(self.profiler_config)
        check_quantization(self.quantization)
        _check_kv_cache_dtype(self.kv_cache_dtype)
        self.cuda_graph_sizes = _graph_sizes(self.cuda_graph_sizes)
        _check_parallel_size(self.tensor_parallel_size, "tensor_parallel_size")
        _check_parallel_size(self.data_parallel_size, "data_parallel_size")
        if not isinstance(self.engine_process, bool):
            raise ValueError(f"engine_process must be True or False, got {self.engine_process!r}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from keyword arguments; unknown names are a ValueError listing the allowed ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(f"unknown engine argument(s) {unknown}; allowed: {sorted(names)}")
        return cls(**kwargs)

    def cache_config(self) -> CacheConfig:
        cfg = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=self.kv_cache_memory,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            cache_dtype=self.kv_cache_dtype,
        )
        cfg.validate()
        return cfg

    def scheduler_config(
        self, max_model_len: int, device: torch.device | None = None
    ) -> SchedulerConfig:
        seqs = self.max_num_seqs
        cfg = SchedulerConfig(
            max_num_seqs=default_max_num_seqs(device) if seqs is None else seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
        )
        cfg.validate()
        return cfg

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """The context limit: the model's, capped by a sliding window we do not implement."""
        limit = model.max_position_embeddings
        if model.sliding_window:
            limit = min(limit, model.sliding_window)
        if self.max_model_len is None:
            return limit
        if not 1 <= self.max_model_len <= limit:
            raise ValueError(f"max_model_len must be in [1, {limit}], got {self.max_model_len}")
        return self.max_model_len
