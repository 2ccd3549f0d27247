"""``speculative_config``: which drafter proposes tokens and how many, in vLLM's keys.

Validation (every key and value, here) and implementation status (``check_implemented``, called
by the engine) are kept apart: a later drafter only joins ``IMPLEMENTED_METHODS``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parallm.config_json import config_fields

METHODS = ("ngram", "draft_model", "layer_skip", "medusa")
IMPLEMENTED_METHODS = ("ngram", "draft_model", "layer_skip", "medusa")

# vLLM's default when neither prompt_lookup_min nor prompt_lookup_max is given.
DEFAULT_PROMPT_LOOKUP = 5

# The ring of earlier requests' tokens (``prompt_lookup_history_tokens``, spec/history.py):
# the least that can draft (two matched tokens, one drafted, a separator), and the most whose
# age keys (position + capacity, kernels/history_lookup.py) fit int32.
MIN_HISTORY_TOKENS = 4
MAX_HISTORY_TOKENS = 2**30
# ngram's ring when the key is unset. On the 150M code model a ring took batch 1 from 1.70x to
# 1.76x plain decoding and batch 8 from 1.02x to 1.05x (RESULTS, eighteenth session), holding
# at most 41k tokens (the pass's 64 requests). Its cost grows with what it holds, on every step
# where a sequence's own lookup misses: full, 2^20 tokens cost the host drafter (sampled
# requests, CPU engines) 2.2 ms a lookup and 2^16 0.15 ms (Zipf-distributed tokens, this
# session's CPU); the device scan about 22 µs at 2^20.
DEFAULT_HISTORY_TOKENS = 2**16
# A datastore (``prompt_lookup_datastore``, spec/datastore.py): a dataset folder of
# ``parallm train``, recognised by its metadata file.
DATASTORE_FIELD = "speculative_config.prompt_lookup_datastore"
DATASTORE_META = "meta.json"

# Keys that belong to one method; giving one to another method is an error.
_METHOD_KEYS = {
    "ngram": (
        "prompt_lookup_min",
        "prompt_lookup_max",
        "prompt_lookup_history_tokens",
        "prompt_lookup_datastore",
    ),
    "draft_model": ("model",),
    "layer_skip": ("num_layers",),
    "medusa": ("model", "speculative_token_tree"),
}
# Values that leave a key unset, where another value than None does: another method may give them.
_UNSET_VALUES = {"prompt_lookup_history_tokens": (None, 0)}
_REQUIRED_KEYS = {
    "draft_model": ("model",),
    "layer_skip": ("num_layers",),
    "medusa": ("model",),
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """What ``LLM(speculative_config=...)`` and ``--speculative-config`` accept.

    ``method``: ``ngram`` (prompt lookup, no model), ``draft_model`` (a smaller model sharing the
    target's tokenizer), ``layer_skip`` (the target's first ``num_layers`` layers draft) or
    ``medusa`` (extra heads on the target's last hidden state; ``model``: the heads' folder).
    ``num_speculative_tokens``: most tokens proposed per sequence and step (for ``medusa``: how
    many heads draft, the tree's depth). ``speculative_token_tree`` (``medusa`` only, vLLM's
    key): the draft tree as index paths, ``[(0,), (0, 0), (1,), ...]`` (or its string), where
    path ``(r0, .., rd)`` is the node carrying head ``d``'s rank-``rd`` token below the node of
    ``(r0, ..)``; ``"chain"`` is every head's top token in a row; unset: a default sparse tree
    (``parallm.engine.spec.medusa.default_tree_paths``). ``disable_by_batch_size``: no
    speculation in a step whose running batch is larger than this (None: always speculate).
    ``min_tokens_per_step``: a request whose running mean of tokens per drafted step (accepted
    drafts plus one) falls below this stops drafting, and tries again every few steps
    (``spec/throttle.py``; None: never stops); ``"auto"``: the break-even that the engine
    measures at the running batch size, a drafted step's seconds over a plain step's
    (``spec/step_costs.py``; which steps draft then depends on timing, so a seeded sampled
    request of ``draft_model``, whose drafts are samples, is reproducible only without it).
    For ``ngram``, unset ``prompt_lookup_min``/``prompt_lookup_max`` take the other's value,
    or 5 when both are unset. ``prompt_lookup_history_tokens`` (``ngram`` only; 0: off; unset:
    ``DEFAULT_HISTORY_TOKENS``, 2**16): the
    capacity in tokens of a ring of finished requests' prompts and outputs, which a sequence
    whose own lookup finds nothing drafts from (spec/history.py: the newest occurrence of its
    last 2 to 8 tokens, n at least ``prompt_lookup_min`` and up to ``prompt_lookup_max`` when
    that is larger). ``prompt_lookup_datastore`` (``ngram`` only): a dataset folder that
    ``parallm train`` prepared with the target's tokenizer, whose training split is searched
    after the ring (spec/datastore.py; retrieval-based drafting), kept for the engine's life.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    num_layers: int | None = None
    disable_by_batch_size: int | None = None
    speculative_token_tree: Any = None
    min_tokens_per_step: float | str | None = None
    prompt_lookup_history_tokens: int | None = None
    prompt_lookup_datastore: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {list(METHODS)}, got {self.method!r}"
            )
        _check_int("num_speculative_tokens", self.num_speculative_tokens, minimum=1)
        self._check_method_keys()
        self._fill_history_tokens()
        if self.method == "ngram":
            self._fill_prompt_lookup()
            _check_history_tokens(self.prompt_lookup_history_tokens)
            if self.prompt_lookup_datastore is not None:
                check_datastore_dir(self.prompt_lookup_datastore)
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(
                f"speculative_config.model must be a model directory or Hub id, got {self.model!r}"
            )
        if self.num_layers is not None:
            _check_int("num_layers", self.num_layers, minimum=1)
        if self.speculative_token_tree is not None:
            paths = parse_token_tree(self.speculative_token_tree, self.num_speculative_tokens)
            object.__setattr__(self, "speculative_token_tree", paths)
        if self.disable_by_batch_size is not None:
            # vLLM's bound: a threshold of 1 would never speculate.
            _check_int("disable_by_batch_size", self.disable_by_batch_size, minimum=2)
        if self.min_tokens_per_step is not None:
            _check_min_tokens_per_step(self.min_tokens_per_step, self.num_speculative_tokens)

    @classmethod
    def from_value(cls, value: Any) -> SpeculativeConfig | None:
        """Accept None, a dict, a JSON object string (the CLI's form) or an instance."""
        if isinstance(value, cls):
            return value
        example = '\'{"method": "ngram", "num_speculative_tokens": 4}\''
        d = config_fields(value, cls, "speculative_config", example)
        return None if d is None else cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> SpeculativeConfig:
        """From keys ``config_fields`` checked: vLLM's defaults, then the required keys."""
        d = dict(d)
        if d.get("method") is None and d.get("model") is not None:
            d["method"] = "draft_model"  # vLLM's reading of a config that names only a model
        for key, what in (("method", f"one of {list(METHODS)}"),
                          ("num_speculative_tokens", "an integer >= 1")):  # fmt: skip
            if d.get(key) is None:
                raise ValueError(f"speculative_config.{key} is required: {what}")
        return cls(**d)

    def check_implemented(self) -> None:
        """Raise when this session's engine has no drafter for ``method`` yet."""
        if self.method not in IMPLEMENTED_METHODS:
            raise ValueError(
                f"speculative_config.method {self.method!r} is not implemented yet; "
                f"implemented: {list(IMPLEMENTED_METHODS)}"
            )

    def _check_method_keys(self) -> None:
        own = _METHOD_KEYS[self.method]
        for key in dict.fromkeys(k for keys in _METHOD_KEYS.values() for k in keys):
            if key not in own and getattr(self, key) not in _UNSET_VALUES.get(key, (None,)):
                owners = [m for m, keys in _METHOD_KEYS.items() if key in keys]
                which = f"method {owners[0]!r}" if len(owners) == 1 else f"methods {owners}"
                raise ValueError(
                    f"speculative_config.{key} is for {which} only; "
                    f"method {self.method!r} takes {list(own)}"
                )
        for key in _REQUIRED_KEYS.get(self.method, ()):
            if getattr(self, key) is None:
                raise ValueError(f"speculative_config.{key} is required for method {self.method!r}")

    def _fill_history_tokens(self) -> None:
        # Unset: ngram keeps DEFAULT_HISTORY_TOKENS of earlier requests, other methods none.
        if self.prompt_lookup_history_tokens is None:
            size = DEFAULT_HISTORY_TOKENS if self.method == "ngram" else 0
            object.__setattr__(self, "prompt_lookup_history_tokens", size)

    def _fill_prompt_lookup(self) -> None:
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        for key, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if value is not None:
                _check_int(key, value, minimum=1)
        if low is None and high is None:
            low = high = DEFAULT_PROMPT_LOOKUP
        low = high if low is None else low
        high = low if high is None else high
        if low > high:
            raise ValueError(
                f"speculative_config.prompt_lookup_min ({low}) must be <= "
                f"prompt_lookup_max ({high})"
            )
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)


