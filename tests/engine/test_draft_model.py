"""Drafts from a draft model ("draft_model") and from the target's first layers ("layer_skip"):
greedy output token-identical to plain decoding, and seeded sampled output too where drafts are
argmax drafts (layer_skip); draft_model samples its drafts for sampled requests, which the
target verifies by speculative sampling (tests/engine/test_sampled_drafts.py checks the
distribution), so those are checked to reproduce instead (float32, CPU, chunked prefill and
prefix caching on, concurrent prompts, preemption); the draft's own KV cache follows each
sequence through rejections and empties when requests end; the target's blocks all come back;
bad configurations are refused before the target loads."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from parallm import LLM, SamplingParams
from parallm.engine.kv_cache import KVCacheManager
from parallm.engine.runner import kv_bytes_per_block
from parallm.engine.spec.draft_model import DraftModelProposer

ENGINE = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, block_size=16,
              max_num_batched_tokens=64, enable_prefix_caching=True)  # fmt: skip
# The tiny families with one tokenizer (byte-level BPE), so each can draft for another.
LAYERS = {"llama3": 2, "qwen2": 2, "qwen3": 3}


def _prompts(ordinary_token_ids: list[int], copies: int = 1) -> list[list[int]]:
    """A repeating pattern, a shared prefix (prefix-cache hits), a long prompt (chunked
    prefill: 150 tokens over a 64-token step budget) and short ones."""
    rng = random.Random(11)
    pattern = rng.choices(ordinary_token_ids, k=5)
    shared = rng.choices(ordinary_token_ids, k=40)
    prompts = [
        pattern * 6,
        shared + rng.choices(ordinary_token_ids, k=7),
        shared + pattern,
        rng.choices(ordinary_token_ids, k=150),
        rng.choices(ordinary_token_ids, k=2),
    ]
    return prompts * copies


def _mixed_params(num: int, max_tokens: int = 32) -> list[SamplingParams]:
    """Greedy and seeded sampled requests side by side."""
    return [
        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(
            temperature=0.8, top_p=0.95, seed=i, max_tokens=max_tokens, ignore_eos=True
        )  # fmt: skip
        for i in range(num)
    ]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _assert_plain_where_exact(method: str, got, plain, params: list[SamplingParams]) -> None:
    """Every request's tokens are plain decoding's, except sampled requests of draft_model
    (speculative sampling keeps the distribution, not the tokens): those only have as many."""
    exact = [method != "draft_model" or p.temperature == 0 for p in params]
    pairs = list(zip(got, plain, exact, strict=True))
    assert [g for g, _, e in pairs if e] == [p for _, p, e in pairs if e]
    assert [len(g) for g in got] == [len(p) for p in plain]
    if not all(exact):  # sampled drafts take other tokens (seeded runs would coincide else)
        assert [g for g, _, e in pairs if not e] != [p for _, p, e in pairs if not e]


def _spec(method: str, draft: str, num_layers: int, k: int = 4) -> dict:
    if method == "draft_model":
        return {"method": method, "model": draft, "num_speculative_tokens": k}
    return {"method": method, "num_layers": num_layers, "num_speculative_tokens": k}


def _assert_nothing_held(llm: LLM, target_free: int) -> None:
    engine = llm.engine
    assert engine.kv.num_free_blocks == target_free  # rejected drafts' target blocks came back
    draft = engine.draft_model
    assert not draft.mirrors
    assert draft.kv.num_free_blocks == draft.kv.num_blocks


@pytest.mark.parametrize(
    ("arch", "method", "draft_arch", "num_layers"),
    [
        ("llama3", "draft_model", "qwen2", None),
        ("qwen3", "draft_model", "llama3", None),
        ("llama3", "layer_skip", None, 1),
        ("qwen3", "layer_skip", None, 1),
    ],
)  # fmt: skip
def test_output_is_plain_decodings(
    arch, method, draft_arch, num_layers, tiny_model_dir, ordinary_token_ids
):
    """Another family's tiny model, or the target's first layer, drafts: most drafts are
    wrong, every rejection rolls the draft cache back, and the tokens are plain decoding's
    (but for sampled requests of draft_model)."""
    path = str(tiny_model_dir(arch))
    draft = str(tiny_model_dir(draft_arch)) if draft_arch else ""
    prompts = _prompts(ordinary_token_ids)
    params = _mixed_params(len(prompts))
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = LLM(path, speculative_config=_spec(method, draft, num_layers), **ENGINE)
    free = llm.engine.kv.num_free_blocks
    _assert_plain_where_exact(method, _tokens(llm, prompts, params), plain, params)
    stats = llm.engine.stats
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]
    _assert_nothing_held(llm, free)
    # Again on the same engine: new sequences get new mirrors in the emptied draft cache.
    _assert_plain_where_exact(method, _tokens(llm, prompts, params), plain, params)
    _assert_nothing_held(llm, free)


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_the_target_as_its_own_draft_accepts_every_greedy_draft(
    arch, tiny_model_dir, ordinary_token_ids
):
    """The same checkpoint drafting for itself proposes exactly the target's greedy tokens:
    only possible when the draft cache holds each sequence's tokens at the right positions
    after every step (prompt chunks, accepted runs, bonus tokens)."""
    path = str(tiny_model_dir(arch))
    prompts = _prompts(ordinary_token_ids)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain_llm = LLM(path, **ENGINE)
    plain = _tokens(plain_llm, prompts, params)
    llm = LLM(path, speculative_config=_spec("draft_model", path, 0), **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    stats = llm.engine.stats
    assert stats["spec_draft_tokens"] > 0
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
    assert llm.engine.num_steps < plain_llm.engine.num_steps
    _assert_nothing_held(llm, free)


def test_the_draft_cache_follows_steps_that_ran_ahead(tiny_model_dir, ordinary_token_ids):
    """With async scheduling, the steps of more than ``disable_by_batch_size`` sequences run
    ahead undrafted; the draft model catches up on their tokens when drafting resumes, which
    the target drafting for itself shows: every greedy draft is accepted."""
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts(ordinary_token_ids, copies=2)
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    spec = {**_spec("draft_model", path, 0), "disable_by_batch_size": 3}
    llm = LLM(path, speculative_config=spec, async_scheduling=True, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] > 0 and stats["spec_draft_tokens"] > 0
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
    _assert_nothing_held(llm, free)


def test_drafts_after_rejections_and_skipped_steps_follow_the_sequence(
    tiny_model_dir, ordinary_token_ids, monkeypatch
):
    """Another family's model drafts for sampled requests, and every third step is not drafted
    (as a throttle or ``disable_by_batch_size`` would do): drafts are rejected often, and
    sequences move on several tokens between proposals, so the draft cache must be rolled back
    to the last token it shares with each sequence. The distribution each draft was sampled
    from must still be the draft model's after the sequence's current tokens and the drafts
    before it: its argmax is what a plain engine of the draft model, computing from scratch,
    takes greedily there."""
    from parallm.engine.spec import drafting

    path, draft_path = str(tiny_model_dir("qwen3")), str(tiny_model_dir("qwen2"))
    proposals: list[tuple[int, list[int], list[int], list[int]]] = []
    real_propose = DraftModelProposer.propose

    def recording(self, seqs):
        real_propose(self, seqs)
        for s in seqs:
            modes = [] if s.draft_probs is None else s.draft_probs.argmax(dim=-1).tolist()
            proposals.append((s.seq_id, list(s.token_ids), list(s.draft_token_ids), modes))

    calls = itertools.count()
    real_drafter = drafting.Drafter.propose

    def two_steps_in_three(self, running):
        if next(calls) % 3 != 2:
            real_drafter(self, running)

    monkeypatch.setattr(DraftModelProposer, "propose", recording)
    monkeypatch.setattr(drafting.Drafter, "propose", two_steps_in_three)
    prompts = _prompts(ordinary_token_ids)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    spec_llm = LLM(path, speculative_config=_spec("draft_model", draft_path, 0, k=3), **ENGINE)
    _tokens(spec_llm, prompts, params)
    stats = spec_llm.engine.stats
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    # Proposals for a sequence that moved off its last drafts (a rejection, or a step without
    # drafts after them): the ones a draft cache that is not rolled back gets wrong.
    checked, last = [], {}
    for seq_id, tokens, drafts, modes in proposals:
        assert len(modes) == len(drafts)  # every proposal for a sampled request carries q
        if seq_id in last and drafts:
            before, proposed = last[seq_id]
            if tokens[: len(before) + len(proposed)] != before + proposed:
                checked.append((tokens, drafts, modes))
        last[seq_id] = (tokens, drafts)
    assert len(checked) >= 10
    contexts = [tokens + drafts[:i] for tokens, drafts, _ in checked for i in range(len(drafts))]
    modes = [[m] for _, _, m in checked for m in m]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    assert _tokens(LLM(draft_path, **ENGINE), contexts, one) == modes
    # The drafts were sampled, not the draft's argmax each time.
    assert any(d != m for _, drafts, m in checked for d, m in zip(drafts, m, strict=True))


def test_layer_skip_with_all_but_one_layer_shares_the_targets_weights(
    tiny_model_dir, ordinary_token_ids
):
    path = str(tiny_model_dir("qwen3"))
    prompts = _prompts(ordinary_token_ids)
    params = _mixed_params(len(prompts))
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    spec = _spec("layer_skip", "", LAYERS["qwen3"] - 1)
    llm = LLM(path, speculative_config=spec, **ENGINE)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == plain
    assert llm.engine.stats["spec_accepted_tokens"] > 0
    _assert_nothing_held(llm, free)
    target, draft = llm.engine.runner, llm.engine.draft_model.runner
    target_params = {p.data_ptr() for p in target.model.parameters()}
    assert {p.data_ptr() for p in draft.model.parameters()} <= target_params  # no copies
    assert list(draft.model.model.layers) == list(target.model.model.layers[:2])
    assert draft.model.lm_head is target.model.lm_head
    assert len(draft.kv_caches) == 2  # a cache for the draft's layers only


def test_preemption_with_draft_models_is_lossless(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("qwen3"))
    prompts = _prompts(ordinary_token_ids, copies=2)
    params = _mixed_params(len(prompts), max_tokens=48)
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = LLM(path, **ENGINE)
    per_block = kv_bytes_per_block(llm.engine.model_config, 16, llm.engine.dtype)
    for spec, draft_share in (
        (_spec("draft_model", path, 0), 1.0),
        (_spec("layer_skip", "", 2), 2 / 3),
    ):
        # Room in the target cache for about one long sequence at a time.
        budget = int(per_block * 19 * (1 + draft_share))
        tight = dict(ENGINE, max_model_len=256, kv_cache_memory=budget)
        spec_llm = LLM(path, speculative_config=spec, **tight)
        free = spec_llm.engine.kv.num_free_blocks
        _assert_plain_where_exact(spec["method"], _tokens(spec_llm, prompts, params), plain, params)
        assert spec_llm.engine.stats["num_preemptions"] > 0
        assert spec_llm.engine.stats["spec_draft_tokens"] > 0
        _assert_nothing_held(spec_llm, free)


def test_a_full_draft_cache_skips_drafting_not_requests(tiny_model_dir, ordinary_token_ids):
    """With a draft cache too small for every sequence, some go undrafted some steps; every
    request still completes with plain decoding's tokens."""
    path = str(tiny_model_dir("llama3"))
    prompts = _prompts(ordinary_token_ids)
    params = _mixed_params(len(prompts))
    plain = _tokens(LLM(path, **ENGINE), prompts, params)
    llm = LLM(path, speculative_config=_spec("layer_skip", "", 1), **ENGINE)
    draft = llm.engine.draft_model
    # 12 blocks: 192 tokens, less than the long prompt and two others together.
    draft.kv = KVCacheManager(12, draft.kv.block_size, enable_prefix_caching=False)
    skipped = []
    real = draft._start_round

    def counting(seq):
        started = real(seq)
        skipped.append(started is None)
        return started

    draft._start_round = counting
    assert _tokens(llm, prompts, params) == plain
    assert any(skipped) and not all(skipped)
    assert llm.engine.stats["spec_draft_tokens"] > 0
    assert not draft.mirrors and draft.kv.num_free_blocks == 12


