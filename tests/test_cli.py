"""The command line: streaming generation, file mode with JSON lines, errors and --help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from parallm.cli import build_parser, main


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


def test_help_explains_every_flag():
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    for name, p in sub.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings} has no help"


@pytest.mark.slow
def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "parallm", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "generate" in out.stdout
