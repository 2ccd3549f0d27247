"""Ending a process whose work is done without the interpreter's finalization."""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Wait for the non-daemon threads and run the ``atexit`` handlers, as a normal exit does,
    flush stdout and stderr, then end the process with ``code`` and without the interpreter's
    finalization.

    Call it once the caller's own cleanup is done (files closed, process groups destroyed).
    What a normal exit does first still happens: ``threading``'s shutdown (thread pools' exit
    hooks, then a join of every non-daemon thread) and the ``atexit`` handlers:
    multiprocessing's finalizers (which release the semaphores that libraries made, such as
    tqdm's lock), ``weakref.finalize`` callbacks, logging's flush. What is skipped is freeing
    the remaining objects one by one, for two reasons:

    - It is unsafe after a gloo process group. Its worker threads drop their last
      collective's tensors after the caller has been told that the collective finished, and
      dropping a tensor that Python has seen takes the GIL. If the main thread has begun
      finalizing by then, CPython ends the worker thread from inside a C++ destructor, and the
      process aborts ("terminate called without an active exception"; PyTorch issue 190489).
      ``destroy_process_group`` does not prevent it: DTensor's sharding caches keep the
      groups, and so their threads, alive until finalization.
    - It is slow after an engine: the model, the KV cache, CUDA graphs and kernels, and the
      whole heap are freed and collected one by one. On a GPU that can outlast a client's
      stop timeout, while the operating system reclaims it all at once.
    """
    threading._shutdown()  # what Py_FinalizeEx does first (private, in every CPython 3)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
