"""The command line: streaming generation, file mode with JSON lines, errors and --help, and
vLLM's spellings of the engine and server flags."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from typing import Any

import httpx
import pytest

from parallm.cli import build_parser, main
from parallm.commands.engine_args import engine_kwargs

# A template no model ships: a prompt rendered with it shows it was used.
CHAT_TEMPLATE = "{% for m in messages %}<<{{ m.role }}>>{{ m.content }}\n{% endfor %}ASSISTANT:"


def test_generate_streams_the_completion(tiny_model_dir, capsys):
    path = str(tiny_model_dir("llama3"))
    assert main(["generate", "--model", path, "--device", "cpu", "--max-tokens", "6", "Hello"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("Hello") and len(out.out) > len("Hello\n")
    assert "KV cache" in out.err  # the start-up summary


def test_generate_file_mode_writes_json_lines(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('Hello\n{"prompt": "The capital"}\n\nOnce upon\n')
    result = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir("llama3")), "--device", "cpu",
                 "--prompts-file", str(prompts), "--output", str(result), "--max-tokens", "4",
                 "--n", "2", "--temperature", "0.8"])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in result.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["Hello", "The capital", "Once upon"]
    assert all(len(r["completions"]) == 2 for r in records)


def test_bad_flags_give_a_clear_error(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama3")), "--device", "cpu",
                 "--top-p", "2", "Hello"])  # fmt: skip
    assert code == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, Any]:
    """Every leaf command's parser by its name (``serve``, ``bench serve``, ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix}{name} ") or {f"{prefix}{name}": sub})
    return found


def test_help_explains_every_flag():
    commands = _commands(build_parser())
    assert {"generate", "serve", "bench latency", "bench serve", "export"} <= set(commands)
    for name, p in commands.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


def _help_blocks(p: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's help entry in ``--help`` (its flags line and description), whitespace
    collapsed, by the entry's first line."""
    blocks: dict[str, str] = {}
    current = None
    for line in p.format_help().splitlines():
        if line.startswith("  -"):
            current = line.strip()
            blocks[current] = ""
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(f"{k} {v}".split()) for k, v in blocks.items()}


def test_help_shows_every_default_once():
    for name, p in _commands(build_parser()).items():
        blocks = _help_blocks(p)
        for action in p._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            if action.default in (None, argparse.SUPPRESS):
                continue
            flag = action.option_strings[0]
            (entry,) = [b for k, b in blocks.items() if k.split()[0].rstrip(",") == flag]
            shown = f"(default: {action.default})"
            assert entry.count("default") == 1 and shown in entry, f"parallm {name}: {entry}"


@pytest.mark.parametrize(
    ("command", "required"),
    [(["serve"], []), (["generate"], []), (["bench", "serve"], ["--base-url", "http://x"])],
)
def test_a_wrong_flag_prints_the_subcommands_usage(command, required, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, *required, "--bogus"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    name = " ".join(["parallm", *command])
    assert err.startswith(f"usage: {name} ")
    assert err.rstrip().endswith(f"{name}: error: unrecognized arguments: --bogus")


def _engine_flags(*flags: str) -> dict[str, Any]:
    return engine_kwargs(build_parser().parse_args(["generate", "x", *flags]))


def test_vllm_engine_flag_spellings():
    assert _engine_flags()["enable_prefix_caching"] is True
    assert _engine_flags()["enable_chunked_prefill"] is True
    for flag in ("--no-enable-prefix-caching", "--no-prefix-caching"):
        assert _engine_flags(flag)["enable_prefix_caching"] is False, flag
    assert _engine_flags("--no-prefix-caching", "--enable-prefix-caching")["enable_prefix_caching"]
    for flag in ("--no-enable-chunked-prefill", "--no-chunked-prefill"):
        kwargs = _engine_flags(flag, "--max-num-batched-tokens", "100000")
        assert kwargs["enable_chunked_prefill"] is False, flag
    kwargs = _engine_flags("--tokenizer", "tok/dir", "--chat-template", "t.jinja")
    assert (kwargs["tokenizer"], kwargs["chat_template"]) == ("tok/dir", "t.jinja")


def test_bench_latency_vllm_spellings():
    args = build_parser().parse_args(["bench", "latency", "--batch-size", "4", "--num-iters", "7"])
    assert (args.batch_sizes, args.iters) == ([4], 7)
    args = build_parser().parse_args(["bench", "latency", "--batch-sizes", "1,8"])
    assert args.batch_sizes == [1, 8]


def test_generate_n_samples_streamed_labelled(tiny_model_dir, capsys):
    code = main(["generate", "--model", str(tiny_model_dir("llama3")), "--device", "cpu",
                 "--max-tokens", "5", "--n", "3", "--temperature", "1.0", "--sampling-seed", "1",
                 "--ignore-eos", "Hello"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    labels = [line for line in out.splitlines() if line.startswith("--- sample")]
    assert sorted(labels) == [f"--- sample {i} of 3 (finish_reason: length) ---" for i in (1, 2, 3)]
    samples = [chunk.split("\n", 1)[1] for chunk in out.split("--- sample")[1:]]
    assert len(samples) == 3 and all(s.startswith("Hello") and len(s) > 6 for s in samples)


def test_generate_one_prompt_writes_every_sample_to_output(tiny_model_dir, tmp_path, capsys):
    result = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir("llama3")), "--device", "cpu",
                 "--max-tokens", "4", "--n", "2", "--temperature", "0.8", "--ignore-eos",
                 "--output", str(result), "Hello"])  # fmt: skip
    assert code == 0
    (record,) = [json.loads(line) for line in result.read_text().splitlines()]
    assert record["prompt"] == "Hello"
    assert [c["index"] for c in record["completions"]] == [0, 1]
    assert all(c["num_tokens"] == 4 and c["text"] for c in record["completions"])
    assert capsys.readouterr().out == ""  # the samples went to the file


