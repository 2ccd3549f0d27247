"""``speculative_config``: vLLM's keys and defaults, every bad value named where it enters (the
``SpeculativeConfig`` itself, ``EngineConfig``, ``LLM(...)`` and ``--speculative-config``)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from parallm.cli import build_parser, main
from parallm.commands.engine_args import engine_kwargs
from parallm.config import EngineConfig
from parallm.engine.spec.config import IMPLEMENTED_METHODS, METHODS, SpeculativeConfig

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}


def test_ngram_lookup_defaults_follow_vllm():
    both_unset = SpeculativeConfig.from_value(NGRAM)
    assert (both_unset.prompt_lookup_min, both_unset.prompt_lookup_max) == (5, 5)
    only_max = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_max": 3})
    assert (only_max.prompt_lookup_min, only_max.prompt_lookup_max) == (3, 3)
    only_min = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_min": 2})
    assert (only_min.prompt_lookup_min, only_min.prompt_lookup_max) == (2, 2)
    both = SpeculativeConfig.from_value({**NGRAM, "prompt_lookup_min": 2, "prompt_lookup_max": 6})
    assert (both.prompt_lookup_min, both.prompt_lookup_max) == (2, 6)
    assert both.num_speculative_tokens == 4 and both.disable_by_batch_size is None
    assert both.model is None and both.num_layers is None


def test_every_accepted_form_gives_the_same_config():
    expected = SpeculativeConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3)
    as_dict = {**NGRAM, "prompt_lookup_max": 3}
    assert SpeculativeConfig.from_value(as_dict) == expected
    assert SpeculativeConfig.from_value(json.dumps(as_dict)) == expected
    assert SpeculativeConfig.from_value(expected) is expected
    assert SpeculativeConfig.from_value(None) is None
    assert SpeculativeConfig.from_value("null") is None


def test_other_methods_take_their_own_keys():
    draft = SpeculativeConfig.from_value({"method": "draft_model", "model": "small",
                                          "num_speculative_tokens": 3})  # fmt: skip
    assert draft.model == "small" and draft.prompt_lookup_min is None
    # vLLM reads a config that names only a model as a draft model.
    assert SpeculativeConfig.from_value({"model": "small", "num_speculative_tokens": 3}) == draft
    skip = SpeculativeConfig.from_value({"method": "layer_skip", "num_layers": 2,
                                         "num_speculative_tokens": 3})  # fmt: skip
    assert skip.num_layers == 2
    medusa = SpeculativeConfig.from_value({"method": "medusa", "num_speculative_tokens": 3,
                                           "model": "heads", "disable_by_batch_size": 8,
                                           "speculative_token_tree": "[(0,), (1,), (0, 0)]"})  # fmt: skip
    assert medusa.disable_by_batch_size == 8 and medusa.model == "heads"
    assert medusa.speculative_token_tree == ((0,), (1,), (0, 0))


def test_the_config_is_frozen():
    config = SpeculativeConfig.from_value(NGRAM)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_speculative_tokens = 8


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({**NGRAM, "method": "eagle"}, "speculative_config.method must be one of "
         "['ngram', 'draft_model', 'layer_skip', 'medusa'], got 'eagle'"),
        ({"num_speculative_tokens": 4}, "speculative_config.method is required: one of "
         "['ngram', 'draft_model', 'layer_skip', 'medusa']"),
        ({"method": "ngram"}, "speculative_config.num_speculative_tokens is required: "
         "an integer >= 1"),
        ({**NGRAM, "num_speculative_tokens": 0},
         "speculative_config.num_speculative_tokens must be an integer >= 1, got 0"),
        ({**NGRAM, "num_speculative_tokens": 2.0},
         "speculative_config.num_speculative_tokens must be an integer >= 1, got 2.0"),
        ({**NGRAM, "num_speculative_tokens": True},
         "speculative_config.num_speculative_tokens must be an integer >= 1, got True"),
        ({**NGRAM, "prompt_lookup_min": 4, "prompt_lookup_max": 3},
         "speculative_config.prompt_lookup_min (4) must be <= prompt_lookup_max (3)"),
        ({**NGRAM, "prompt_lookup_min": 0, "prompt_lookup_max": 3},
         "speculative_config.prompt_lookup_min must be an integer >= 1, got 0"),
        ({**NGRAM, "prompt_lookup_max": 0},
         "speculative_config.prompt_lookup_max must be an integer >= 1, got 0"),
        ({**NGRAM, "prompt_lookup_min": 1, "prompt_lookup_max": "4"},
         "speculative_config.prompt_lookup_max must be an integer >= 1, got '4'"),
        ({**NGRAM, "model": "small"},
         "speculative_config.model is for methods ['draft_model', 'medusa'] only; method "
         "'ngram' takes "
         "['prompt_lookup_min', 'prompt_lookup_max', 'prompt_lookup_history_tokens', "
         "'prompt_lookup_datastore']"),
        ({**NGRAM, "num_layers": 2},
         "speculative_config.num_layers is for method 'layer_skip' only"),
        ({"method": "medusa", "num_speculative_tokens": 2, "prompt_lookup_max": 3},
         "speculative_config.prompt_lookup_max is for method 'ngram' only; method 'medusa' "
         "takes ['model', 'speculative_token_tree']"),
        ({"method": "draft_model", "num_speculative_tokens": 2},
         "speculative_config.model is required for method 'draft_model'"),
        ({"method": "draft_model", "num_speculative_tokens": 2, "model": ""},
         "speculative_config.model must be a model directory or Hub id, got ''"),
        ({"method": "layer_skip", "num_speculative_tokens": 2},
         "speculative_config.num_layers is required for method 'layer_skip'"),
        ({"method": "layer_skip", "num_speculative_tokens": 2, "num_layers": 0},
         "speculative_config.num_layers must be an integer >= 1, got 0"),
        ({**NGRAM, "disable_by_batch_size": 1},
         "speculative_config.disable_by_batch_size must be an integer >= 2, got 1"),
        ({**NGRAM, "acceptance_method": "typical", "zeta": 1},
         "speculative_config: unknown key(s) ['acceptance_method', 'zeta']; allowed: "
         "['method', 'num_speculative_tokens', 'prompt_lookup_min', 'prompt_lookup_max', "
         "'model', 'num_layers', 'disable_by_batch_size', 'speculative_token_tree', "
         "'min_tokens_per_step', 'prompt_lookup_history_tokens', 'prompt_lookup_datastore']"),
        ('{"method": "ngram",', "speculative_config must be a JSON object such as"),
        ("[1, 2]", "speculative_config must be a dict, a JSON object string or a "
         "SpeculativeConfig, got list"),
        (4, "speculative_config must be a dict, a JSON object string or a SpeculativeConfig, "
         "got int"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": -1},
         "speculative_config.prompt_lookup_history_tokens must be 0 (off) or an integer from 4 "
         "to 1073741824 (the ring's capacity in tokens), got -1"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": 3}, "from 4 to 1073741824"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": 2**30 + 1}, "got 1073741825"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": 4096.0}, "got 4096.0"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": True}, "got True"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_history_tokens": "4096"}, "got '4096'"),
        ({"method": "draft_model", "model": "small", "num_speculative_tokens": 2,
          "prompt_lookup_history_tokens": 4096},
         "speculative_config.prompt_lookup_history_tokens is for method 'ngram' only; method "
         "'draft_model' takes ['model']"),
    ],
)  # fmt: skip
def test_bad_values_are_named_with_what_is_allowed(value, message):
    with pytest.raises(ValueError) as info:
        SpeculativeConfig.from_value(value)
    assert message in str(info.value)


def test_every_method_is_implemented():
    assert IMPLEMENTED_METHODS == METHODS
    extra = {"draft_model": {"model": "small"}, "layer_skip": {"num_layers": 1},
             "medusa": {"model": "heads"}}  # fmt: skip
    for method in METHODS:
        config = SpeculativeConfig(method=method, num_speculative_tokens=2, **extra.get(method, {}))
        config.check_implemented()


def test_engine_config_parses_and_checks_it():
    assert EngineConfig.from_kwargs(model="m").speculative_config is None
    from_json = EngineConfig.from_kwargs(model="m", speculative_config=json.dumps(NGRAM))
    assert from_json.speculative_config == SpeculativeConfig(**NGRAM)
    assert EngineConfig(speculative_config=NGRAM).speculative_config == SpeculativeConfig(**NGRAM)
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens"):
        EngineConfig.from_kwargs(model="m", speculative_config={"method": "ngram"})


def test_llm_refuses_a_bad_config_before_loading_the_model():
    from parallm import LLM

    # The model path names nothing: the config must be refused first.
    with pytest.raises(ValueError, match=r"speculative_config\.method must be one of"):
        LLM("/nonexistent/model", speculative_config={"method": "eagle3",
                                                      "num_speculative_tokens": 2})  # fmt: skip


def test_llm_takes_the_config(tiny_model_dir):
    from parallm import LLM

    llm = LLM(str(tiny_model_dir("llama3")), device="cpu", dtype="float32", max_model_len=64,
              speculative_config={**NGRAM, "prompt_lookup_max": 3})  # fmt: skip
    assert llm.engine.config.speculative_config == SpeculativeConfig(
        method="ngram", num_speculative_tokens=4, prompt_lookup_max=3
    )


@pytest.mark.parametrize(
    "command",
    [["generate", "hi"], ["serve"], ["bench", "latency"], ["bench", "throughput"]],
)
def test_every_engine_command_takes_the_flag(command):
    flag = json.dumps({**NGRAM, "prompt_lookup_max": 3})
    args = build_parser().parse_args([*command, "--speculative-config", flag])
    assert engine_kwargs(args)["speculative_config"] == flag
    unset = engine_kwargs(build_parser().parse_args(command))
    assert unset["speculative_config"] is None


def test_a_bad_flag_value_is_a_usage_error_before_loading(capsys):
    code = main(["generate", "--model", "/nonexistent", "--speculative-config",
                 '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": -1}',
                 "Hi"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "parallm generate: error: speculative_config.prompt_lookup_max must be an integer >= 1, "
        "got -1"
    )
