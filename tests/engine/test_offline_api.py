"""The offline API at its edges: seed range, chat roles, and models without a tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from parallm import LLM, SamplingParams
from parallm.chat_messages import CHAT_ROLES
from parallm.cli import build_parser
from parallm.commands.engine_args import engine_kwargs
from parallm.server.protocol import ChatMessage

ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "kv_cache_memory": 8 << 20}
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2)
PROMPT = [5, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama3")), **ENGINE)


@pytest.fixture(scope="module")
def weights_only_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama3 checkpoint with its config and weights but no tokenizer files."""
    source = tiny_model_dir("llama3")
    target = tmp_path_factory.mktemp("weights-only")
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    return target


@pytest.fixture(scope="module")
def llm_without_tokenizer(weights_only_dir) -> LLM:
    return LLM(str(weights_only_dir), skip_tokenizer_init=True, **ENGINE)


# ---- seed ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**64, 2**70, -1])
def test_seed_outside_the_generator_range_is_refused_up_front(seed):
    with pytest.raises(ValueError, match=r"^seed must be in \[0, 18446744073709551615\]"):
        SamplingParams(seed=seed)


def test_largest_seed_samples_and_its_siblings_wrap(llm):
    """n=2 with the largest seed: sample 1 uses seed 0 (wrapped), the same as seed=0 alone."""
    top = SamplingParams(n=2, temperature=1.0, seed=2**64 - 1, max_tokens=8, ignore_eos=True)
    (out,) = llm.generate([PROMPT], top, use_tqdm=False)
    alone = SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True)
    (zero,) = llm.generate([PROMPT], alone, use_tqdm=False)
    by_index = {c.index: c.token_ids for c in out.outputs}
    assert len(by_index[0]) == 8
    assert by_index[1] == zero.outputs[0].token_ids


# ---- chat roles ------------------------------------------------------------------------------


def test_chat_refuses_an_unknown_role_naming_the_message(llm):
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.role must be one of .*'wizard'") as err:
        llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert all(repr(role) in str(err.value) for role in CHAT_ROLES)
    assert not llm.engine.has_unfinished_requests()


def test_chat_checks_every_conversation_before_running_any(llm):
    good = [{"role": "user", "content": "hi"}]
    bad = [{"role": "narrator", "content": "x"}]
    steps = llm.engine.num_steps
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        llm.chat([good, bad], SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.engine.num_steps == steps


def test_server_and_offline_share_the_roles():
    assert ChatMessage.model_fields["role"].annotation.__args__ == CHAT_ROLES
    for role in CHAT_ROLES:
        ChatMessage(role=role, content="x")


# ---- no tokenizer ----------------------------------------------------------------------------


def test_missing_tokenizer_error_points_at_skip_tokenizer_init(weights_only_dir):
    with pytest.raises(ValueError, match=r"tokenizer: cannot load .*skip_tokenizer_init=True"):
        LLM(str(weights_only_dir), **ENGINE)


def test_token_ids_in_token_ids_out_without_a_tokenizer(llm, llm_without_tokenizer):
    assert llm_without_tokenizer.get_tokenizer() is None
    (bare,) = llm_without_tokenizer.generate([PROMPT], GREEDY, use_tqdm=False)
    (full,) = llm.generate([PROMPT], GREEDY, use_tqdm=False)
    got, want = bare.outputs[0], full.outputs[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 6
    assert got.text == "" and want.text != ""
    assert bare.prompt is None and bare.prompt_token_ids == PROMPT
    for entry, expected in zip(got.logprobs, want.logprobs, strict=True):
        assert set(entry) == set(expected)
        assert all(lp.decoded_token is None for lp in entry.values())
        for token, lp in entry.items():
            assert lp.logprob == pytest.approx(expected[token].logprob, abs=1e-5)
    # Streaming works the same way: token ids, no text.
    chunks = list(llm_without_tokenizer.stream({"prompt_token_ids": PROMPT}, GREEDY))
    assert sum((c.outputs[0].token_ids for c in chunks), []) == want.token_ids
    assert all(c.outputs[0].text == "" for c in chunks)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.generate("hello", use_tqdm=False), "a text prompt needs a tokenizer"),
        (lambda m: m.generate({"prompt": "hello"}, use_tqdm=False), "a text prompt needs a"),
        (lambda m: m.chat([{"role": "user", "content": "hi"}], use_tqdm=False), "chat needs a"),
        (
            lambda m: m.generate([PROMPT], SamplingParams(stop=["x"]), use_tqdm=False),
            "stop strings need a tokenizer",
        ),
    ],
    ids=["text prompt", "text in a dict", "chat", "stop strings"],
)
def test_what_needs_a_tokenizer_is_refused_naming_skip_tokenizer_init(
    llm_without_tokenizer, call, match
):
    with pytest.raises(ValueError, match=match) as err:
        call(llm_without_tokenizer)
    assert "skip_tokenizer_init" in str(err.value)
    assert not llm_without_tokenizer.engine.has_unfinished_requests()


