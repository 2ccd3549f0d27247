"""Turn a training checkpoint into a Hugging Face model directory (or, for a checkpoint of
Medusa heads, a heads folder: ``parallm.train.medusa_export``).

The result (config.json, model.safetensors, tokenizer, generation_config.json) loads in
transformers (``AutoModelForCausalLM``) and in parallm (``LLM(model=...)``). Runs in one
process with no process group: DCP reassembles the full tensors from any sharded layout.
"""

from __future__ import annotations

import json
import shutil
import stat
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.api import CheckpointException

from parallm.config import ModelConfig
from parallm.models.loader import build_model
from parallm.train.checkpoint import describe_error, read_train_state, resolve_checkpoint
from parallm.train.integrity import CheckpointError
from parallm.train.medusa_export import export_medusa_checkpoint, is_medusa_checkpoint

EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def load_checkpoint_model(checkpoint: Path) -> tuple[torch.nn.Module, dict]:
    """The full (unsharded) float32 model of a checkpoint on CPU, and its HF config dict."""
    hf_config = json.loads((checkpoint / "config.json").read_text())
    cfg = ModelConfig.from_dict(hf_config)
    model = build_model(cfg, torch.float32, torch.device("cpu"), cfg.max_position_embeddings)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    with warnings.catch_warnings():
        # DCP warns that it loads in one process; that is the point here.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(checkpoint), no_dist=True)
    return model, hf_config


def export_checkpoint(checkpoint: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Write the newest complete checkpoint at/under ``checkpoint`` to ``out``; returns it."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    source = resolve_checkpoint(checkpoint)
    if is_medusa_checkpoint(source):
        export_medusa_checkpoint(source, out, EXPORT_DTYPES[dtype])
        return source
    try:
        model, hf_config = load_checkpoint_model(source)
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise CheckpointError(source, f"could not be loaded: {describe_error(e)}") from None
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.to(EXPORT_DTYPES[dtype]).contiguous()
        for name, tensor in model.state_dict().items()
        if not (hf_config["tie_word_embeddings"] and name == "lm_head.weight")
    }
    hf_config = {**hf_config, "torch_dtype": dtype}
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); give the weights the
    # mode the umask gave every other file written here.
    weights.chmod(stat.S_IMODE((out / "config.json").stat().st_mode))
    generation = {
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": hf_config.get("eos_token_id"),
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if (source / "tokenizer").is_dir():
        # copyfile, not copy2: new files get the umask's mode, like the rest of the export.
        shutil.copytree(
            source / "tokenizer", out, dirs_exist_ok=True, copy_function=shutil.copyfile
        )
    state = read_train_state(source)
    (out / "training_state.json").write_text(json.dumps(state, indent=2) + "\n")
    return source
