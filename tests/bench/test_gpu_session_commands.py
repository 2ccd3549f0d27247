"""The command lines that the next GPU session runs (scripts/gpu_session.sh, scripts/ab_trees.sh,
benchmarks/peers/run_peers.sh) parse with their programs' real argparse parsers, and read only
files that exist: a misspelt flag or path costs a whole device call, found only there.

Each script runs under bash as on the device, so that bash itself expands its variables, loops
and arrays, with the programs it starts (python3, torchrun, nvidia-smi) replaced by stubs that
record their arguments and the script line that started them (a DEBUG trap exports $LINENO).
nvidia-smi reports 2 GPUs, so the multi-GPU branches run too. Every line of a script that starts
python3 or torchrun must have been reached (or be listed in NOT_REACHED with the reason), and
every recorded call is parsed by the parser its program builds:

- ``python3 -m parallm[.cli] ...``: ``parallm.cli.build_parser()``;
- ``python3 benchmarks/X.py`` / ``scripts/X.py`` / ``torchrun ... benchmarks/X.py``: the module's
  ``parse_args(argv)`` (with its checks after parsing) or ``build_parser()``;
- ``torchrun ...``: torch's own torchrun parser, then ``-m parallm.bench.train``'s ``main(argv)``
  with its ``run`` replaced (``main`` builds its parser inline);
- ``python3 -m pytest PATHS``: the test files exist.

``python3 -c CODE``, ``python3 - <<heredoc`` and ``python3 -m pip`` are inline code or the
environment, not programs of this repository: INLINE_OK says so for each, and nothing else is
let through unparsed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest

REPO = Path(__file__).resolve().parents[2]
GPU_SESSION = "scripts/gpu_session.sh"
AB_TREES = "scripts/ab_trees.sh"
RUN_PEERS = "benchmarks/peers/run_peers.sh"
PERF_NOTES = REPO / "docs/PERF_NOTES.md"
NEXT_SESSION_HEADING = "## Next GPU session, in this order"

# Inputs that are not in the repository but carried to the device (`run`'s carry), with where
# they come from here. A step reading any other hidden path reads something that is not there.
CARRIED_INPUTS = {
    ".peers/data/AzureLLMInferenceTrace_conv.csv": "carry .peers/data (benchmarks/peers/README.md)",
    ".whl/server": "carry .whl (the server's wheels, docs/PERF_NOTES.md)",
}
# Folders that earlier steps write on the device (bundled, spectrain, specheads) and later ones
# read: not in the repository; unwritten_runs_paths checks that a train or export call of the
# script writes each.
PRODUCED_ON_DEVICE = ("runs/",)
# Script lines (by a piece of their text) that start python3/torchrun and are not reached by
# the stubbed run, each with the reason. Empty: every invocation is reached.
NOT_REACHED: dict[str, str] = {}
# python3 calls that run no program of this repository, so have no parser to check.
INLINE_OK = {
    "-c": "inline code (environment checks, a health probe, arithmetic)",
    "-": "inline code from a heredoc (ab_trees.sh's table)",
    "pip": "installing the server wheels (pip's own flags)",
}
# Every step that exists is run: these are what the steps read from the environment, set to
# values that take each step's widest branch.
STEP_ENV = {"SHAPES": "8b 1b", "MBS": "4"}

STUB_PYTHON = r"""#!/usr/bin/env bash
# Records this call (the script line that made it, where, then argv) and stands in for it.
printf '%s\0' "${GS_LINE:-0}" "$(basename "$0")" "$PWD" "${PYTHONPATH:-}" "$@" \
  > "$GS_RECORDS/$(date +%s%N).$$"
case "${1:-} ${2:-} ${3:-}" in
  "-c "*) [[ $2 == *health* && -n ${GS_NO_HEALTH:-} ]] && exit 1  # a server that never answers
          [[ $2 == *find_spec* ]] && exec "$GS_REAL_PYTHON" -c "$2"  # where a package is: real
          [[ $2 == *import* ]] && exit 0  # environment checks and the health probe pass
          exec "$GS_REAL_PYTHON" -c "$2" ;;  # arithmetic (engineproc's ratio) really runs
  "- "*) cat > /dev/null ;;
  "-m parallm.cli serve"|"-m parallm serve") exec "$(command -p -v sleep)" 60 ;;  # until stopped