def test_aborted_requests_free_their_draft_blocks(tiny_model_dir, ordinary_token_ids):
    path = str(tiny_model_dir("llama3"))
    llm = LLM(path, speculative_config=_spec("layer_skip", "", 1), **ENGINE)
    engine, draft = llm.engine, llm.engine.draft_model
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, prompt in enumerate(_prompts(ordinary_token_ids)[:3]):
        engine.add_request(str(i), prompt, params)
    for _ in range(6):
        engine.step()
    assert len(draft.mirrors) == 3
    held = draft.kv.num_blocks - draft.kv.num_free_blocks
    engine.abort_request("1")
    assert len(draft.mirrors) == 2
    assert draft.kv.num_blocks - draft.kv.num_free_blocks < held
    engine.abort_request("0")
    engine.abort_request("2")
    assert not draft.mirrors and draft.kv.num_free_blocks == draft.kv.num_blocks


def test_the_draft_cache_shares_the_kv_budget(tiny_model_dir):
    """As many draft blocks as target blocks, both within kv_cache_memory."""
    path = str(tiny_model_dir("qwen3"))
    budget = 4 << 20
    plain = LLM(path, **dict(ENGINE, kv_cache_memory=budget))
    for spec, draft_layers in ((_spec("draft_model", str(tiny_model_dir("qwen2")), 0), None),
                               (_spec("layer_skip", "", 1), 1)):  # fmt: skip
        llm = LLM(path, speculative_config=spec, **dict(ENGINE, kv_cache_memory=budget))
        engine, draft = llm.engine, llm.engine.draft_model
        assert draft.kv.num_blocks == engine.kv.num_blocks < plain.engine.kv.num_blocks
        if draft_layers is not None:
            assert draft.model_cfg.num_hidden_layers == draft_layers
        per_target = kv_bytes_per_block(engine.model_config, 16, engine.dtype)
        per_draft = kv_bytes_per_block(draft.model_cfg, 16, engine.dtype)
        used = (engine.kv.num_blocks + 1) * (per_target + per_draft)
        # Within one joint block of the budget, the target's own plan rounding down once more.
        assert budget - 2 * (per_target + per_draft) < used <= budget


