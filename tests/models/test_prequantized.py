"""Checkpoints stored quantized (config.json ``quantization_config``): vLLM/transformers ``fp8``
(per-tensor ``weight_scale``, block-wise ``weight_scale_inv``) and llm-compressor's
``compressed-tensors`` (fp8 per tensor, per channel and per block; int8 per channel).

Each test checkpoint is a tiny random model quantized here, with the test's own quantizers,
and written with its scales in another safetensors file than its weights. A twin checkpoint
holds the dequantized float weights. Per-tensor and per-channel forms load exactly (the stored
values are kept, so the logits are the float twin's); block-wise ones requantize per row, so
they load as the float twin quantized at load with ``quantization='fp8'``. Tensor-parallel
shards take their rows (column-parallel) or columns (row-parallel) with the right scales.
Unsupported forms are refused by field.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parallm import LLM, SamplingParams
from parallm.config import ModelConfig
from parallm.layers.linear import ColumnParallelLinear, RowParallelLinear
from parallm.layers.quantization import QuantizedLinear, check_stored_quantization, quantize_model
from parallm.models.loader import CheckpointSlice, checkpoint_files, load_model

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEPT_FLOAT = "model.layers.1.mlp.down_proj.weight"  # the compressed-tensors "ignore" case


# --- the test's own quantizers (not the runtime's) ------------------------------------------


def _fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-448, 448).to(FP8)


def _per_tensor(w, kind):
    s = w.abs().amax() / 448
    return _fp8(w, s), s.reshape(())


def _per_channel(w, kind):
    if kind == "int8":
        s = w.abs().amax(dim=1, keepdim=True) / 127
        return torch.round(w / s).clamp(-127, 127).to(torch.int8), s
    s = w.abs().amax(dim=1, keepdim=True) / 448
    return _fp8(w, s), s


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    bn, bk = block
    return scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]


def _per_block(block):
    def quantize(w, kind):
        rows, cols = w.shape
        bn, bk = block
        grid = torch.zeros(math.ceil(rows / bn), math.ceil(cols / bk))
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                grid[i, j] = w[i * bn : (i + 1) * bn, j * bk : (j + 1) * bk].abs().amax() / 448
        return _fp8(w, _expand(grid, rows, cols, block)), grid

    return quantize


def _dequantized(q, scale, block=None):
    rows, cols = q.shape
    scale = scale.float()
    if block is not None:
        return q.float() * _expand(scale, rows, cols, block)
    return q.float() * (scale.reshape(-1, 1) if scale.numel() == rows else scale.reshape(()))


# --- the formats ----------------------------------------------------------------------------

CT_INPUT = {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
            "symmetric": True}  # fmt: skip


def _ct_config(kind, strategy, block=None):
    weights = {"num_bits": 8, "type": "float" if kind == "fp8" else "int", "symmetric": True,
               "strategy": strategy, "dynamic": False, "group_size": None,
               "block_structure": list(block) if block else None, "observer": "minmax"}  # fmt: skip
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized" if kind == "fp8" else "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": CT_INPUT, "output_activations": None}},
        "ignore": ["lm_head", KEPT_FLOAT.removesuffix(".weight")],
        "kv_cache_scheme": None,
        "sparsity_config": {},
    }  # fmt: skip


# name: (quant_method config, quantizer, kind, scale name, scale dtype, block, input_scale)
FORMATS = {
    "fp8-tensor": ({"quant_method": "fp8", "activation_scheme": "static"}, _per_tensor, "fp8",
                   "weight_scale", torch.float32, None, True),
    "fp8-block": ({"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                   "weight_block_size": [16, 24]}, _per_block((16, 24)), "fp8",
                  "weight_scale_inv", torch.float32, (16, 24), False),
    "fp8-block128": ({"quant_method": "fp8", "activation_scheme": "dynamic",
                      "weight_block_size": [128, 128]}, _per_block((128, 128)), "fp8",
                     "weight_scale_inv", torch.float32, (128, 128), False),
    "ct-fp8-channel": (_ct_config("fp8", "channel"), _per_channel, "fp8", "weight_scale",
                       torch.bfloat16, None, False),
    "ct-fp8-tensor": (_ct_config("fp8", "tensor"), _per_tensor, "fp8", "weight_scale",
                      torch.float32, None, False),
    "ct-fp8-block": (_ct_config("fp8", "block", (16, 32)), _per_block((16, 32)), "fp8",
                     "weight_scale", torch.bfloat16, (16, 32), False),
    "ct-int8-channel": (_ct_config("int8", "channel"), _per_channel, "int8", "weight_scale",
                        torch.float32, None, False),
}  # fmt: skip
# 128 x 128 blocks over the tiny model's matrices (64 to 128 rows and columns) are one block
# each: a per-tensor scale, loaded exactly.
BLOCKWISE = ["fp8-block", "ct-fp8-block"]
EXACT = [f for f in FORMATS if f not in BLOCKWISE]


def _float_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in checkpoint_files(path):
        tensors.update(load_file(str(file)))
    return tensors


def write_checkpoints(src: Path, dst: Path, fmt: str, lm_head: bool = False) -> tuple[Path, Path]:
    """``(quantized, dequantized float twin)`` checkpoint directories made from ``src``; with
    ``lm_head`` the LM head is stored quantized too."""
    config, quantize, kind, scale_name, scale_dtype, block, input_scale = FORMATS[fmt]
    ct = config["quant_method"] == "compressed-tensors"
    weights, scales, dequantized = {}, {}, {}
    for name, w in _float_tensors(src).items():
        stem = name.removesuffix(".weight")
        linear = stem.split(".")[-1] in LINEARS or (lm_head and name == "lm_head.weight")
        if not (name.endswith(".weight") and linear) or (ct and name == KEPT_FLOAT):
            weights[name] = dequantized[name] = w
            continue
        q, s = quantize(w.float(), kind)
        s = s.to(scale_dtype)
        weights[name], scales[f"{stem}.{scale_name}"] = q, s
        if input_scale:
            scales[f"{stem}.input_scale"] = torch.tensor(0.02)
        dequantized[name] = _dequantized(q, s, block)
    quant_dir, float_dir = dst / f"{fmt}-quantized", dst / f"{fmt}-float"
    for out, tensors in ((quant_dir, None), (float_dir, dequantized)):
        shutil.copytree(src, out)
        for file in checkpoint_files(out):
            file.unlink()
        (out / "model.safetensors.index.json").unlink(missing_ok=True)
        if tensors is not None:
            save_file(tensors, str(out / "model.safetensors"))
    files = {"model-00001-of-00002.safetensors": weights,
             "model-00002-of-00002.safetensors": scales}  # fmt: skip
    for file, tensors in files.items():
        save_file(tensors, str(quant_dir / file))
    weight_map = {n: f for f, tensors in files.items() for n in tensors}
    (quant_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = json.loads((quant_dir / "config.json").read_text())
    cfg["quantization_config"] = config
    (quant_dir / "config.json").write_text(json.dumps(cfg))
    return quant_dir, float_dir


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """``checkpoints(fmt, arch="qwen2") -> (quantized dir, float twin dir)``, built once each."""
    built = {}

    def get(fmt, arch="qwen2", lm_head=False):
        if (fmt, arch, lm_head) not in built:
            dst = tmp_path_factory.mktemp(f"{arch}-{fmt}")
            built[fmt, arch, lm_head] = write_checkpoints(tiny_model_dir(arch), dst, fmt, lm_head)
        return built[fmt, arch, lm_head]

    return get


def _load(path, **kwargs):
    return load_model(path, ModelConfig.from_path(path), torch.float32, CPU, 512, packed=True,
                      **kwargs)  # fmt: skip


def _logits(model, prompts):
    with torch.no_grad():
        return [model.compute_logits(model(torch.tensor([p])))[0] for p in prompts]


def _quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


# --- loading --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", EXACT)
def test_per_tensor_and_per_channel_scales_load_exactly(checkpoints, prompts, fmt):
    """The stored values are kept and each row gets its scale: the model computes with the
    float twin's weights, so its logits are the twin's (qwen2: q/k/v biases too)."""
    quant_dir, float_dir = checkpoints(fmt)
    model, twin = _load(quant_dir), _load(float_dir)
    layers = _quantized_layers(model)
    kind = FORMATS[fmt][2]
    ct = FORMATS[fmt][0]["quant_method"] == "compressed-tensors"
    assert len(layers) == 2 * 4 - ct  # the kept-float down_proj of compressed-tensors' ignore
    for name, layer in layers.items():
        assert layer.weight.dtype == (FP8 if kind == "fp8" else torch.int8), name
        assert layer.weight_format.name == kind
    if ct:
        down = model.model.layers[1].mlp.down_proj
        assert not isinstance(down, QuantizedLinear) and down.weight.dtype == torch.float32
    twin_params = dict(twin.named_parameters())
    for name, layer in layers.items():
        want = twin_params[f"{name}.weight"]
        got = layer.weight_format.dequantize(layer.weight, layer.weight_scale, torch.float32)
        assert torch.equal(got, want), name
    for got, want in zip(_logits(model, prompts), _logits(twin, prompts), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", BLOCKWISE)
def test_block_scales_requantize_per_row_like_online_fp8(checkpoints, prompts, fmt):
    """Block-wise weights are dequantized and requantized per row at load: exactly the float
    twin quantized at load, within e4m3 rounding of the stored weights."""
    quant_dir, float_dir = checkpoints(fmt)
    model, twin = _load(quant_dir), _load(float_dir)
    online = _load(float_dir)
    quantize_model(online, "fp8")
    ct = FORMATS[fmt][0]["quant_method"] == "compressed-tensors"
    if ct:  # the kept-float layer is float in the stored model, fp8 in the online one
        online.model.layers[1].mlp.down_proj = twin.model.layers[1].mlp.down_proj
    want = online.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name].view(torch.uint8), tensor.view(torch.uint8)), name
    twin_params = dict(twin.named_parameters())
    for name, layer in _quantized_layers(model).items():
        stored = twin_params[f"{name}.weight"]
        back = layer.weight_format.dequantize(layer.weight, layer.weight_scale, torch.float32)
        bound = 2.0**-4 * stored.abs() + 2.0**-10 * layer.weight_scale[:, None] + 1e-7
        assert ((back - stored).abs() <= bound).all(), name
    rel = [float((a - b).norm() / b.norm())
           for a, b in zip(_logits(model, prompts), _logits(twin, prompts), strict=True)]  # fmt: skip
    assert 0 < max(rel) < 0.35  # the online fp8 bound of tests/layers/test_quantization.py


@pytest.mark.parametrize("fmt", ["fp8-tensor", "fp8-block", "ct-int8-channel"])
def test_a_stored_quantized_lm_head_loads_dequantized(checkpoints, prompts, fmt):
    """The runtime keeps the LM head float: stored quantized (qwen2's own, untied), it loads as
    its dequantized values, block-wise ones without a second rounding; on two ranks each takes
    its vocabulary rows of them."""
    quant_dir, float_dir = checkpoints(fmt, lm_head=True)
    model, twin = _load(quant_dir), _load(float_dir)
    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, twin.lm_head.weight)
    shard = _load(quant_dir, tp_rank=1, tp_size=2)
    rows = shard.lm_head.weight.shape[0]
    assert torch.equal(shard.lm_head.weight, twin.lm_head.weight[rows : 2 * rows])
    if fmt in EXACT:
        for got, want in zip(_logits(model, prompts[:2]), _logits(twin, prompts[:2]), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp8-tensor", "ct-fp8-channel", "ct-int8-channel", "fp8-block"])
def test_tensor_parallel_shards_take_their_rows_and_scales(checkpoints, fmt, monkeypatch):
    """Each rank of two holds the column-parallel rows (with their scales) and row-parallel
    columns (with every row's scale) of the one-rank model; per-tensor and per-channel shards
    read only their slices of the weight matrices."""
    quant_dir, _ = checkpoints(fmt)
    whole = _load(quant_dir)
    read_whole, full = [], CheckpointSlice.full

    def spy(self):
        read_whole.append(tuple(self.shape))
        return full(self)

    monkeypatch.setattr(CheckpointSlice, "full", spy)
    for rank in range(2):
        shard = _load(quant_dir, tp_rank=rank, tp_size=2)
        whole_layers = _quantized_layers(whole)
        shard_layers = _quantized_layers(shard)
        assert shard_layers.keys() == whole_layers.keys()
        for name, mine in shard_layers.items():
            full_layer = whole_layers[name]
            if isinstance(mine, RowParallelLinear):
                n = mine.weight.shape[1]
                want_w = full_layer.weight[:, rank * n : (rank + 1) * n]
                want_s = full_layer.weight_scale
            else:
                assert isinstance(mine, ColumnParallelLinear)
                want_w, want_s = _column_rows(full_layer, rank)
            assert torch.equal(mine.weight.view(torch.uint8), want_w.view(torch.uint8)), name
            assert torch.equal(mine.weight_scale, want_s), name
    # Scales are read whole by design (scalars, [N] or [N, 1] vectors, block grids).
    matrices = [shape for shape in read_whole if len(shape) == 2 and min(shape) >= 32]
    if fmt in EXACT:
        assert matrices == []
    else:
        assert matrices  # block-wise weights are requantized whole


def _column_rows(layer, rank):
    """Rank ``rank``'s rows (of two) of a column-parallel layer, packed parts split alike."""
    parts_w, parts_s, offset = [], [], 0
    for size in getattr(layer, "output_sizes", [layer.weight.shape[0]]):
        half = size // 2  # q: 2 of 4 heads, k and v: 1 of 2, gate and up: half their rows
        parts_w.append(layer.weight[offset + rank * half : offset + (rank + 1) * half])
        parts_s.append(layer.weight_scale[offset + rank * half : offset + (rank + 1) * half])
        offset += size
    return torch.cat(parts_w), torch.cat(parts_s)


ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 8 << 20,
          "enforce_eager": True, "max_model_len": 128}  # fmt: skip
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def test_the_engine_serves_a_stored_fp8_checkpoint_on_one_and_two_ranks(checkpoints, prompts):
    """``LLM`` infers the format from config.json (quantization unset, or the same format),
    names it in the summary, and generates the float twin's greedy tokens; two ranks (gloo)
    generate the same tokens."""
    quant_dir, float_dir = checkpoints("ct-fp8-channel", arch="qwen3")
    batch = [{"prompt_token_ids": p} for p in prompts[:3]]

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY, use_tqdm=False)]

    llm = LLM(str(quant_dir), **ENGINE)
    assert "quantization=fp8 (stored compressed-tensors checkpoint" in llm.engine.summary()
    assert _quantized_layers(llm.engine.runner.model)
    want = run(LLM(str(float_dir), **ENGINE))
    assert run(llm) == want
    assert run(LLM(str(quant_dir), quantization="fp8", **ENGINE)) == want
    sharded = LLM(str(quant_dir), tensor_parallel_size=2, **ENGINE)
    try:
        assert run(sharded) == want
    finally:
        sharded.close()


