"""The Medusa drafter: heads on the target's hidden state propose draft trees that the target
verifies in one step. With random heads the output stays plain decoding's (greedy and seeded,
batches, n > 1, chunked prefill, prefix caching, min_tokens), no KV block leaks, the heads read
the hidden state of the row each sequence's last token was sampled from, and bad configs are
refused before loading."""

from __future__ import annotations

import pytest
import torch
from test_speculative import ENGINE, _repetitive_prompts, _tokens
from tiny_models import _load_hf_model

from parallm import LLM, SamplingParams
from parallm.engine.spec.config import SpeculativeConfig
from parallm.engine.spec.medusa import MedusaProposer, default_tree_paths
from parallm.engine.spec.medusa_heads import MedusaConfig, MedusaHeads, save_medusa_heads


def _heads_dir(tmp_path, llm: LLM, num_heads: int = 3, seed: int = 0):
    """Random heads whose projections start at the target's LM head (as Medusa's training
    starts them), with random residual blocks: they guess often enough to be accepted."""
    cfg = llm.engine.model_config
    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig(cfg.hidden_size, cfg.vocab_size, num_heads, 1))
    heads.init_projections_from(llm.engine.runner.model.lm_head.weight.detach())
    for block in heads.medusa_head:
        torch.nn.init.normal_(block[0].linear.weight, std=0.05)
    out = tmp_path / f"heads-{num_heads}-{seed}"
    save_medusa_heads(heads, out)
    return str(out)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    return LLM(str(tiny_model_dir("llama3")), **ENGINE)


def _spec(heads: str, k: int = 3, **extra) -> dict:
    return {"method": "medusa", "model": heads, "num_speculative_tokens": k, **extra}


@pytest.mark.parametrize("tree", [None, "chain", [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]])
def test_medusa_trees_give_plain_decodings_tokens(tree, plain, tiny_model_dir, tmp_path,
                                                  ordinary_token_ids):  # fmt: skip
    path = str(tiny_model_dir("llama3"))
    heads = _heads_dir(tmp_path, plain)
    extra = {} if tree is None else {"speculative_token_tree": tree}
    llm = LLM(path, speculative_config=_spec(heads, **extra), **ENGINE)
    free = llm.engine.kv.num_free_blocks
    prompts = _repetitive_prompts(ordinary_token_ids)
    for params in (
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0.8, max_tokens=30, ignore_eos=True, seed=7, n=2),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=10),
    ):
        assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params), params
    stats = llm.engine.stats
    assert stats["spec_draft_tokens"] > 0 and stats["spec_accepted_tokens"] > 0
    assert llm.engine.kv.num_free_blocks == free


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_heads_read_the_hidden_state_that_sampled_the_last_token(
    async_scheduling, plain, tiny_model_dir, tmp_path, ordinary_token_ids, monkeypatch
):
    """Every observed hidden state is the target's final (normed) hidden state at the
    sequence's second-to-last token, as transformers computes it over the same tokens; with
    async scheduling also after the steps of three sequences, which run ahead undrafted, and
    the steps that drop a finished sequence."""
    path = str(tiny_model_dir("llama3"))
    heads = _heads_dir(tmp_path, plain)
    spec = _spec(heads, disable_by_batch_size=2) if async_scheduling else _spec(heads)
    llm = LLM(path, speculative_config=spec, async_scheduling=async_scheduling, **ENGINE)
    seen = []
    observe = MedusaProposer.observe

    def spy(self, seqs, hidden):
        seen.extend((list(s.token_ids), h.clone()) for s, h in zip(seqs, hidden, strict=True))
        observe(self, seqs, hidden)

    monkeypatch.setattr(MedusaProposer, "observe", spy)
    prompts = _repetitive_prompts(ordinary_token_ids)[:3]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (6, 12, 24)]
    assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params)
    assert llm.engine.stats["spec_accepted_tokens"] > 0  # some steps emitted several tokens
    assert (llm.engine.num_overlapped_steps > 0) == async_scheduling
    hf = _load_hf_model(path)
    for tokens, hidden in seen[::3]:
        with torch.no_grad():
            out = hf(torch.tensor([tokens[:-1]]), output_hidden_states=True)
        torch.testing.assert_close(hidden, out.hidden_states[-1][0, -1], rtol=1e-4, atol=1e-4)


