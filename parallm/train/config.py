"""Training configuration: a TOML file of sections plus ``--set section.key=value`` overrides.

Every key has a typed default here, so an unknown key or a value of the wrong type is an error
that names it. Checks that need the world size (data-parallel degree, batch divisibility) run in
:meth:`TrainConfig.validate` once the process group exists.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallm.config import ModelConfig
from parallm.train.medusa_config import check_medusa_config

MIXED_PRECISIONS = ("auto", "bfloat16", "float32")
OBJECTIVES = ("lm", "medusa")
NONFINITE_POLICIES = ("stop", "rollback")


@dataclass
class ModelSection:
    """The decoder's shape (a Llama); the vocabulary size is ``data.vocab_size``."""

    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02


@dataclass
class DataSection:
    """Where tokens come from and how they are cut into training sequences."""

    # "stdlib", "python" (the standard library and the installed packages), "synthetic" (random
    # tokens) or a directory of text files
    corpus: str = "stdlib"
    extensions: list[str] = field(default_factory=lambda: [".py"])  # for a directory corpus
    max_files: int = 0  # 0: every file; a positive number keeps the first N (small tests)
    dataset_dir: str = "runs/data/stdlib"  # tokenizer + token shards, built once and reused
    tokenizer: str = ""  # an existing tokenizer directory; empty: train a byte-level BPE
    vocab_size: int = 8192
    seq_len: int = 512
    val_fraction: float = 0.02  # share of documents held out for the validation loss
    shard_tokens: int = 1 << 24
    seed: int = 0  # order of the training sequences


@dataclass
class TrainingSection:
    """Steps, batch geometry, device and evaluation cadence."""

    steps: int = 1000
    global_batch_size: int = 64  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    seed: int = 0
    device: str = "auto"  # auto, cpu or cuda
    # "lm": train the model of [model] on next-token prediction; "medusa": train Medusa draft
    # heads ([medusa]) on a frozen target's hidden states ([model] is then unused)
    objective: str = "lm"
    eval_every: int = 0  # 0: only after the last step
    eval_samples: int = 64  # held-out sequences per evaluation
    # A NaN or infinite loss (or model state): "stop" exits non-zero; "rollback" reloads the
    # newest intact checkpoint and skips the batch. Non-finite state is never saved.
    on_nonfinite_loss: str = "stop"