_TREE_EXAMPLE = "[(0,), (0, 0), (1,)]"


def parse_token_tree(value: Any, depth: int) -> tuple[tuple[int, ...], ...]:
    """``speculative_token_tree`` as sorted index paths (breadth-first), checked: each path a
    non-empty sequence of ranks >= 0 no longer than ``depth`` (``num_speculative_tokens``),
    no repeats, every path's parent path present, at most 64 paths; ``"chain"``: the top
    token of each of the ``depth`` heads."""
    from parallm.engine.spec.tree import MAX_TREE_NODES

    key = "speculative_config.speculative_token_tree"
    if value == "chain":
        return tuple((0,) * d for d in range(1, depth + 1))
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(
                f"{key} must be a list of index paths such as {_TREE_EXAMPLE!r} or 'chain', "
                f"got {value!r}"
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{key} must be a non-empty list of index paths such as {_TREE_EXAMPLE}")
    paths = []
    for path in value:
        ok = isinstance(path, (list, tuple)) and 0 < len(path) <= depth
        if not ok or any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path):
            raise ValueError(
                f"{key}: each path must be 1 to num_speculative_tokens ({depth}) ranks >= 0, "
                f"got {path!r}"
            )
        paths.append(tuple(path))
    if len(set(paths)) != len(paths) or len(paths) > MAX_TREE_NODES:
        raise ValueError(f"{key} must hold at most {MAX_TREE_NODES} distinct paths")
    orphans = [p for p in paths if len(p) > 1 and p[:-1] not in set(paths)]
    if orphans:
        raise ValueError(f"{key}: paths {orphans[:3]} lack their parent paths")
    return tuple(sorted(paths, key=lambda p: (len(p), p)))