@pytest.mark.parametrize("as_file", [False, True])
def test_chat_template_flag(tiny_model_dir, tmp_path, as_file):
    template = CHAT_TEMPLATE
    if as_file:
        (tmp_path / "chat.jinja").write_text(template)
        template = str(tmp_path / "chat.jinja")
    result = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_model_dir("llama3")), "--device", "cpu",
                 "--max-tokens", "2", "--chat", "--chat-template", template, "--output",
                 str(result), "Hi there"])  # fmt: skip
    assert code == 0
    (record,) = [json.loads(line) for line in result.read_text().splitlines()]
    assert record["prompt"] == "<<user>>Hi there\nASSISTANT:"


@pytest.mark.parametrize(
    ("template", "message"),
    [("missing.jinja", "is no file, nor a Jinja template"), ("{% for %}", "not a valid Jinja")],
)
def test_a_bad_chat_template_is_refused_before_loading(template, message, capsys):
    # --model names nothing loadable: the template is checked first.
    code = main(["generate", "--model", "/nonexistent", "--chat-template", template, "Hi"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("parallm generate: error: chat_template") and message in err


def test_llm_chat_uses_the_chat_template(tiny_model_dir):
    from parallm import LLM, SamplingParams

    llm = LLM(str(tiny_model_dir("llama3")), device="cpu", chat_template=CHAT_TEMPLATE)
    (out,) = llm.chat([{"role": "user", "content": "Hey"}], SamplingParams(max_tokens=2))
    assert out.prompt == "<<user>>Hey\nASSISTANT:"


def test_tokenizer_from_another_directory(tiny_model_dir, tmp_path, capsys):
    source = tiny_model_dir("llama3")
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(source / name, weights_only / name)
    argv = ["generate", "--model", str(weights_only), "--device", "cpu", "--max-tokens", "3"]
    assert main([*argv, "Hello"]) == 2  # no tokenizer files beside the weights
    assert "cannot load a tokenizer" in capsys.readouterr().err
    assert main([*argv, "--tokenizer", str(source), "Hello"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


def test_serve_takes_vllm_spellings(tiny_model_dir, monkeypatch):
    """``parallm serve MODEL`` with vLLM's flags: the positional model, --uvicorn-log-level,
    --disable-log-requests, --no-enable-prefix-caching and --chat-template reach the engine
    and the server (a chat request is rendered with the template)."""
    from parallm.server import launcher

    seen: dict[str, Any] = {}
    load_engine = launcher.load_engine

    def capture_engine(**kwargs: Any) -> Any:
        seen["engine"] = load_engine(**kwargs)
        return seen["engine"]

    def serve_one_request(app, host, port, drain_timeout_s, log_level, access_log=True):
        seen.update(log_level=log_level, access_log=access_log)
        with launcher.ServerThread(app) as server:
            seen["response"] = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "tiny-chat", "max_tokens": 2,
                      "messages": [{"role": "user", "content": "Hey"}]},
                timeout=60,
            ).json()  # fmt: skip

    monkeypatch.setattr(launcher, "load_engine", capture_engine)
    monkeypatch.setattr(launcher, "run_server", serve_one_request)
    model = str(tiny_model_dir("llama3"))
    code = main(["serve", model, "--device", "cpu", "--served-model-name", "tiny-chat",
                 "--uvicorn-log-level", "warning", "--disable-log-requests",
                 "--no-enable-prefix-caching", "--chat-template", CHAT_TEMPLATE,
                 "--disable-frontend-multiprocessing"])  # fmt: skip
    assert code == 0
    engine = seen["engine"]
    assert engine.config.model == model and engine.config.enable_prefix_caching is False
    assert (seen["log_level"], seen["access_log"]) == ("warning", False)
    rendered = engine.tokenizer("<<user>>Hey\nASSISTANT:", add_special_tokens=False)
    assert seen["response"]["usage"]["prompt_tokens"] == len(rendered["input_ids"])


def test_serve_model_given_twice_must_agree(capsys):
    assert main(["serve", "model-a", "--model", "model-b"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("parallm serve: error: the model is given twice")
    args = build_parser().parse_args(["serve", "m", "--model", "m", "--log-level", "debug"])
    assert (args.model_tag, args.model, args.log_level) == ("m", "m", "debug")


@pytest.mark.slow
def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "parallm", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "generate" in out.stdout


def test_torchrun_entry_shows_defaults_and_its_own_usage(capsys):
    """``python -m parallm.train`` (what torchrun starts) has its own parser: same rules."""
    from parallm.train.__main__ import main as train_main

    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "(default: False)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--bogus"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("usage: python -m parallm.train ")