@dataclass
class OptimSection:
    """AdamW with linear warm-up then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off


@dataclass
class ParallelSection:
    """How the model is spread over devices; applied by ``parallelize`` in this order."""

    tp: int = 1
    dp: int = -1  # -1: world_size // tp
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer
    mixed_precision: str = "auto"  # compute dtype; auto: bfloat16 on CUDA, float32 on CPU


@dataclass
class MedusaSection:
    """Medusa-1 draft heads on a frozen target (``training.objective = "medusa"``)."""

    # The frozen target: a model directory (config.json + safetensors) or a checkpoint folder
    # or directory written by `parallm train`
    target: str = ""
    num_heads: int = 4  # head i predicts the token i + 2 positions ahead
    num_layers: int = 1  # residual blocks per head before its projection to the vocabulary
    loss_decay: float = 0.8  # head i's loss weight is loss_decay ** i


@dataclass
class CheckpointSection:
    """Distributed checkpoints (torch.distributed.checkpoint)."""

    dir: str = ""  # empty: <logging.dir>/checkpoints
    every: int = 0  # save every N steps (0: only after the last step)
    keep: int = 3  # newest complete checkpoints kept; older ones are deleted
    async_save: bool = True  # write in the background while training goes on
    resume: bool = True  # start from the newest complete checkpoint in dir


@dataclass
class LoggingSection:
    """Metrics: JSONL log, progress bar, MFU."""

    dir: str = "runs/train"
    every: int = 1  # JSONL record every N steps
    progress_bar: bool = True
    peak_flops: float = 0.0  # per device; 0: look the device up (H100/H200), else no MFU


_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "training": TrainingSection,
    "optim": OptimSection,
    "parallel": ParallelSection,
    "medusa": MedusaSection,
    "checkpoint": CheckpointSection,
    "logging": LoggingSection,
}


@dataclass
class TrainConfig:
    """All sections of a training run."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optim: OptimSection = field(default_factory=OptimSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    medusa: MedusaSection = field(default_factory=MedusaSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], check: bool = True) -> TrainConfig:
        """Build from nested dicts; unknown sections or keys and wrong types are ValueErrors.
        ``check``: also run :meth:`check` (off while overrides are still to come)."""
        cfg = cls()
        for section, values in raw.items():
            if section not in _SECTIONS:
                raise ValueError(f"unknown config section [{section}]; allowed: {list(_SECTIONS)}")
            if not isinstance(values, dict):
                raise ValueError(f"[{section}] must be a table of keys, got {values!r}")
            for key, value in values.items():
                cfg.set(f"{section}.{key}", value)
        if check:
            cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
        """Read a TOML file (or start from defaults) and apply ``key=value`` overrides."""
        raw: dict[str, Any] = {}
        if path is not None:
            file = Path(path)
            if not file.is_file():
                raise ValueError(f"--config: no such file {file}")
            with file.open("rb") as f:
                raw = tomllib.load(f)
        cfg = cls.from_dict(raw, check=False)  # an override may fix a value of the file
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"--set expects section.key=value, got {item!r}")
            cfg.set(key.strip(), parse_value(value.strip()))
        cfg.check()
        return cfg

    def set(self, dotted_key: str, value: Any) -> None:
        """Assign ``section.key``, checking the name and the value's type."""
        section_name, _, key = dotted_key.partition(".")
        section = getattr(self, section_name, None) if section_name in _SECTIONS else None
        if section is None:
            raise ValueError(
                f"unknown config section in {dotted_key!r}; allowed: {list(_SECTIONS)}"
            )
        fields = {f.name: f for f in dataclasses.fields(section)}
        if key not in fields:
            raise ValueError(
                f"unknown config key {dotted_key!r}; allowed in [{section_name}]: {sorted(fields)}"
            )
        setattr(section, key, _coerce(dotted_key, value, getattr(section, key)))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Checks that need no world size; raise ValueError naming the key."""
        m, d, t, o, p = self.model, self.data, self.training, self.optim, self.parallel
        _positive("model.hidden_size", m.hidden_size)
        _positive("model.intermediate_size", m.intermediate_size)
        _positive("model.num_hidden_layers", m.num_hidden_layers)
        _positive("model.num_attention_heads", m.num_attention_heads)
        _positive("model.num_key_value_heads", m.num_key_value_heads)
        if m.num_attention_heads % m.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads ({m.num_key_value_heads}) must divide "
                f"model.num_attention_heads ({m.num_attention_heads})"
            )
        if m.head_dim == 0 and m.hidden_size % m.num_attention_heads:
            raise ValueError(
                f"model.hidden_size ({m.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({m.num_attention_heads}) unless model.head_dim is set"
            )
        _positive("data.vocab_size", d.vocab_size)
        _positive("data.seq_len", d.seq_len)
        # A Medusa run's positions are its target's, checked when the target is read.
        if d.seq_len > m.max_position_embeddings and t.objective != "medusa":
            raise ValueError(
                f"data.seq_len ({d.seq_len}) must be <= model.max_position_embeddings "
                f"({m.max_position_embeddings})"
            )
        if not 0 <= d.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
        _positive("training.steps", t.steps)
        _positive("training.global_batch_size", t.global_batch_size)
        _positive("training.micro_batch_size", t.micro_batch_size)
        _positive("optim.lr", o.lr)
        if not 0 <= o.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        _positive("parallel.tp", p.tp)
        self._check_tp()
        if p.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"parallel.mixed_precision must be one of {list(MIXED_PRECISIONS)}, "
                f"got {p.mixed_precision!r}"
            )
        if t.on_nonfinite_loss not in NONFINITE_POLICIES:
            raise ValueError(
                f"training.on_nonfinite_loss must be one of {list(NONFINITE_POLICIES)}, "
                f"got {t.on_nonfinite_loss!r}"
            )
        if t.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"training.device must be auto, cpu or cuda, got {t.device!r}")
        if t.objective not in OBJECTIVES:
            raise ValueError(
                f"training.objective must be one of {list(OBJECTIVES)}, got {t.objective!r}"
            )
        if t.objective == "medusa":
            check_medusa_config(self)
        _positive("checkpoint.keep", self.checkpoint.keep)
        _positive("logging.every", self.logging.every)

    def _check_tp(self) -> None:
        tp, m = self.parallel.tp, self.model
        for name, value in (
            ("model.num_attention_heads", m.num_attention_heads),
            ("model.num_key_value_heads", m.num_key_value_heads),
            ("model.intermediate_size", m.intermediate_size),
            ("data.vocab_size", self.data.vocab_size),
        ):
            if value % tp:
                raise ValueError(f"parallel.tp ({tp}) must divide {name} ({value})")

    def validate(self, world_size: int) -> None:
        """Resolve ``parallel.dp`` for this world size and check the batch geometry."""
        p, t = self.parallel, self.training
        if world_size % p.tp:
            raise ValueError(f"parallel.tp ({p.tp}) must divide the world size ({world_size})")
        if p.dp == -1:
            p.dp = world_size // p.tp
        if p.dp * p.tp != world_size:
            raise ValueError(
                f"parallel.dp ({p.dp}) x parallel.tp ({p.tp}) must equal the world size "
                f"({world_size})"
            )
        per_step = p.dp * t.micro_batch_size
        if t.global_batch_size % per_step:
            raise ValueError(
                f"training.global_batch_size ({t.global_batch_size}) must be divisible by "
                f"parallel.dp ({p.dp}) x training.micro_batch_size ({t.micro_batch_size})"
            )

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per rank per optimizer step (after :meth:`validate`)."""
        t = self.training
        return t.global_batch_size // (self.parallel.dp * t.micro_batch_size)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.logging.dir) / "checkpoints")

    def hf_model_dict(self, bos_token_id: int | None, eos_token_id: int | None) -> dict[str, Any]:
        """The model as a Hugging Face Llama ``config.json`` dict (4.x keys, read by 5.x too)."""
        m = self.model
        head_dim = m.head_dim or m.hidden_size // m.num_attention_heads
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.data.vocab_size,
            "hidden_size": m.hidden_size,
            "intermediate_size": m.intermediate_size,
            "num_hidden_layers": m.num_hidden_layers,
            "num_attention_heads": m.num_attention_heads,
            "num_key_value_heads": m.num_key_value_heads,
            "head_dim": head_dim,
            "max_position_embeddings": m.max_position_embeddings,
            "rms_norm_eps": m.rms_norm_eps,
            "rope_theta": m.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": m.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
            "initializer_range": m.init_std,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
        }

    def model_config(self) -> ModelConfig:
        """The engine's :class:`ModelConfig` for this shape."""
        return ModelConfig.from_dict(self.hf_model_dict(None, None))


def parse_value(text: str) -> Any:
    """A TOML value (``3``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``); bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(key: str, value: Any, default: Any) -> Any:
    # bool is a subclass of int, so it is checked first and strictly.
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return list(value)
    if type(value) is not type(default):
        raise ValueError(f"{key} must be a {type(default).__name__}, got {value!r}")
    return value


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{key} must be > 0, got {value}")
