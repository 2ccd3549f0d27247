"""Small deterministic tokenizers built locally (no hub access), for tests and tiny models.

``build_test_tokenizer("bytelevel")`` is GPT-2/Llama-3 style: byte-level BPE, every byte is a
token, no BOS added on encode. ``build_test_tokenizer("sentencepiece")`` is Llama-2 style:
Metaspace ("▁") pieces, ``<0xNN>`` byte-fallback tokens, a decoder that strips the leading
space, and ``<s>`` prepended on encode. Both have ``<s>`` (bos), ``</s>`` (eos) and ``<pad>``
as ids 0, 1, 2, and a minimal chat template.
"""

from __future__ import annotations

import functools
import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
BYTELEVEL_VOCAB_SIZE = 480
SENTENCEPIECE_MERGES = 200  # on top of 3 specials, 256 byte tokens and the learned alphabet

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_CORPUS_LINES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, how are you doing today?",
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "Once upon a time, there was a little model that wanted to generate text.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
    "for i in range(10): total += i * i  # squares",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159",
    "Café, naïve, façade, résumé, jalapeño, Ångström, Zürich, São Paulo.",
    "El niño comió una manzana. ¿Dónde está la biblioteca? ¡Olé!",
    "Straße, Größe, Übermut, Ärger, schön, Fräulein.",
    "Привет, мир! Как дела? Спасибо, хорошо.",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "中文分词很有意思，机器学习和深度学习。",
    "こんにちは世界。日本語のテキストです。",
    "안녕하세요 세계! 반갑습니다.",
    "Emoji test: 😀 😂 🎉 👍 🚀 ❤️ 🌍 🤖 🐍 ✨",
    "Mixed: naïve 🤖 says 你好 to the café 🎉 in Zürich.",
    "Math: α + β = γ, ∑ x² ≤ ∞, π ≈ 3.14, √2, ∂f/∂x.",
    "Quotes “double” and ‘single’ — dashes – and ellipsis…",
    "user: What is the weather like?\nassistant: It is sunny and warm.",
]
_CORPUS = "\n".join(_CORPUS_LINES * 3)


def build_test_tokenizer(kind: str = "bytelevel") -> PreTrainedTokenizerFast:
    """A fresh tokenizer of ``kind`` ("bytelevel" or "sentencepiece"); same result every call."""
    builders = {"bytelevel": _bytelevel_json, "sentencepiece": _sentencepiece_json}
    if kind not in builders:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose from {sorted(builders)}")
    backend = Tokenizer.from_str(builders[kind]())
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@functools.cache
def _bytelevel_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BYTELEVEL_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS_LINES * 3, trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


@functools.cache
def _sentencepiece_json() -> str:
    vocab, merges = _train_metaspace_bpe()
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pieces = SPECIAL_TOKENS + byte_tokens + sorted(vocab, key=vocab.__getitem__)
    tok = Tokenizer(
        models.BPE(
            vocab={piece: i for i, piece in enumerate(pieces)},
            merges=merges,
            byte_fallback=True,
            fuse_unk=True,
        )
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    return tok.to_str()


def _train_metaspace_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Pieces and merges learned on the corpus; rare characters are left to byte fallback."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    # limit_alphabet keeps only frequent characters, so emoji and rare CJK need <0xNN> tokens.
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, limit_alphabet=80, max_token_length=8, show_progress=False
    )
    tok.train_from_iterator(_CORPUS_LINES * 3, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    merges = merges[:SENTENCEPIECE_MERGES]
    alphabet = [p for p in model["vocab"] if len(p) == 1]
    kept = alphabet + ["".join(m) for m in merges]
    vocab = {}
    for piece in kept:
        vocab.setdefault(piece, len(vocab))
    return vocab, merges