# --- refusals -------------------------------------------------------------------------------


def _with_config(checkpoints, tmp_path, fmt, change):
    quant_dir, _ = checkpoints(fmt)
    path = shutil.copytree(quant_dir, tmp_path / "changed")
    cfg = json.loads((path / "config.json").read_text())
    change(cfg["quantization_config"])
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _set(**values):
    return lambda quant: quant.update(values)


def _set_weights(**values):
    return lambda quant: quant["config_groups"]["group_0"]["weights"].update(values)


REFUSED = [
    ("fp8-tensor", _set(quant_method="gptq"),
     r"quant_method 'gptq' is not supported; .* \['fp8', 'compressed-tensors'\]"),
    ("fp8-tensor", _set(quant_method="awq"), r"quant_method 'awq' is not supported"),
    ("fp8-tensor", _set(activation_scheme="per-layer"), r"activation_scheme must be 'dynamic'"),
    ("fp8-tensor", _set(fmt="e5m2"), r"fmt must be 'e4m3' \(quant_method 'fp8'\), got 'e5m2'"),
    ("fp8-block", _set(weight_block_size=[128]), r"weight_block_size must be two positive"),
    ("ct-fp8-channel", _set(format="pack-quantized"),
     r"format must be one of \['float-quantized', 'int-quantized'\].*'pack-quantized'"),
    ("ct-fp8-channel", _set(sparsity_config={"format": "sparse-24-bitmask"}),
     r"sparsity_config is not supported"),
    ("ct-fp8-channel", _set_weights(strategy="group", group_size=128),
     r"config_groups.group_0.weights.strategy must be one of \['tensor', 'channel', 'block'\]"),
    ("ct-fp8-channel", _set_weights(symmetric=False), r"weights.symmetric must be True"),
    ("ct-fp8-channel", _set_weights(num_bits=4), r"weights.num_bits must be 8"),
    ("ct-fp8-channel", _set_weights(type="int"),
     r"weights.type must be 'float' \(format 'float-quantized'\)"),
    ("ct-fp8-block", _set_weights(block_structure=None), r"block_structure must be two"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "change", "message"), REFUSED)