esac
exit 0
"""
STUB_RECORD = r"""#!/usr/bin/env bash
printf '%s\0' "${GS_LINE:-0}" "$(basename "$0")" "$PWD" "${PYTHONPATH:-}" "$@" \
  > "$GS_RECORDS/$(date +%s%N).$$"
"""
STUB_NVIDIA_SMI = r"""#!/usr/bin/env bash
if [[ ${1:-} == -L ]]; then echo "GPU 0: NVIDIA H100 (stub)"; echo "GPU 1: NVIDIA H100 (stub)"
else echo "NVIDIA H100 (stub), 81559 MiB, 550.00"; fi
"""
# Runs the script as `bash SCRIPT ARGS` would, with a DEBUG trap (inherited by functions and
# subshells: set -T) that exports the line about to run to the stubs.
WRAPPER = 'set -T; trap "export GS_LINE=\\$LINENO" DEBUG; source "$0" "$@"'


@dataclass
class Call:
    line: int  # the script line that started it
    program: str  # python3 or torchrun
    cwd: str
    pythonpath: str
    argv: list[str]

    def __str__(self) -> str:
        return f"line {self.line}: {self.program} {shlex.join(self.argv)}"


@dataclass
class ScriptRun:
    script: str
    text: str
    calls: list[Call]
    output: str
    root: Path  # $OUT and the tree the script ran in are under it


# ---- running a script with its programs stubbed ----------------------------------------------


def make_tree(root: Path, script: str, text: str) -> Path:
    """A tree of symlinks to the repository in which ``script`` holds ``text`` (the folders on
    its path are real, so that only the script differs); the carried inputs (CARRIED_INPUTS),
    the device's outputs of earlier steps (runs/) and the A/B tree (.ab/old) exist, so that the
    steps reading them branch as they would there."""
    tree = root / "tree"
    tree.mkdir()
    folder, source = tree, REPO
    parts = Path(script).parts
    for i, part in enumerate(parts):
        for entry in source.iterdir():
            hidden = i == 0 and entry.name.startswith(".")  # .git, .venv, carried folders
            if entry.name != part and not hidden and entry.name != "runs":
                (folder / entry.name).symlink_to(entry)
        if i < len(parts) - 1:
            folder, source = folder / part, source / part
            folder.mkdir()
    (folder / parts[-1]).write_text(text)
    for made in ("runs/code-model-150m/hf", "runs/medusa-code-150m/heads"):
        (tree / made).mkdir(parents=True)
        (tree / made / "config.json").write_text("{}")
    (tree / ".ab/old/parallm").mkdir(parents=True)
    (tree / ".ab/old/parallm/__init__.py").write_text("")
    for carried in CARRIED_INPUTS:
        if carried.endswith(".csv"):
            (tree / carried).parent.mkdir(parents=True, exist_ok=True)
            (tree / carried).write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
        else:
            (tree / carried).mkdir(parents=True)
    return tree


def make_stubs(folder: Path) -> Path:
    folder.mkdir()
    for name, text in (("python3", STUB_PYTHON), ("torchrun", STUB_RECORD), ("pip", STUB_RECORD),
                       ("nvidia-smi", STUB_NVIDIA_SMI), ("sleep", "#!/bin/sh\n")):  # fmt: skip
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


def run_script(root: Path, script: str, args: list[str], text: str | None = None,
               env: dict[str, str] | None = None) -> ScriptRun:  # fmt: skip
    """Runs ``script`` (its text in the repository, or ``text``) with ``args`` under bash, its
    programs stubbed; returns the calls they recorded."""
    text = (REPO / script).read_text() if text is None else text
    root.mkdir(parents=True, exist_ok=True)
    tree = make_tree(root, script, text)
    records, out = root / "records", root / "out"
    records.mkdir()
    stubs = make_stubs(root / "stubs")
    run_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))},
        "PATH": f"{stubs}:{os.environ['PATH']}",
        "OUT": str(out),
        "GS_RECORDS": str(records),
        "GS_REAL_PYTHON": sys.executable,
        "HOME": str(root),
        **(env or {}),
    }
    proc = subprocess.Popen(["bash", "-c", WRAPPER, str(tree / script), *args], cwd=tree,
                            env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=120)
    finally:  # a stubbed server left running if the script died before stop_server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    calls = []
    for record in sorted(records.iterdir(), key=lambda p: p.name):
        line, program, cwd, pythonpath, *argv = record.read_bytes().decode().split("\0")[:-1]
        calls.append(Call(int(line), program, cwd, pythonpath, argv))
    return ScriptRun(script, text, calls, output, root)


# ---- what a script's text says ---------------------------------------------------------------

INVOCATION = re.compile(r"(?:^|[\s;(|&{]|\$\()(python3|torchrun)\s")


def invocation_lines(text: str) -> dict[int, str]:
    """Line number -> text of every line that starts python3 or torchrun (comments aside)."""
    lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        if INVOCATION.search(code):
            lines[number] = line.strip()
    return lines


def case_names(text: str) -> list[str]:
    """The steps of gpu_session.sh: the labels of its ``case $step in`` block."""
    block = text.split("case $step in", 1)[1].split("esac", 1)[0]
    return re.findall(r"^\s*([a-z][a-z0-9]*)\)", block, flags=re.MULTILINE)


def perf_notes_steps(notes: str) -> dict[str, list[str]]:
    """Step name -> the flags the plan gives it, for every step that PERF_NOTES' next-session
    plan names: the words of `gpu_session.sh a b c` spans, and spans made only of step-like
    words (`spectrain`, `specheads specreal quantquality`), each optionally followed by flags
    (`latency8b1 --quantization fp8|int8`)."""
    section = notes.split(NEXT_SESSION_HEADING, 1)[1].split("\n## ", 1)[0]
    steps: dict[str, list[str]] = {}
    for span in re.findall(r"`([^`]+)`", section.replace("\n", " ")):
        words = span.split()
        if "gpu_session.sh" in span:
            words = words[[i for i, w in enumerate(words) if w.endswith("gpu_session.sh")][0] + 1 :]
        first_flag = next((i for i, w in enumerate(words) if w.startswith("-")), len(words))
        names, flags = words[:first_flag], words[first_flag:]
        if not names or not all(re.fullmatch(r"[a-z][a-z0-9]*", w) for w in names):
            continue
        for name in names:
            steps[name] = flags
    return steps


# ---- parsing a recorded call with its program's parser ---------------------------------------


_ARGPARSE_INIT = argparse.ArgumentParser.__init__


def _full_flags_only(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
    # A script's flags are spelt in full: an abbreviation that parses today stops parsing
    # ("ambiguous option") as soon as the program gains a flag with the same prefix.
    _ARGPARSE_INIT(self, *args, **{**kwargs, "allow_abbrev": False})


def _argparse_error(parse, argv: list[str]) -> str | None:
    """None if ``parse(argv)`` accepts ``argv`` (its parsers built inside ``parse``, flags
    spelt in full), else argparse's message."""
    err = io.StringIO()
    try:
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
            mock.patch.object(argparse.ArgumentParser, "__init__", _full_flags_only),
        ):
            parse(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue() else f"exit {e.code}"
    return None


_MODULES: dict[Path, object] = {}


def load_program(path: Path):  # noqa: ANN201 - a module
    """The program at ``path`` as a module, its folder on the path as when Python runs it (a
    script imports its neighbours)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    if path not in _MODULES:
        name = f"_gpu_session_program_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while being made
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules.pop(name, None)
        _MODULES[path] = module
    return _MODULES[path]


def script_parse(path: Path):  # noqa: ANN201 - a function of argv
    """The program's own parse: ``parse_args(argv)`` (with the checks it makes after parsing)
    where it takes argv, else ``build_parser().parse_args``."""
    module = load_program(path)
    parse_args = getattr(module, "parse_args", None)
    if parse_args is not None and parse_args.__code__.co_argcount >= 1:
        return parse_args
    if hasattr(module, "build_parser"):
        return lambda argv: module.build_parser().parse_args(argv)
    raise AssertionError(f"{path.relative_to(REPO)} exposes neither parse_args(argv) "
                         "nor build_parser(): the test cannot check its flags")  # fmt: skip


def parallm_parse(argv: list[str]) -> None:
    from parallm.cli import build_parser

    build_parser().parse_args(argv)


def bench_train_parse(argv: list[str]) -> None:
    """``python -m parallm.bench.train`` (torchrun's module): its main parses, run is not run."""
    from parallm.bench import train

    with mock.patch.object(train, "run"):
        train.main(argv)


def inline_kind(argv: list[str]) -> str | None:
    """The INLINE_OK key of a python3 call that runs no program of the repository."""
    if argv[:1] in (["-c"], ["-"]):
        return argv[0]
    return "pip" if argv[:2] == ["-m", "pip"] else None


def program_error(call: Call) -> str | None:
    """None if ``call``'s program accepts its arguments, else why not."""
    argv = call.argv
    if call.program == "torchrun":
        from torch.distributed.run import get_args_parser

        error = _argparse_error(lambda a: get_args_parser().parse_args(a), argv)
        if error:
            return f"torchrun: {error}"
        ns = get_args_parser().parse_args(argv)
        if ns.module:
            if ns.training_script != "parallm.bench.train":
                return f"torchrun -m {ns.training_script}: no parser known to this test"
            return _argparse_error(bench_train_parse, ns.training_script_args)
        return script_error(ns.training_script, ns.training_script_args)
    if call.program != "python3":
        return f"{call.program}: not a program this test knows"
    if inline_kind(argv) in INLINE_OK:
        return None
    if argv[:1] == ["-m"] and argv[1] in ("parallm", "parallm.cli"):
        return _argparse_error(parallm_parse, argv[2:])
    if argv[:2] == ["-m", "pytest"]:
        missing = [a for a in argv[2:] if a.startswith("tests/") and not (REPO / a).exists()]
        return f"pytest: no such test file {missing}" if missing else None
    if argv and argv[0].endswith(".py"):
        return script_error(argv[0], argv[1:])
    return f"python3 {shlex.join(argv[:2])}: no parser known to this test"


def script_error(script: str, argv: list[str]) -> str | None:
    path = REPO / script
    if not path.is_file():
        return f"no such program {script}"
    with mock.patch.object(sys, "argv", [path.name]):  # argparse's prog, as the script has it
        return _argparse_error(script_parse(path), argv)


def path_problems(call: Call, root: Path) -> list[str]:
    """Paths among the call's arguments that the device will not have: a repository path that
    does not exist, a hidden (carried) input that CARRIED_INPUTS does not list, an absolute
    path outside $OUT and the working tree (both under ``root`` here)."""
    if inline_kind(call.argv) in ("-c", "-"):
        return []  # code, not paths
    problems = []
    values = [a.split("=", 1)[1] if a.startswith("--") and "=" in a else a for a in call.argv]
    for value in values:
        if value.startswith(f"{root}/tree/"):  # in the working tree: as a relative path
            value = value[len(f"{root}/tree/") :]
        elif value.startswith(f"{root}/"):  # $OUT, the test's own files
            continue
        if "/" not in value or "://" in value or value.startswith(PRODUCED_ON_DEVICE):
            continue
        if value.startswith("/"):
            problems.append(f"{call}: absolute path {value} outside $OUT")
        elif value.startswith("."):
            if value not in CARRIED_INPUTS:
                problems.append(f"{call}: {value} is neither in the repository nor a known "
                                f"carried input (CARRIED_INPUTS)")  # fmt: skip
        elif not (REPO / value).exists():
            problems.append(f"{call}: no such file {value}")
    return problems


def written_on_device(calls: list[Call], tree: Path) -> tuple[set[str], list[str]]:
    """The folders that the run's ``parallm train`` calls (their configs' logging, checkpoint
    and dataset folders) and ``parallm export`` calls (--out) write; and each train config
    that does not load (an unknown key, a bad value), as TrainConfig.load reports it in the
    script's working tree (where a Medusa config's target, made by an earlier step, is)."""
    from parallm.cli import build_parser
    from parallm.train.config import TrainConfig

    written, problems = set(), []
    for call in calls:
        if call.argv[:2] not in (["-m", "parallm"], ["-m", "parallm.cli"]):
            continue
        if _argparse_error(parallm_parse, call.argv[2:]):
            continue  # program_error reports it
        args = build_parser().parse_args(call.argv[2:])
        if args.command == "export":
            written.add(str(args.out))
        elif args.command == "train":
            cwd = os.getcwd()
            try:
                os.chdir(tree)
                cfg = TrainConfig.load(args.config, args.overrides)
            except ValueError as e:
                problems.append(f"{call}\n    -> {e}")
                continue
            finally:
                os.chdir(cwd)
            written |= {cfg.logging.dir, str(cfg.checkpoint_dir), cfg.data.dataset_dir}
    return written, problems


def unwritten_runs_paths(text: str, written: set[str]) -> list[str]:
    """runs/ paths in the script (arguments, cp, mv, tests) that no train or export call of
    the run writes: a step would read a folder an earlier step never made."""
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        code = "" if line.lstrip().startswith("#") else line
        for path in re.findall(r"runs/[\w.-]+(?:/[\w.-]+)*", code):
            if not any(path == w or path.startswith(f"{w}/") for w in written):
                problems.append(f"line {number}: {path} is written by no train or export call "
                                f"(they write {sorted(written)})")  # fmt: skip
    return problems


def check(run: ScriptRun) -> list[str]:
    """Everything wrong with a stubbed run of a script: unreached invocation lines, unknown
    steps, calls their programs reject, paths the device will not have, train configs that do
    not load."""
    problems = []
    written, config_problems = written_on_device(run.calls, run.root / "tree")
    problems += [f"{run.script} {p}" for p in config_problems]
    problems += [f"{run.script} {p}" for p in unwritten_runs_paths(run.text, written)]
    reached = {c.line for c in run.calls}
    for number, line in invocation_lines(run.text).items():
        if number not in reached and not any(piece in line for piece in NOT_REACHED):
            problems.append(f"{run.script} line {number} never ran: {line}")
    problems += [f"{run.script}: {line}" for line in run.output.splitlines()
                 if line.startswith("unknown step")]  # fmt: skip
    for call in run.calls:
        error = program_error(call)
        if error:
            problems.append(f"{run.script} {call}\n    -> {error}")
        problems += [f"{run.script} {p}" for p in path_problems(call, run.root)]
    return problems


# ---- the scripts -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_session_text() -> str:
    return (REPO / GPU_SESSION).read_text()


def run_every_step(root: Path, text: str) -> ScriptRun:
    return run_script(root, GPU_SESSION, case_names(text), text=text, env=STEP_ENV)


def test_gpu_session_every_step_parses_and_reads_existing_files(gpu_session_text, tmp_path):
    run = run_every_step(tmp_path, gpu_session_text)
    assert len(case_names(gpu_session_text)) >= 20, "the case block was not found"
    assert len(run.calls) >= 60, run.output[-3000:]
    problems = check(run)
    assert not problems, "\n".join(problems)


def test_specreal_measures_the_heads_that_specheads_trains(tmp_path):
    """specreal (after specheads, whose heads exist in the tree) runs the medusa drafter on
    runs/medusa-code-150m/heads besides the default ones."""
    run = run_script(tmp_path, GPU_SESSION, ["specreal"])
    bench = REPO / "benchmarks/spec_real_bench.py"
    (call,) = [c for c in run.calls if c.argv[:1] == ["benchmarks/spec_real_bench.py"]]
    drafters = load_program(bench).drafter_configs(script_parse(bench)(call.argv[1:]), 12)
    assert set(drafters) == {"ngram", "draft_model", "layer_skip", "medusa"}, call
    assert drafters["medusa"]["model"] == "runs/medusa-code-150m/heads"


def test_quantquality_windows_fit_the_150m_model(tmp_path):
    """quantquality scores windows of --seq-len + 1 tokens as prompts: on the 150M model that
    spectrain exports, they must fit its max_position_embeddings (the engine's max_model_len)."""
    from parallm.train.config import TrainConfig

    run = run_script(tmp_path, GPU_SESSION, ["quantquality"])
    bench = REPO / "benchmarks/quant_quality.py"
    calls = [c for c in run.calls if c.argv[:1] == ["benchmarks/quant_quality.py"]]
    (args,) = [a for a in (script_parse(bench)(c.argv[1:]) for c in calls) if "150m" in a.model]
    assert args.model == "runs/code-model-150m/hf"  # spectrain: code-model-150m.toml, exported
    trained = TrainConfig.load(REPO / "configs/train/code-model-150m.toml")
    assert args.seq_len + 1 <= trained.model.max_position_embeddings


def test_gpu_session_without_steps_runs_its_default_steps(tmp_path):
    """`bash scripts/gpu_session.sh` alone runs the GPU tests and the 1B latency row."""
    run = run_script(tmp_path, GPU_SESSION, [])
    assert "unknown step" not in run.output
    ran = [c.argv for c in run.calls if c.program == "python3"]
    assert any(a[:3] == ["-m", "pytest", "-q"] for a in ran), run.output[-2000:]
    assert any(a[:4] == ["-m", "parallm.cli", "bench", "latency"] for a in ran)


def test_gpu_session_serve_skips_a_server_that_never_answers(tmp_path):
    """start_server gives up after its 300 tries (sleep is stubbed), stops the server, and
    serve runs nothing against it; the next step runs."""
    run = run_script(tmp_path, GPU_SESSION, ["serve", "latency"], env={"GS_NO_HEALTH": "1"})
    assert "server did not answer /health in 300 s" in run.output, run.output[-2000:]
    ran = [c.argv for c in run.calls]
    assert not any(("bench" in a and "serve" in a) or "scripts/load_test.py" in a for a in ran)
    assert any(a[:4] == ["-m", "parallm.cli", "bench", "latency"] for a in ran)


def test_ab_trees_table_reports_a_benchmark_that_failed_on_one_side(tmp_path):
    """ab_trees.sh's closing table: a benchmark with no JSON on one side is named, and the
    others' ratios are still printed."""
    text = (REPO / AB_TREES).read_text()
    table = text.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    for name, ms in (
        ("latency_1b_old_r1", 1.0),
        ("latency_1b_new_r1", 0.8),
        ("latency_8b_new_r1", 5.0),
    ):
        rows = [{"batch_size": 1, "ms_per_token": ms}]
        (tmp_path / f"{name}.json").write_text(json.dumps({"results": rows}))
    proc = subprocess.run(
        [sys.executable, "-c", table, str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("latency_1b") and line.endswith("0.800") for line in lines), lines
    assert any(line.startswith("latency_8b") and "only new ran" in line for line in lines), lines


def test_ab_trees_commands_parse(tmp_path):
    run = run_script(tmp_path, AB_TREES, ["1"])
    assert sum(c.argv[:2] == ["-m", "parallm.cli"] for c in run.calls) == 8, run.output[-2000:]
    problems = check(run)
    assert not problems, "\n".join(problems)


def imported_package(call: Call) -> Path | None:
    """The parallm package ``python3 -m parallm.cli`` imports: sys.path starts with the working
    directory, then PYTHONPATH (site-packages come after: never reached here)."""
    for entry in [call.cwd, *call.pythonpath.split(":")]:
        if entry and (Path(entry) / "parallm/__init__.py").is_file():
            return Path(entry) / "parallm"
    return None


def test_ab_trees_each_side_runs_its_own_tree(tmp_path):
    run = run_script(tmp_path, AB_TREES, ["1"])
    assert "imports parallm from" not in run.output, run.output  # the script's own check
    tree = tmp_path / "tree"
    sides = {"old": tree / ".ab/old/parallm", "new": tree / "parallm"}
    runs = [c for c in run.calls if c.argv[:2] == ["-m", "parallm.cli"]]
    assert len(runs) == 8
    for call in runs:
        side = "old" if "_old_r1" in call.argv[call.argv.index("--out") + 1] else "new"
        assert imported_package(call) == sides[side], call


# benchmarks/peers/README.md's calls of run_peers.sh; serve reads the carried trace, here a
# stand-in file (TRACE), as run_vllm checks that it exists (test_vllm_peer_runner.py tests that).
RUN_PEERS_CALLS = [
    ["smoke"],
    ["--models", "llama-3.2-1b", "--steps", "offline"],
    ["--models", "llama-3.2-1b", "--steps", "latency"],
    ["--models", "llama-3.2-1b", "--steps", "serve", "--trace", "TRACE"],
    ["--models", "qwen3-0.6b", "--steps", "offline,latency"],
    ["--models", "llama-3.1-8b", "--steps", "latency"],
]


@pytest.mark.parametrize("args", RUN_PEERS_CALLS, ids=lambda a: " ".join(a[:4]))
def test_run_peers_commands_parse(args, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    run = run_script(tmp_path, RUN_PEERS, [str(trace) if a == "TRACE" else a for a in args])
    assert [c.argv[0] for c in run.calls if c.argv[0].endswith(".py")] == [
        "benchmarks/peers/run_vllm.py"
    ], run.output[-2000:]
    problems = check(run)
    assert not problems, "\n".join(problems)


def test_run_vllm_builds_parallm_commands_that_parse(tmp_path):
    """run_vllm.py's own parallm commands (smoke, offline, latency) parse with parallm's."""
    run_vllm = load_program(REPO / "benchmarks/peers/run_vllm.py")
    args = run_vllm.parse_args(["--steps", "smoke,offline,latency", "--work", str(tmp_path)])
    commands = []
    with mock.patch.object(run_vllm, "run_logged", lambda name, cmd, a: commands.append(cmd)):
        for step in (run_vllm.step_smoke, run_vllm.step_offline, run_vllm.step_latency):
            step(args, "llama-3.2-1b")
    assert len(commands) == 3
    for cmd in commands:
        assert cmd[1:3] == ["-m", "parallm.cli"]
        assert _argparse_error(parallm_parse, cmd[3:]) is None, cmd


def test_perf_notes_next_session_names_existing_steps(gpu_session_text):
    """Every step that the next session's plan names is a case of gpu_session.sh, and steps
    take no flags (the plan passes flags through the environment the step reads)."""
    planned = perf_notes_steps(PERF_NOTES.read_text())
    # The plan changes every session; these are in this one's (the parser must find them, in
    # `VAR=x gpu_session.sh a b` spans and in bare ones).
    assert {"tests", "spectrain", "specsteps", "specreal", "quantvariants"} <= set(planned)
    cases = set(case_names(gpu_session_text))
    assert sorted(set(planned) - cases) == []
    assert {step: flags for step, flags in planned.items() if flags} == {}


# ---- the check itself fails on a broken script ------------------------------------------------


def test_a_misspelt_flag_is_caught(gpu_session_text, tmp_path):
    broken = gpu_session_text.replace(
        "--batch-sizes 1,8 --iters 2", "--batch-sizes 1,8 --itres 2", 1
    )
    assert broken != gpu_session_text
    problems = check(run_every_step(tmp_path, broken))
    assert len(problems) == 1 and "unrecognized arguments: --itres 2" in problems[0], problems


def test_an_abbreviated_flag_is_caught(gpu_session_text, tmp_path):
    """argparse takes --iter for --iters, until the program gains an --iter-something flag."""
    broken = gpu_session_text.replace(
        "--batch-sizes 1,8 --iters 2", "--batch-sizes 1,8 --iter 2", 1
    )
    assert broken != gpu_session_text
    problems = check(run_every_step(tmp_path, broken))
    assert len(problems) == 1 and "unrecognized arguments: --iter 2" in problems[0], problems


def test_a_misspelt_benchmark_flag_is_caught(gpu_session_text, tmp_path):
    broken = gpu_session_text.replace("--k 2,4,8", "--ks 2,4,8")
    assert broken != gpu_session_text
    problems = check(run_every_step(tmp_path, broken))
    assert len(problems) == 2 and all("unrecognized arguments: --ks" in p for p in problems)


def test_a_missing_config_and_an_unreached_line_are_caught(gpu_session_text, tmp_path):
    broken = gpu_session_text.replace("configs/train/code-model.toml", "configs/train/code.toml")
    broken = broken.replace("    allreduce)", "    allreduce_)")  # a label no step name matches
    problems = check(run_every_step(tmp_path, broken))
    assert any("no such file configs/train/code.toml" in p for p in problems), problems
    assert any("never ran" in p and "allreduce_bench.py" in p for p in problems), problems


def test_plan_checks_catch_a_missing_step_and_flags():
    notes = f"{NEXT_SESSION_HEADING}\n1. `gpu_session.sh tests servr`, then `latency8b1 --x y`.\n"
    assert perf_notes_steps(notes) == {"tests": [], "servr": [], "latency8b1": ["--x", "y"]}


def test_a_bad_train_setting_and_an_unmade_runs_folder_are_caught(gpu_session_text, tmp_path):
    broken = gpu_session_text.replace(
        "configs/train/code-model.toml --plot",
        "configs/train/code-model.toml --set training.stpes=5 --plot",
    ).replace("runs/data/stdlib-8k/meta.json", "runs/data/stdlib-16k/meta.json")
    problems = check(run_every_step(tmp_path, broken))  # (and the folders of the unloaded config)
    assert "unknown config key 'training.stpes'" in problems[0], problems
    assert any("runs/data/stdlib-16k/meta.json is written by no train" in p for p in problems)