def test_bad_draft_configs_are_refused_before_the_target_loads(
    tiny_model_dir, tmp_path, monkeypatch
):
    from parallm.engine import engine as engine_module

    def no_loading(*args, **kwargs):
        raise AssertionError("the target model was loaded")

    monkeypatch.setattr(engine_module, "load_model", no_loading)
    path = str(tiny_model_dir("llama3"))
    other_vocab = str(tiny_model_dir("llama2"))  # a SentencePiece vocabulary
    with pytest.raises(ValueError, match=r"speculative_config.model .* has a vocabulary of"):
        LLM(path, speculative_config=_spec("draft_model", other_vocab, 0), **ENGINE)
    with pytest.raises(ValueError) as info:
        LLM(path, speculative_config=_spec("layer_skip", "", 2), **ENGINE)
    assert str(info.value) == (
        "speculative_config.num_layers must be below the target's 2 layers (1 to 1), got 2"
    )
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"speculative_config.model .*not supported"):
        LLM(path, speculative_config=_spec("draft_model", str(unsupported), 0), **ENGINE)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_cuda_graphs_and_triton_kernels_draft_losslessly(
    method, tiny_model_dir, ordinary_token_ids
):
    """On CUDA the draft runs the target's backend, Triton layers and captured decode graphs
    (each draft step takes the previous step's ids on the device; sampled drafts come from
    the graphs' logits); float32, so the tokens are the reference path's, and sampled
    draft_model requests repeat theirs on a fresh engine."""
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20,
                  max_num_batched_tokens=64)  # fmt: skip
    prompts = _prompts(ordinary_token_ids)
    params = _mixed_params(len(prompts))
    ref = LLM(path, attention_backend="reference", enforce_eager=True, fused_kernels=False,
              **common)  # fmt: skip
    plain = _tokens(ref, prompts, params)
    llm = LLM(path, speculative_config=_spec(method, path, 1), **common)
    free = llm.engine.kv.num_free_blocks
    first = _tokens(llm, prompts, params)
    _assert_plain_where_exact(method, first, plain, params)
    again = LLM(path, speculative_config=_spec(method, path, 1), **common)
    assert _tokens(again, prompts, params) == first
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    assert _tokens(llm, prompts, greedy) == _tokens(ref, prompts, greedy)  # argmax drafts only
    graphs = llm.engine.draft_model.runner.graphs
    assert graphs is not None and graphs.num_carried_ids > 0
    assert llm.engine.stats["spec_accepted_tokens"] > 0
    _assert_nothing_held(llm, free)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["draft_model", "layer_skip"])
def test_cuda_steps_run_ahead_between_drafted_ones(method, tiny_model_dir, ordinary_token_ids):
    """On CUDA (async scheduling on by default), steps of more than ``disable_by_batch_size``
    sequences replay decode graphs ahead of the host and smaller ones replay verify graphs;
    greedy tokens are the reference path's."""
    path = str(tiny_model_dir("llama3"))
    common = dict(dtype="float32", device="cuda", kv_cache_memory=64 << 20,
                  max_num_batched_tokens=64)  # fmt: skip
    prompts = _prompts(ordinary_token_ids, copies=2)
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    ref = LLM(path, attention_backend="reference", enforce_eager=True, fused_kernels=False,
              **common)  # fmt: skip
    spec = {**_spec(method, path, 1), "disable_by_batch_size": 3}
    llm = LLM(path, speculative_config=spec, **common)
    free = llm.engine.kv.num_free_blocks
    assert _tokens(llm, prompts, params) == _tokens(ref, prompts, params)
    stats = llm.engine.stats
    assert stats["num_overlapped_steps"] > 0 and stats["spec_accepted_tokens"] > 0
    assert llm.engine.runner.verify_graphs.num_replays > 0  # 3 sequences pad to the size-4 graph
    _assert_nothing_held(llm, free)
