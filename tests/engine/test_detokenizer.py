"""IncrementalDetokenizer: streamed text equals the full decode, UTF-8 safety, stop strings."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

import parallm.detokenizer as detokenizer_module
from parallm.detokenizer import IncrementalDetokenizer
from parallm.sampling_params import SamplingParams

try:  # tests/ is on sys.path under pytest's default import mode
    from tokenizer_factory import build_test_tokenizer
except ImportError:  # imported as the ``tests`` package from the repository root
    from tests.tokenizer_factory import build_test_tokenizer

KINDS = ["bytelevel", "sentencepiece"]
REPLACEMENT = "\ufffd"

TEXTS = [
    "Hello world! How are you doing today?",
    "The capital of France is Paris.",
    "Café naïve 😀 中文分词 🎉 Zürich",
    "🦀🦀 Rust ist schön! 日本語とemoji 🎌 ɐ ẞ ₿",  # rare chars: split bytes / byte fallback
    "  leading spaces\n\tand\ttabs  ",
    "def f(x):\n    return x ** 2  # 平方",
]


@pytest.fixture(scope="module", params=KINDS)
def tokenizer(request: pytest.FixtureRequest):
    return build_test_tokenizer(request.param)


def stream(
    tokenizer,
    prompt: list[int],
    output: list[int],
    params: SamplingParams | None = None,
    rng: random.Random | None = None,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``output`` in chunks of 1-3 tokens, taking a delta after each; then finish."""
    rng = rng or random.Random(0)
    detok = IncrementalDetokenizer(tokenizer, prompt, params or SamplingParams())
    chunks, stop, i = [], None, 0
    while i < len(output) and stop is None:
        n = rng.randint(1, 3)
        stop = detok.add_tokens(output[i : i + n])
        chunks.append(detok.take_delta())
        i += n
    stop = stop or detok.finish()
    chunks.append(detok.take_delta())
    return detok, chunks, stop


def in_context(tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> str | None:
    """What the output adds to the prompt's text in a full decode (None if not a clean suffix)."""
    before = tokenizer.decode(prompt, skip_special_tokens=skip)
    full = tokenizer.decode(prompt + output, skip_special_tokens=skip)
    if REPLACEMENT in before or not full.startswith(before):
        return None
    return full[len(before) :]


def assert_consistent(detok: IncrementalDetokenizer, chunks: list[str], truth: str) -> None:
    assert "".join(chunks) == detok.text == truth
    if REPLACEMENT not in truth:
        assert not any(REPLACEMENT in c for c in chunks), chunks


def byte_token_ids(tokenizer, data: bytes) -> list[int]:
    """One token per byte (splitting every multi-byte character)."""
    if tokenizer.convert_tokens_to_ids("<0x41>") != tokenizer.unk_token_id:
        return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in data])
    table = _gpt2_byte_to_unicode()
    return tokenizer.convert_tokens_to_ids([table[b] for b in data])


def _gpt2_byte_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# --- the test tokenizers ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_factory_is_deterministic_and_llama_like(kind: str, tmp_path) -> None:
    a, b = build_test_tokenizer(kind), build_test_tokenizer(kind)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert 300 <= len(a) <= 600
    assert (a.bos_token, a.eos_token, a.pad_token) == ("<s>", "</s>", "<pad>")
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (0, 1, 2)
    for text in TEXTS:
        if not text.startswith(" "):  # Metaspace adds no "▁" before a leading space
            assert a.decode(a.encode(text, add_special_tokens=False)) == text
    a.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.encode(TEXTS[2]) == a.encode(TEXTS[2])
    assert loaded.chat_template == a.chat_template