def test_default_trees():
    for k in (1, 2, 3, 4):
        paths = default_tree_paths(k)
        assert len(paths) == {1: 4, 2: 12, 3: 20, 4: 28}[k]
        assert all((0,) * d in paths for d in range(1, k + 1))  # the top-1 chain
        assert all(len(p) == 1 or p[:-1] in paths for p in paths)
        assert max(map(len, paths)) == k
    assert len(default_tree_paths(8)) == 60


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"speculative_token_tree": [(0,), (0, 0, 0)]}, "lack their parent paths"),
        ({"speculative_token_tree": [(0,), (0, 0, 0, 0)]}, "each path must be 1 to"),
        ({"speculative_token_tree": "[(0,), (0,"}, "must be a list of index paths"),
        ({"speculative_token_tree": [(0,), (0,)]}, "at most 64 distinct paths"),
        ({"num_layers": 2}, "num_layers is for method 'layer_skip' only"),
    ],
)
def test_bad_medusa_configs_are_named(extra, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_value(_spec("heads", **extra))
    with pytest.raises(ValueError, match="speculative_config.model is required for method"):
        SpeculativeConfig.from_value({"method": "medusa", "num_speculative_tokens": 2})


def test_heads_that_do_not_fit_are_refused_before_the_target_loads(
    plain, tiny_model_dir, tmp_path, monkeypatch
):
    path = str(tiny_model_dir("llama3"))
    heads = _heads_dir(tmp_path, plain, num_heads=2)
    from parallm.engine import engine as engine_module

    def no_load(self):
        raise AssertionError("the target loaded")

    monkeypatch.setattr(engine_module.LLMEngine, "_load_model", no_load)
    with pytest.raises(ValueError, match="must be <= the number of Medusa heads"):
        LLM(path, speculative_config=_spec(heads, k=3), **ENGINE)
    with pytest.raises(ValueError, match="speculative_config.model: .* is neither a local dir"):
        LLM(path, speculative_config=_spec(str(tmp_path / "missing")), **ENGINE)
    with pytest.raises(ValueError, match="'medusa' does not run with tensor_parallel_size > 1"):
        LLM(path, speculative_config=_spec(heads, k=2), tensor_parallel_size=2, **ENGINE)
    cfg = plain.engine.model_config
    wide = tmp_path / "wide"
    save_medusa_heads(MedusaHeads(MedusaConfig(cfg.hidden_size * 2, cfg.vocab_size, 3)), wide)
    with pytest.raises(ValueError, match="hidden_size=128, but the target model has"):
        LLM(path, speculative_config=_spec(str(wide)), **ENGINE)


@pytest.mark.gpu
def test_medusa_on_cuda_with_triton_attention_is_lossless(
    tiny_model_dir, tmp_path, ordinary_token_ids
):
    """Tree steps through the Triton backend (the tree attention kernel) and the KV move on
    the GPU give plain decoding's greedy tokens (float32: a multi-token step's rounding then
    stays far below the tiny model's logit gaps)."""
    path = str(tiny_model_dir("llama3"))
    gpu = dict(ENGINE, device="cuda", dtype="float32", attention_backend="triton")
    plain = LLM(path, **gpu)
    llm = LLM(path, speculative_config=_spec(_heads_dir(tmp_path, plain)), **gpu)
    prompts = _repetitive_prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    assert _tokens(llm, prompts, params) == _tokens(plain, prompts, params)
    assert llm.engine.stats["spec_accepted_tokens"] > 0