def test_detokenize_false_gives_token_ids_and_no_text(llm):
    plain = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2,
                            detokenize=False)  # fmt: skip
    bare = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert bare.token_ids == plain.token_ids
    assert bare.text == "" and plain.text != ""
    assert all(lp.decoded_token is None for entry in bare.logprobs for lp in entry.values())
    streamed = list(llm.stream({"prompt_token_ids": PROMPT}, params))
    assert all(c.outputs[0].text == "" for c in streamed)


def test_detokenize_false_refuses_stop_strings():
    with pytest.raises(ValueError, match=r"^stop strings need detokenize=True"):
        SamplingParams(stop=["\n"], detokenize=False)
    with pytest.raises(ValueError, match=r"^detokenize must be true or false"):
        SamplingParams(detokenize="no")


def test_cli_flag_skip_tokenizer_init(weights_only_dir):
    args = build_parser().parse_args(
        ["generate", "--model", str(weights_only_dir), "--skip-tokenizer-init", "x"]
    )
    kwargs = engine_kwargs(args)
    assert kwargs["skip_tokenizer_init"] is True
    assert (
        engine_kwargs(build_parser().parse_args(["generate", "x"]))["skip_tokenizer_init"] is False
    )


def test_server_without_tokenizer_serves_ids_and_names_stop():
    """A server over ``skip_tokenizer_init=True`` answers token-id prompts, and refuses stop
    strings with a 400 naming ``stop`` (only stop_token_ids can end such a request)."""
    import httpx
    from server_support import API_KEY, MODEL_NAME, running_server

    with running_server(skip_tokenizer_init=True) as server:
        url, auth = server.url + "/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
        body = {"model": MODEL_NAME, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
        ok = httpx.post(url, json=body, headers=auth, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        bad = httpx.post(url, json={**body, "stop": ["x"]}, headers=auth, timeout=60)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "stop"
    assert "stop_token_ids" in bad.json()["error"]["message"]


def test_offline_generation_imports_neither_triton_nor_the_ipc_stack(tiny_model_dir):
    """``import parallm`` and one engine's generate on the CPU import no Triton (CUDA-only
    kernels) and no ZeroMQ/msgspec (only the server's and data parallelism's processes talk
    over them): a GPU image or a laptop without those packages can still run offline."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "zmq", "msgspec"):
                    raise ModuleNotFoundError(name)

        sys.meta_path.insert(0, Block())
        from parallm import LLM, SamplingParams
        llm = LLM({str(tiny_model_dir("llama3"))!r}, device="cpu", dtype="float32")
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 3
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_close_frees_the_model_and_the_kv_cache_and_refuses_later_requests(tiny_model_dir):
    import weakref

    llm = LLM(str(tiny_model_dir("llama3")), **ENGINE)
    llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False)
    runner = llm.engine.runner
    model, kv = weakref.ref(runner.model), weakref.ref(runner.kv_caches[0])
    del runner
    llm.close()
    assert model() is None and kv() is None  # freed now, not at the next collection
    with pytest.raises(RuntimeError, match=r"closed \(LLM.close\(\)\)"):
        llm.generate([{"prompt_token_ids": PROMPT}], GREEDY, use_tqdm=False)
    llm.close()  # twice is fine