def test_unsupported_forms_are_refused_by_field_before_loading(
    checkpoints, tmp_path, monkeypatch, fmt, change, message
):
    path = _with_config(checkpoints, tmp_path, fmt, change)
    cfg = ModelConfig.from_path(path)
    with pytest.raises(ValueError, match=message):
        check_stored_quantization(None, cfg.raw)
    monkeypatch.setattr("parallm.models.loader.build_model", _no_loading)
    with pytest.raises(ValueError, match=message):
        load_model(path, cfg, torch.float32, CPU, 128)
    with pytest.raises(ValueError, match=message):
        LLM(str(path), **ENGINE)


def _no_loading(*args, **kwargs):
    raise AssertionError("the model was built before the refusal")


def test_another_quantization_argument_is_refused_before_loading(checkpoints, monkeypatch):
    quant_dir, _ = checkpoints("fp8-tensor")
    monkeypatch.setattr("parallm.engine.engine.load_model", _no_loading)
    message = (r"quantization='int8' does not match the checkpoint, stored quantized as fp8 "
               r"\(quantization_config quant_method 'fp8'\)")  # fmt: skip
    with pytest.raises(ValueError, match=message):
        LLM(str(quant_dir), quantization="int8", **ENGINE)


def _with_tensor(checkpoints, tmp_path, fmt, file, name, change):
    """A copy of the ``fmt`` checkpoint whose tensor ``name`` (in ``file``) is ``change``d."""
    quant_dir, _ = checkpoints(fmt)
    path = shutil.copytree(quant_dir, tmp_path / "changed")
    tensors = load_file(str(path / file))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path / file))
    return path