@pytest.mark.parametrize("kind", KINDS)
def test_factory_chat_template(kind: str) -> None:
    tok = build_test_tokenizer(kind)
    messages = [{"role": "user", "content": "Hi 😀"}, {"role": "assistant", "content": "Yo"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "user: Hi 😀\nassistant: Yo\nassistant:"


def test_factory_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        build_test_tokenizer("wordpiece")


def test_sentencepiece_kind_uses_byte_fallback() -> None:
    tok = build_test_tokenizer("sentencepiece")
    tokens = tok.convert_ids_to_tokens(tok.encode("🦀", add_special_tokens=False))
    assert "<0xF0>" in tokens
    assert tok.encode("Hi")[0] == tok.bos_token_id


# --- streaming equals the full decode --------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_encoded_text_streams_exactly(tokenizer, skip: bool) -> None:
    rng = random.Random(1)
    params = SamplingParams(skip_special_tokens=skip)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        for cut in sorted({0, 1, len(ids) // 2, *rng.sample(range(len(ids)), 3)}):
            prompt, output = ids[:cut], ids[cut:]
            detok, chunks, _ = stream(tokenizer, prompt, output, params, rng)
            truth = in_context(tokenizer, prompt, output, skip)
            if truth is None:  # the prompt ends inside a character
                continue
            assert_consistent(detok, chunks, truth)


def test_empty_prompt_matches_plain_decode(tokenizer) -> None:
    for text in TEXTS:
        output = tokenizer.encode(text, add_special_tokens=False)
        detok, chunks, _ = stream(tokenizer, [], output)
        assert_consistent(detok, chunks, tokenizer.decode(output, skip_special_tokens=True))


@pytest.mark.parametrize("skip", [True, False])
def test_random_token_ids_match_full_decode(tokenizer, skip: bool) -> None:
    """Garbage ids (specials, lone bytes, invalid UTF-8) still give exactly the full decode."""
    rng = random.Random(2)
    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(300):
        prompt = tokenizer.encode(rng.choice(TEXTS)) if rng.random() < 0.7 else []
        output = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 25))]
        detok, chunks, _ = stream(tokenizer, prompt, output, params, rng)
        truth = in_context(tokenizer, prompt, output, skip)
        if truth is not None:
            assert_consistent(detok, chunks, truth)
        if not prompt:
            assert detok.text == tokenizer.decode(output, skip_special_tokens=skip)


def test_bytelevel_output_equals_plain_decode() -> None:
    tok = build_test_tokenizer("bytelevel")
    rng = random.Random(3)
    for text in TEXTS:
        ids = tok.encode(text)
        for cut in range(len(ids)):
            if REPLACEMENT in tok.decode(ids[:cut]):
                continue
            detok, chunks, _ = stream(tok, ids[:cut], ids[cut:], rng=rng)
            assert_consistent(detok, chunks, tok.decode(ids[cut:]))


def test_first_output_token_keeps_its_leading_space(tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode(" Paris.", add_special_tokens=False)
    if tokenizer.convert_ids_to_tokens(output[0]) == "▁":  # sentencepiece: "▁" + "Paris"
        output = output[1:]
    full = tokenizer.encode("The capital of France is Paris.")
    assert prompt + output == full
    detok, chunks, _ = stream(tokenizer, prompt, output)
    assert "".join(chunks) == detok.text == " Paris."


@pytest.mark.parametrize("char", ["é", "😀", "中", "ẞ"])
def test_split_multibyte_char_is_held_until_complete(tokenizer, char: str) -> None:
    data = char.encode()
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hi"), SamplingParams())
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    deltas = []
    for token_id in [a, *byte_token_ids(tokenizer, data), b]:
        detok.add_tokens([token_id])
        deltas.append(detok.take_delta())
    assert "".join(deltas) == "a" + char + "b"
    assert all(REPLACEMENT not in d for d in deltas)
    assert deltas[: len(data)] == ["a"] + [""] * (len(data) - 1)  # nothing while incomplete


def test_byte_fallback_run_is_released_when_it_ends() -> None:
    # ByteFallback turns a whole run of byte tokens into U+FFFD if any of it is invalid, so
    # even complete characters wait for the run to end (or for finish()).
    tok = build_test_tokenizer("sentencepiece")
    detok = IncrementalDetokenizer(tok, [], SamplingParams())
    detok.add_tokens(byte_token_ids(tok, "😀".encode()))
    assert detok.take_delta() == ""
    detok.add_tokens(tok.convert_tokens_to_ids(["a"]))
    assert detok.take_delta() == "😀a"


def test_incomplete_char_is_released_by_finish(tokenizer) -> None:
    output = tokenizer.encode("ok", add_special_tokens=False)
    output += byte_token_ids(tokenizer, "😀".encode()[:3])
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.add_tokens(output)
    assert detok.take_delta() == "ok"
    assert detok.finish() is None
    assert detok.finished
    assert detok.take_delta().endswith(REPLACEMENT)
    assert detok.text == tokenizer.decode(output)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_output(tokenizer, skip: bool) -> None:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    words = tokenizer.encode(" hi 中", add_special_tokens=False)
    output = words + [eos, bos] + words + [eos]
    prompt = tokenizer.encode("Say")
    detok, chunks, _ = stream(tokenizer, prompt, output, SamplingParams(skip_special_tokens=skip))
    assert_consistent(detok, chunks, in_context(tokenizer, prompt, output, skip))
    assert ("</s>" in detok.text) is not skip


def test_accepts_a_raw_tokenizers_tokenizer() -> None:
    tok = build_test_tokenizer("sentencepiece")
    prompt, output = tok.encode("Hello"), tok.encode(" 你好 🎉 world", add_special_tokens=False)
    detok, chunks, _ = stream(tok.backend_tokenizer, prompt, output)
    assert_consistent(detok, chunks, in_context(tok, prompt, output))


class _SpyTokenizer:
    """A 'slow' tokenizer: only decode() and all_special_ids, recording window sizes."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.all_special_ids = inner.all_special_ids
        self.max_window = 0
        self.calls = 0

    def decode(self, ids: list[int], **kwargs) -> str:
        self.max_window = max(self.max_window, len(ids))
        self.calls += 1
        return self.inner.decode(ids, **kwargs)


def test_per_token_work_is_bounded(tokenizer) -> None:
    spy = _SpyTokenizer(tokenizer)
    prompt = tokenizer.encode(" ".join(TEXTS))
    output = tokenizer.encode(" ".join(TEXTS * 40), add_special_tokens=False)
    invalid = byte_token_ids(tokenizer, bytes([0x80]) * 200)  # never-ending broken UTF-8
    detok, chunks, _ = stream(spy, prompt, output + invalid)
    assert "".join(chunks) == detok.text
    assert detok.text.startswith(in_context(tokenizer, prompt, output))
    assert spy.max_window <= 80  # a few context tokens + at most 2 x 32 held ones
    assert spy.calls <= 2 * len(output + invalid) + 20


# --- stop strings ----------------------------------------------------------------------------


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tokenizer, include: bool) -> None:
    text = "Hello world! How are you doing today?"
    stop = "ld! How a"
    output = tokenizer.encode(text, add_special_tokens=False)
    assert not any(stop in tokenizer.decode([t]) for t in output)  # really spans tokens
    params = SamplingParams(stop=[stop], include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    expected = text[: text.index(stop) + (len(stop) if include else 0)]
    sent, matched_at = "", None
    for i, token_id in enumerate(output):
        if detok.add_tokens([token_id]) is not None:
            matched_at = i
            break
        sent += detok.take_delta()
        assert text.startswith(sent) and stop not in sent
        assert not sent.endswith("l")  # "l" could start the stop: held back
    assert tokenizer.decode(output[: matched_at + 1]).find(stop) >= 0
    assert tokenizer.decode(output[:matched_at]).find(stop) < 0
    sent += detok.take_delta()
    assert sent == detok.text == expected
    assert detok.finished and detok.stop_str == stop
    assert detok.add_tokens(output[matched_at + 1 :]) is None  # ignored after the match
    assert detok.text == expected and detok.take_delta() == ""


def test_stop_tokens_after_match_in_same_call_are_ignored(tokenizer) -> None:
    output = tokenizer.encode("one two three four", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["two"]))
    assert detok.add_tokens(output) == "two"
    assert detok.text == "one "
    assert detok.take_delta() == "one "


def test_earliest_stop_wins(tokenizer) -> None:
    output = tokenizer.encode("Hello world", add_special_tokens=False)
    params = SamplingParams(stop=["world", "lo w", "llo"])
    _, chunks, stop = stream(tokenizer, [], output, params)
    assert (stop, "".join(chunks)) == ("llo", "He")

    # Both matches complete within the same token's text: the earlier start wins.
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    assert len(hello) == 1
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["llo", "ell"]))
    assert detok.add_tokens(hello) == "ell"
    assert detok.text == "H"


def test_held_stop_prefix_is_released_by_finish(tokenizer) -> None:
    output = tokenizer.encode("Hello wor", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["world"]))
    assert detok.add_tokens(output) is None
    assert detok.take_delta() == "Hello "
    assert detok.text == "Hello wor"
    assert detok.finish() is None
    assert detok.take_delta() == "wor"
    assert detok.take_delta() == ""


def test_stop_in_prompt_is_not_matched(tokenizer) -> None:
    prompt = tokenizer.encode("STOP here")
    output = tokenizer.encode(" and go on", add_special_tokens=False)
    detok, chunks, stop = stream(tokenizer, prompt, output, SamplingParams(stop=["STOP", "here"]))
    assert stop is None
    assert "".join(chunks) == detok.text == in_context(tokenizer, prompt, output)


@pytest.mark.parametrize("include", [False, True])
def test_stop_made_of_multibyte_chars(tokenizer, include: bool) -> None:
    prompt = tokenizer.encode("Hi")
    output = tokenizer.encode(" ok 😀 中文", add_special_tokens=False)
    params = SamplingParams(stop=["😀 中"], include_stop_str_in_output=include)
    detok, chunks, stop = stream(tokenizer, prompt, output, params)
    assert stop == "😀 中"
    assert "".join(chunks) == detok.text == (" ok 😀 中" if include else " ok ")


def test_stop_completed_by_flushed_bytes(tokenizer) -> None:
    # Byte-fallback runs are only settled when they end, so the match may come from finish().
    output = byte_token_ids(tokenizer, "a😀".encode())
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["😀"]))
    stop = detok.add_tokens(output) or detok.finish()
    assert stop == "😀"
    assert detok.take_delta() == detok.text == "a"


def test_no_stop_strings_releases_everything_immediately(tokenizer) -> None:
    output = tokenizer.encode("The end.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.add_tokens(output)
    assert detok.take_delta() == "The end."
    assert not detok.finished and detok.stop_str is None


def test_stop_strings_wait_for_min_tokens(tokenizer) -> None:
    output = tokenizer.encode("a b a b a b a b a b", add_special_tokens=False)
    params = SamplingParams(stop=["b"], min_tokens=6, max_tokens=20)
    detok = IncrementalDetokenizer(tokenizer, [], params)
    fed = 0
    while detok.add_tokens([output[fed]]) is None:
        fed += 1
    assert fed + 1 >= 6
    assert "b" in detok.text and not detok.text.endswith("b")
    assert tokenizer.decode(output[: fed + 1]).startswith(detok.text + "b")


# --- the DecodeStream fast path gives today's (window-decoding) text -------------------------


def _all_tokenizers() -> dict:
    """Every tokenizer available offline: the test kinds, the id tokenizer, the bundled one."""
    from parallm.bundled import BUNDLED_MODEL_DIR
    from parallm.tokenizer import id_tokenizer

    toks = {kind: build_test_tokenizer(kind) for kind in KINDS}
    toks["id"] = id_tokenizer(1000)
    if (BUNDLED_MODEL_DIR / "tokenizer.json").exists():
        toks["bundled"] = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    return toks


_TOKENIZERS = _all_tokenizers()


def _random_output(tok, rng: random.Random) -> list[int]:
    """Ids of text, random ids (specials, lone bytes) and characters split into byte tokens."""
    out: list[int] = []
    if rng.random() < 0.1:  # past _MAX_PENDING held tokens: released as U+FFFD
        out += _byte_ids(tok, bytes([0x80]) * 40)
    while len(out) < 40:
        r = rng.random()
        if r < 0.4:
            out += tok.encode(" " + rng.choice(TEXTS), add_special_tokens=False)[:10]
        elif r < 0.7:
            out += [rng.randrange(len(tok)) for _ in range(rng.randint(1, 4))]
        elif r < 0.85:
            data = rng.choice(["é", "😀", "中", "🦀a", "ẞ"]).encode()
            cut = len(data) if rng.random() < 0.8 else rng.randrange(1, len(data) + 1)
            out += _byte_ids(tok, data[:cut])
        else:
            out += [tok.eos_token_id or 0, tok.bos_token_id or 0][: rng.randint(1, 2)]
    return out


def _byte_ids(tok, data: bytes) -> list[int]:
    try:
        ids = byte_token_ids(tok, data)
    except (KeyError, TypeError):
        return []
    return [i for i in ids if i is not None and i != tok.unk_token_id]


_DECODE_STREAM_CLASS = detokenizer_module._DECODE_STREAM


def _stream_both_ways(tok, prompt, output, params, seed, monkeypatch):
    """Deltas, stop and text streamed with the DecodeStream path and with window decoding."""
    results = []
    for stream_class in (_DECODE_STREAM_CLASS, None):
        monkeypatch.setattr(detokenizer_module, "_DECODE_STREAM", stream_class)
        detok, chunks, stop = stream(tok, prompt, output, params, random.Random(seed))
        results.append((chunks, stop, detok.text))
    return results


@pytest.mark.parametrize("name", sorted(_TOKENIZERS))
@pytest.mark.parametrize("skip", [True, False])
def test_decode_stream_path_streams_todays_text(name: str, skip: bool, monkeypatch) -> None:
    assert _DECODE_STREAM_CLASS is not None  # tokenizers >= 0.22 is installed here
    tok = _TOKENIZERS[name]
    rng = random.Random(hash((name, skip)) & 0xFFFF)
    for trial in range(150):
        prompt = tok.encode(rng.choice(TEXTS))[: rng.randint(0, 12)] if rng.random() < 0.8 else []
        if rng.random() < 0.2:  # a prompt that ends inside a character
            prompt += _byte_ids(tok, "😀".encode()[: rng.randint(1, 3)])
        output = _random_output(tok, rng)
        stops = [] if rng.random() < 0.7 else [tok.decode(output[5:7]) or "x", "中"]
        params = SamplingParams(skip_special_tokens=skip, stop=stops)
        fast, window = _stream_both_ways(tok, prompt, output, params, trial, monkeypatch)
        assert fast == window, (name, prompt, output)
        if not stops:
            chunks, _, text = fast
            truth = in_context(tok, prompt, output, skip)
            if truth is not None:
                assert text == truth
            if not prompt:
                assert text == tok.decode(output, skip_special_tokens=skip)
            assert "".join(chunks) == text


@pytest.mark.parametrize("name", ["bytelevel", "bundled", "id"])
def test_decode_stream_steps_plain_text_without_window_decodes(name: str) -> None:
    """A fast tokenizer's step on ordinary text is one DecodeStream call, no decode() here."""
    if name not in _TOKENIZERS:
        pytest.skip("no bundled model in this checkout")
    tok = _TOKENIZERS[name]
    text = " ".join(TEXTS[:2] * 20) if name != "id" else "".join(f"<{i}>" for i in range(300))
    output = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("Say"), SamplingParams())
    decoder = detok._decoder
    calls = []
    window_decode = decoder._decode
    decoder._decode = lambda ids: calls.append(ids) or window_decode(ids)
    for token_id in output:
        detok.add_tokens([token_id])
    detok.finish()
    assert detok.take_delta() == in_context(tok, tok.encode("Say"), output)
    assert calls == []


class _FailingStream:
    """A DecodeStream that raises on every third step, as tokenizers does when the window's new
    text does not start with the old (its ``InvalidPrefix``)."""

    def __init__(self, ids=None, skip_special_tokens=False) -> None:
        self.inner = _DECODE_STREAM_CLASS(ids=ids, skip_special_tokens=skip_special_tokens)
        self.steps = 0

    def step(self, tokenizer, token_id):
        self.steps += 1
        if self.steps % 3 == 0:
            raise Exception("Invalid prefix encountered")
        return self.inner.step(tokenizer, token_id)


@pytest.mark.parametrize("name", ["bytelevel", "sentencepiece"])
def test_decode_stream_errors_fall_back_to_window_decoding(name: str, monkeypatch) -> None:
    tok = _TOKENIZERS[name]
    rng = random.Random(5)
    for trial in range(60):
        prompt = tok.encode(rng.choice(TEXTS))[: rng.randint(0, 12)]
        output = _random_output(tok, rng)
        params = SamplingParams(skip_special_tokens=rng.random() < 0.5)
        monkeypatch.setattr(detokenizer_module, "_DECODE_STREAM", _FailingStream)
        detok, chunks, stop = stream(tok, prompt, output, params, random.Random(trial))
        monkeypatch.setattr(detokenizer_module, "_DECODE_STREAM", None)
        window = stream(tok, prompt, output, params, random.Random(trial))
        assert (chunks, stop, detok.text) == (window[1], window[2], window[0].text)
