"""Shared set-up of the Triton kernel tests: the interpreter on CPU, a subprocess fallback.

Import this before triton. Without CUDA it switches the Triton interpreter on, which only
works if nothing imported triton earlier in the process; when something did (or CUDA is
present, where a global TRITON_INTERPRET would slow the GPU tests down), a test module runs
its interpreter tests in a fresh subprocess instead.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _remember_builtin_names() -> None:
    """Make Triton's interpreter list each package's builtins once.

    The interpreter patches ``triton.language`` again at every call of a nested ``@jit``
    function, finding the builtins with ``inspect.getmembers`` over whole modules and classes
    each time: about a third of an interpreted kernel's time. Here each package's builtin
    names are listed once; every call still checks and patches the members as before (those
    already patched are no builtins any more and are skipped, as before). Without that
    function (another Triton) nothing changes.
    """
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_builtin = getattr(interpreter, "_patch_builtin", None)
    patch_attr = getattr(interpreter, "_patch_attr", None)
    if patch_builtin is None or patch_attr is None or hasattr(patch_builtin, "names"):
        return
    names: dict[int, list[str]] = {}

    def remembering(pkg, builder, scope):
        if id(pkg) not in names:
            members = inspect.getmembers(pkg)
            names[id(pkg)] = [name for name, member in members if tl.core.is_builtin(member)]
        for name in names[id(pkg)]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)

    remembering.names = names
    interpreter._patch_builtin = remembering


if os.environ.get("TRITON_INTERPRET") == "1":
    _remember_builtin_names()


def run_interpreter_suite(test_file: str) -> tuple[str, str]:
    """Run ``test_file``'s CPU tests under TRITON_INTERPRET=1; returns (stdout, tail of both).

    Fails the calling test when that run fails.
    """
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    cmd += ["-m", "not gpu", "-k", "not in_subprocess", os.path.abspath(test_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    return proc.stdout, output


def check_interpreter_suite(
    test_file: str, interpreting: bool, skip_marker: str | None = None
) -> None:
    """Body of each kernel suite's ``test_interpreter_suite_in_subprocess``.

    In interpreter mode the suite's interpreter tests run in this process: only check the mode.
    Otherwise run them in a subprocess and require that they passed with nothing skipped (a
    ``skip_marker`` line in its output skips instead: a known limit of that Triton).
    """
    import pytest

    if interpreting:
        assert os.environ.get("TRITON_INTERPRET") == "1"
        return
    stdout, output = run_interpreter_suite(test_file)
    if skip_marker is not None and skip_marker in stdout:
        pytest.skip(skip_marker)
    assert " passed" in stdout and " skipped" not in stdout, output


def kernel_modes(kernel: object) -> tuple[bool, object, object]:
    """``(interpreting, interpreter_test, requires_cuda)`` for a suite of ``kernel``'s module.

    ``interpreting``: triton's helpers and the kernel were both built in interpreter mode.
    ``interpreter_test`` skips a test unless so (the subprocess test then runs it);
    ``requires_cuda`` skips one without a CUDA device running compiled kernels.
    """
    import pytest
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    interpreting = isinstance(tl.zeros, InterpretedFunction) and isinstance(
        kernel, InterpretedFunction
    )
    interpreter_test = pytest.mark.skipif(
        not interpreting, reason="triton not in interpreter mode here; run by the subprocess test"
    )
    requires_cuda = pytest.mark.skipif(
        not torch.cuda.is_available() or interpreting,
        reason="needs a CUDA device, compiled kernels",
    )
    return interpreting, interpreter_test, requires_cuda