def test_a_scale_that_fits_no_form_is_refused_by_tensor(checkpoints, tmp_path):
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    path = _with_tensor(checkpoints, tmp_path, "ct-fp8-channel",
                        "model-00002-of-00002.safetensors", name, lambda s: s[:5])  # fmt: skip
    with pytest.raises(ValueError, match=r"o_proj.weight'.*scale of shape \(5, 1\) does not fit "
                                         r"the weight \(64, 64\); supported: one per tensor, "
                                         r"one per output row"):  # fmt: skip
        _load(path)


def test_weights_of_another_dtype_are_refused_by_tensor(checkpoints, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    path = _with_tensor(checkpoints, tmp_path, "fp8-tensor", "model-00001-of-00002.safetensors",
                        name, lambda w: w.to(torch.bfloat16))  # fmt: skip
    with pytest.raises(ValueError, match=r"up_proj.weight' is torch.bfloat16; quant_method "
                                         r"'fp8' stores fp8 weights as torch.float8_e4m3fn"):  # fmt: skip
        _load(path)


def test_a_config_claiming_quantization_without_scales_is_refused(tiny_model_dir, tmp_path):
    path = shutil.copytree(tiny_model_dir("llama2"), tmp_path / "no-scales")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"quant_method 'fp8', but no linear layer's weight "
                                         r"has a scale tensor"):  # fmt: skip
        LLM(str(path), **ENGINE)
