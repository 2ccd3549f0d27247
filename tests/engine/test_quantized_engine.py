"""``LLM(quantization=...)``, ``--quantization`` and ``kv_cache_dtype``: the engine generates
from quantized weights on CPU, refuses bad values before loading, keeps the batch-1 Triton
chain away from quantized weights, and (on the bundled trained model) stays close to the float
model in loss and greedy tokens."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from bundled_quality import CODE_PROMPTS, held_out_rows, needs_bundled

from parallm import LLM, SamplingParams
from parallm.bundled import BUNDLED_MODEL_DIR
from parallm.commands.engine_args import add_engine_args, engine_kwargs
from parallm.config import EngineConfig, ModelConfig
from parallm.layers.quantization import QUANTIZATION_METHODS, is_quantized, quantize_model
from parallm.models.loader import load_model

CPU_ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_memory": 16 << 20,
              "enforce_eager": True, "max_model_len": 512}  # fmt: skip
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _generate(llm: LLM, prompts) -> list[list[int]]:
    outs = llm.generate(list(prompts), GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(a))


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_the_engine_generates_from_quantized_weights(tiny_model_dir, prompts, arch, method):
    """Paged prefill and decode over the quantized model give the tokens its plain forward
    picks; the greedy agreement with the float engine is reported (on these random tiny models
    the top two logits are often close, so it is no quality measure: see the bundled test)."""
    path = tiny_model_dir(arch)
    llm = LLM(str(path), quantization=method, kv_cache_dtype="auto", **CPU_ENGINE)
    assert is_quantized(llm.engine.runner.model)
    assert f"quantization={method} " in llm.engine.summary()
    batch = [{"prompt_token_ids": p} for p in prompts]
    tokens = _generate(llm, batch)
    reference = load_model(path, ModelConfig.from_path(path), torch.float32,
                           torch.device("cpu"), 512, packed=True)  # fmt: skip
    quantize_model(reference, method)
    for prompt, new in zip(prompts, tokens, strict=True):
        ids = torch.tensor([prompt + new])
        with torch.no_grad():
            picks = reference.compute_logits(reference(ids))[0, len(prompt) - 1 : -1].argmax(-1)
        assert picks.tolist() == new
    plain = _generate(LLM(str(path), **CPU_ENGINE), batch)
    agreement = sum(map(_common_prefix, plain, tokens)) / (NEW_TOKENS * len(prompts))
    print(f"{arch} {method}: greedy agreement with float over {NEW_TOKENS} tokens {agreement:.2f}")


# --- quality on the bundled trained model ---------------------------------------------------

# Held-out text (bundled_quality.held_out_rows): eight 512-token rows. Measured: loss 4.496
# in float, int8 -0.02%, fp8 +0.03%. The bounds are issue 17's quality targets for the real models.
LOSS_REL_BOUND = {"int8": 0.005, "fp8": 0.01}
# Greedy tokens equal to the float model's before the first difference, over the first 16
# tokens of the six code prompts: measured int8 0.875, fp8 0.73 (one early flip on a prompt
# costs 1/6). Floors leave one more flipped prompt.
GREEDY_AGREEMENT_FLOOR = {"int8": 0.7, "fp8": 0.55}


def _held_out_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model.compute_logits(model(ids[:, :-1]))
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()))


@needs_bundled
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_bundled_model_quantized_keeps_its_loss_and_greedy_tokens(method):
    plain = LLM(str(BUNDLED_MODEL_DIR), **CPU_ENGINE)
    quant = LLM(str(BUNDLED_MODEL_DIR), quantization=method, **CPU_ENGINE)
    chunks = torch.tensor(held_out_rows(plain.get_tokenizer()))
    want = _held_out_loss(plain.engine.runner.model, chunks)
    got = _held_out_loss(quant.engine.runner.model, chunks)
    a, b = _generate(plain, CODE_PROMPTS), _generate(quant, CODE_PROMPTS)
    agreement = sum(map(_common_prefix, a, b)) / (NEW_TOKENS * len(CODE_PROMPTS))
    print(f"bundled {method}: held-out loss {want:.4f} -> {got:.4f} "
          f"({(got / want - 1) * 100:+.3f}%), greedy agreement {agreement:.2f}")  # fmt: skip
    assert abs(got / want - 1) <= LOSS_REL_BOUND[method]
    assert agreement >= GREEDY_AGREEMENT_FLOOR[method]


# --- bad values, the command line, the batch-1 chain ----------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": "int4"}, r"quantization must be one of \['fp8', 'int8'\] or None"),
        ({"quantization": "FP8"}, r"quantization must be one of"),
        ({"kv_cache_dtype": "float16"}, r"kv_cache_dtype must be one of \['auto', 'fp8'"),
    ],
)
def test_bad_values_are_refused_before_loading(tmp_path, kwargs, message):
    missing = tmp_path / "no-such-model"  # loading it would fail with another message
    with pytest.raises(ValueError, match=message):
        LLM(str(missing), **kwargs)
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_engine_args(parser)
    return parser


def test_command_line_flags(capsys):
    args = _parser().parse_args(["--model", "m", "--quantization", "fp8"])
    kwargs = engine_kwargs(args)
    assert kwargs["quantization"] == "fp8" and kwargs["kv_cache_dtype"] == "auto"
    assert engine_kwargs(_parser().parse_args(["--model", "m"]))["quantization"] is None
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "m", "--quantization", "int4"])
    assert "--quantization: invalid choice: 'int4'" in capsys.readouterr().err
    help_text = " ".join(_parser().format_help().split())
    assert "--quantization {fp8,int8}" in help_text and "(default: None" in help_text


@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_the_batch_one_triton_chain_takes_quantized_weights(tiny_model_dir, method):
    """The chain's GEMVs read the quantized projections with their scales (their results:
    tests/kernels/test_quant_gemv_chain.py)."""
    pytest.importorskip("triton")
    from parallm.engine.one_row_step import supports_one_row_step
    from parallm.layers.backends import TritonAttention

    path = tiny_model_dir("llama3")  # no q/k/v bias, so the chain takes the model
    model = load_model(path, ModelConfig.from_path(path), torch.float32, torch.device("cpu"),
                       512, packed=True)  # fmt: skip
    quantize_model(model, method)
    assert supports_one_row_step(model, TritonAttention())


@pytest.mark.gpu
@pytest.mark.parametrize("method", QUANTIZATION_METHODS)
def test_quantized_weights_on_cuda_give_the_reference_tokens(tiny_model_dir, prompts, method):
    """Triton attention and CUDA graphs (batch 1 through the one-row chain, whose GEMVs read
    the quantized weights) give the eager reference path's tokens, batched and alone."""
    path = str(tiny_model_dir("llama3"))
    common = {"dtype": "float32", "device": "cuda", "kv_cache_memory": 64 << 20,
              "quantization": method}  # fmt: skip
    fast = LLM(path, **common)
    graphs = fast.engine.runner.graphs
    assert graphs is not None and graphs.one_row is not None
    ref = LLM(path, attention_backend="reference", enforce_eager=True, **common)
    batch = [{"prompt_token_ids": p} for p in prompts]
    assert _generate(fast, batch) == _generate(ref, batch)
    assert _generate(fast, batch[-1:]) == _generate(ref, batch[-1:])