def _check_min_tokens_per_step(value: Any, k: int) -> None:
    # A step emits between 1 and k + 1 tokens: a threshold outside that range would either never
    # or always pause a request.
    if value == "auto":
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not 1.0 < value <= k + 1:
        raise ValueError(
            "speculative_config.min_tokens_per_step must be a number in (1, "
            f'num_speculative_tokens + 1 = {k + 1}] or "auto", got {value!r}'
        )


def _check_history_tokens(value: Any) -> None:
    number = isinstance(value, int) and not isinstance(value, bool)
    if not number or not (value == 0 or MIN_HISTORY_TOKENS <= value <= MAX_HISTORY_TOKENS):
        raise ValueError(
            "speculative_config.prompt_lookup_history_tokens must be 0 (off) or an integer "
            f"from {MIN_HISTORY_TOKENS} to {MAX_HISTORY_TOKENS} (the ring's capacity in "
            f"tokens), got {value!r}"
        )


def check_datastore_dir(path: Any) -> None:
    """ValueError unless ``path`` is a dataset folder (the cheap check, at configuration)."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{DATASTORE_FIELD} must be a dataset folder's path, got {path!r}")
    if not (Path(path) / DATASTORE_META).is_file():
        raise ValueError(
            f"{DATASTORE_FIELD}: no dataset at {path} (a folder that `parallm train` prepared, "
            f"holding {DATASTORE_META}, tokenizer/ and train_*.npy: its data.dataset_dir)"
        )


def _check_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"speculative_config.{key} must be an integer >= {minimum}, got {value!r}")
