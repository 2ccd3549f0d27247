"""Build a model and fill it from a Hugging Face directory (safetensors) or with dummy weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from parallm.config import ModelConfig
from parallm.layers.linear import packed_shard_ids
from parallm.layers.quantization.checkpoint import (
    StoredQuantization,
    quantize_stored_layers,
    runtime_weight,
    stored_quantization,
)
from parallm.models.registry import model_class

LOAD_FORMATS = ("auto", "safetensors", "dummy")
# Checkpoint entries that are derived state, never parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    packed: bool = False,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> nn.Module:
    """Instantiate the architecture directly on ``device`` in ``dtype`` (no CPU round trip);
    ``packed``: q/k/v and gate/up as one GEMM each (serving); ``tp_rank``/``tp_size``: build
    only this tensor-parallel rank's shard."""
    cls = model_class(cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg, max_positions, packed=packed, tp_rank=tp_rank, tp_size=tp_size)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def load_model(
    path: str | Path | None,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    load_format: str = "auto",
    seed: int = 0,
    packed: bool = False,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> nn.Module:
    """A model with weights from ``path`` or, for ``load_format='dummy'``, random ones; with
    ``tp_size > 1`` only rank ``tp_rank``'s shard (each parameter's loader takes its slice).
    A checkpoint stored quantized (``quantization_config``) loads into quantized layers."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {list(LOAD_FORMATS)}, got {load_format!r}")
    stored = stored_quantization(cfg.raw) if load_format != "dummy" else None
    torch.manual_seed(seed)
    model = build_model(cfg, dtype, device, max_positions, packed, tp_rank, tp_size)
    if load_format == "dummy":
        _init_dummy(model)
    else:
        if path is None:
            raise ValueError("model: a path is needed unless load_format='dummy'")
        load_safetensors(model, Path(path), stored)
    return model


def _init_dummy(model: nn.Module) -> None:
    # Small weights keep activations finite in low precision; norms stay at one.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory, sharded or not."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if not found:
        raise ValueError(f"model: no .safetensors weights in {path}")
    return found


class CheckpointSlice:
    """A checkpoint tensor not read yet: its shape, and reads of only a part of it (what a
    tensor-parallel loader needs: ``narrow`` and indexing, as on a tensor)."""

    def __init__(self, lazy: Any) -> None:
        self._lazy = lazy
        self.shape = torch.Size(lazy.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        return self._lazy[(slice(None),) * dim + (slice(start, start + length),)]

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self._lazy[index]

    def full(self) -> torch.Tensor:
        return self._lazy[...]  # ``[:]`` fails on a 0-dim tensor (a per-tensor scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.narrow(0, 0, min(1, self.shape[0])).dtype

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The whole tensor (a loader that needs it all, e.g. to quantize whole rows)."""
        return self.full().to(*args, **kwargs)


def iter_checkpoint_slices(path: Path) -> Iterator[tuple[str, CheckpointSlice]]:
    """Yield (name, unread tensor) for every tensor in the checkpoint, shard by shard."""
    files = checkpoint_files(path)
    for file in tqdm(files, desc="Loading shards", disable=len(files) < 2, leave=False):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield name, CheckpointSlice(f.get_slice(name))


def load_safetensors(
    model: nn.Module, path: Path, stored: StoredQuantization | None = None
) -> None:
    """Copy checkpoint tensors into the model through each parameter's ``weight_loader`` (its
    shard, or its rows of a packed layer); missing, unknown or misshapen tensors are errors.

    A tensor-parallel shard (``tp_size > 1``) reads only its slice of each weight matrix from
    the files; vectors (norms, biases) are read whole. With ``stored`` (a checkpoint stored
    quantized) the layers whose weights carry scales become quantized first, and each such
    weight reaches its loader with its scales in the runtime's per-row form."""
    sharded = model.tp_size > 1
    tied = model.config.tie_word_embeddings
    mapping = model.packed_modules_mapping if model.packed else {}
    scales = _stored_scales(model, path, stored, mapping) if stored is not None else {}
    names = _checkpoint_names(model, mapping)
    unfilled = set(names)
    with torch.no_grad():
        for name, lazy in iter_checkpoint_slices(path):
            if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
                continue
            if stored is not None and (stored.is_scale(name) or stored.is_skipped(name)):
                continue
            if name not in names:
                raise ValueError(f"checkpoint tensor {name!r} has no matching model parameter")
            param, shard_id = names[name]
            loader = getattr(param, "weight_loader", None)
            # Before quantize_model's swap every 2-D loader only narrows or indexes.
            partial = sharded and loader is not None and param.dim() == 2
            tensor = lazy if partial else lazy.full()
            try:
                if name in scales:
                    tensor = runtime_weight(stored, name, tensor, scales[name], param)
                if loader is not None:
                    loader(param, tensor, shard_id)
                else:
                    _copy_whole(param, tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            unfilled.discard(name)
    if unfilled:
        raise ValueError(f"checkpoint is missing tensor(s): {sorted(unfilled)[:8]}")


def _stored_scales(
    model: nn.Module, path: Path, stored: StoredQuantization, mapping: dict
) -> dict[str, torch.Tensor]:
    """The checkpoint's weight scales by the name of the weight they scale (read whole: they
    are small), after turning the layers they belong to into quantized ones."""
    scales = {
        name.rsplit(".", 1)[0] + ".weight": lazy.full()
        for name, lazy in iter_checkpoint_slices(path)
        if stored.is_scale(name)
    }

    def checkpoint_weights(module_name: str, module: nn.Module) -> list[str]:
        shards = packed_shard_ids(module) or (None,)
        return [_checkpoint_name(f"{module_name}.weight", s, mapping) for s in shards]

    quantize_stored_layers(model, stored, checkpoint_weights, scales)
    return scales


def _checkpoint_names(
    model: nn.Module, mapping: dict[str, tuple[str, str | int]]
) -> dict[str, tuple[nn.Parameter, str | int | None]]:
    """Every tensor a complete checkpoint holds: its name -> the parameter it fills and its
    shard of a packed layer. A tied LM head shares the embedding's parameter and is left out."""
    names = {}
    for target, param in model.named_parameters():  # each shared parameter once
        module = model.get_submodule(target.rpartition(".")[0])
        for shard_id in packed_shard_ids(module) or (None,):
            names[_checkpoint_name(target, shard_id, mapping)] = (param, shard_id)
    return names


def _checkpoint_name(
    target: str, shard_id: str | int | None, mapping: dict[str, tuple[str, str | int]]
) -> str:
    """The checkpoint tensor that fills ``target`` (its shard ``shard_id``)."""
    for part, (packed, shard) in mapping.items():
        if shard_id is not None and shard == shard_id and f".{packed}." in target:
            return target.replace(f".{packed}.", f".{part}.")
    return target


def _copy_whole(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    param.copy_(tensor)
