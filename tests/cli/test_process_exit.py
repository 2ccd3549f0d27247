"""``exit_now``: the CLI's processes end after their ``atexit`` handlers, with their output
flushed and their exit status, but without the interpreter's finalization."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

# Finalization would sleep in ``__del__`` for longer than this; exit_now must not wait for it.
TIMEOUT_S = 30

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time, weakref
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    from parallm.process_exit import exit_now

    folder = Path(sys.argv[1])

    class Slow:
        def __del__(self, sleep=time.sleep):  # bound now: modules are gone by then
            sleep(600)

    class Owner:
        pass

    KEPT = [Slow()]  # freed only by the interpreter's finalization
    atexit.register(lambda: (folder / "atexit").write_text("ran"))

    def late():
        time.sleep(1)
        (folder / "thread").write_text("ran")

    threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: None)  # an idle pool: its worker must not hold the exit up
    owner = Owner()
    weakref.finalize(owner, lambda: (folder / "finalize").write_text("ran"))
    print("buffered line")  # stdout is a pipe: block-buffered, not yet written
    print("stderr line", file=sys.stderr)
    exit_now(3)
    """
)


def test_exit_now_runs_handlers_flushes_and_skips_finalization(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered line\n"
    assert result.stderr == "stderr line\n"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "finalize").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "ran"


ENTRY = textwrap.dedent(
    """
    import runpy, sys, time

    class Slow:
        def __del__(self, sleep=time.sleep):
            sleep(600)

    KEPT = [Slow()]
    sys.argv = sys.argv[1:]  # the module, then its arguments
    runpy.run_module(sys.argv[0], run_name="__main__")
    """
)


@pytest.mark.parametrize(
    "module, args",
    [("parallm", ["train"]), ("parallm.cli", ["train"]), ("parallm.train", [])],
    ids=["parallm", "cli", "train"],
)
def test_entry_points_end_through_exit_now(tmp_path: Path, module: str, args: list[str]) -> None:
    # ``python -m parallm`` (and so the console script's ``entry``), ``python -m parallm.cli``
    # and ``python -m parallm.train`` are the processes that may hold gloo process groups at
    # the end: they return main()'s status (2, a config error) without waiting for the slow
    # finalizer.
    script = tmp_path / "entry.py"
    script.write_text(ENTRY)
    missing = tmp_path / "missing.toml"
    result = subprocess.run(
        [sys.executable, str(script), module, *args, "--config", str(missing)],
        capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"--config: no such file {missing}" in result.stderr


def test_console_script_is_entry() -> None:
    repo = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["parallm"] == "parallm.cli:entry"
