"""Tensor parallelism across "hosts": each rank a separate process launched with the
torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) on localhost,
as ``torchrun --nnodes 2 --nproc-per-node 1`` would start them on two machines. Rank 0 runs
the engine; rank 1 runs the same ``LLM(...)`` script or ``parallm generate`` command and
becomes its worker.

Greedy output equals one rank's; a job whose size is not tensor_parallel_size fails on every
rank at once with a clear error; a rank that dies fails the driver with a clear error, and a
driver that dies makes the worker exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from parallm import LLM, SamplingParams

ENGINE = {"dtype": "float32", "device": "cpu", "max_model_len": 128, "block_size": 16,
          "kv_cache_memory": 8 << 20}  # fmt: skip
PROMPTS = [[5, 17, 42, 99, 7] * 7, [3, 11, 29] * 9, [8, 4] * 20 + [1]]
MAX_TOKENS = 12

# Rank 0's script (and rank 1's, in the "script" case): generate twice, printing the tokens of
# each round, with a line from the test between the rounds.
_SCRIPT = """
import json, sys
from parallm import LLM, SamplingParams
path, tp, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if len(sys.argv) > 5:  # how long any wait for a silent rank may last; heartbeats to match
    import datetime
    import parallm.engine.executor as executor
    import parallm.engine.tp_group as tp_group
    timeout = datetime.timedelta(seconds=float(sys.argv[5]))
    tp_group._COLLECTIVE_TIMEOUT = tp_group._CONTROL_TIMEOUT = timeout
    executor._HEARTBEAT_SECONDS = timeout.total_seconds() / 6
llm = LLM(path, tensor_parallel_size=tp, **json.loads(sys.argv[4]))
params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
try:
    for i in range(rounds):
        if i:
            sys.stdin.readline()
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        print(json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
except RuntimeError as e:
    print("ERROR", json.dumps(str(e)), flush=True)
    sys.exit(3)
finally:
    llm.close()
""".replace("MAX_TOKENS", str(MAX_TOKENS)).replace("PROMPTS", str(PROMPTS))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The variables torchrun sets for one process of a job whose hosts each run one rank."""
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port), "RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": str(rank),
    }  # fmt: skip


def _cli(path, tp: int) -> list[str]:
    return [sys.executable, "-m", "parallm", "generate", "--tensor-parallel-size", str(tp),
            "--model", str(path), "--dtype", "float32", "--device", "cpu",
            "--max-model-len", "128", "--kv-cache-memory", str(8 << 20), "x"]  # fmt: skip


class Job:
    """Every rank of a job as its own process: rank 0 the script, each other rank the same
    script or ``parallm generate`` (``worker``); whatever is still running at the end is killed."""

    def __init__(self, tmp_path, path, tp, world_size, rounds, worker, timeout_s=None,
                 rank0_delay_s=0.0):  # fmt: skip
        script = tmp_path / "job.py"
        script.write_text(_SCRIPT)
        port = _free_port()
        run_script = [sys.executable, str(script), str(path), str(tp), str(rounds),
                      json.dumps(ENGINE)] + ([] if timeout_s is None else [str(timeout_s)])  # fmt: skip
        procs = {}
        # Rank 0 last when it is to come late (after the others wait at the rendezvous).
        for rank in [*range(1, world_size), 0] if rank0_delay_s else range(world_size):
            if rank == 0:
                time.sleep(rank0_delay_s)
            command = run_script if rank == 0 or worker == "script" else _cli(path, tp)
            procs[rank] = subprocess.Popen(
                command, env=_env(rank, world_size, port), text=True, stdout=subprocess.PIPE,
                stdin=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        self.procs = [procs[rank] for rank in range(world_size)]

    def driver_line(self) -> str:
        return self.procs[0].stdout.readline()

    def wait(self, rank: int) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of a rank (a liveness bound: 300 s)."""
        out, err = self.procs[rank].communicate(timeout=300)
        return self.procs[rank].returncode, out, err

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def job_factory(tiny_model_dir, tmp_path):
    jobs = []

    def start(tp=2, world_size=2, rounds=1, worker="cli", timeout_s=None, rank0_delay_s=0.0):
        path = tiny_model_dir("llama3")
        jobs.append(Job(tmp_path, path, tp, world_size, rounds, worker, timeout_s, rank0_delay_s))
        return jobs[-1]

    yield start
    for job in jobs:
        job.kill_all()


def _one_rank(path) -> list[list[int]]:
    llm = LLM(str(path), **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("worker", ["cli", "script"])
def test_two_host_job_generates_like_one_rank(tiny_model_dir, job_factory, worker):
    """Rank 1 runs ``parallm generate ... --tensor-parallel-size 2`` or the same script as
    rank 0; either way it serves rank 0's engine and exits 0 when rank 0 closes it."""
    job = job_factory(worker=worker)
    got = json.loads(job.driver_line())
    code0, _, err0 = job.wait(0)
    code1, out1, err1 = job.wait(1)
    assert (code0, code1) == (0, 0), err0 + err1
    assert got == _one_rank(tiny_model_dir("llama3"))
    assert out1 == ""  # the worker rank generated nothing of its own


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_serve_runs_on_rank_0_and_a_sigterm_stops_the_job(tiny_model_dir, tmp_path):
    """``parallm serve ... -tp 2`` on both "hosts": rank 0 answers HTTP with the same greedy
    text as one rank; SIGTERM to rank 0 drains it, closes the worker, and both exit 0."""
    path, port, http = tiny_model_dir("llama3"), _free_port(), _free_port()
    command = [sys.executable, "-m", "parallm", "serve", "--model", str(path), "--device", "cpu",
               "--dtype", "float32", "-tp", "2", "--max-model-len", "128",
               "--kv-cache-memory", str(8 << 20), "--port", str(http)]  # fmt: skip
    procs = [subprocess.Popen(command, env=_env(rank, 2, port), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for rank in (1, 0)]  # fmt: skip
    try:
        deadline = time.monotonic() + 300  # a liveness bound: both ranks load and join
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), procs[1].communicate()[1]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        body = {"model": str(path), "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        text = _post(f"http://127.0.0.1:{http}/v1/completions", body)["choices"][0]["text"]
        procs[1].send_signal(signal.SIGTERM)  # torchrun's stop reaches every rank
        procs[0].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert codes == [0, 0]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert text == LLM(str(path), **ENGINE).generate([PROMPTS[0]], params)[0].outputs[0].text


def test_a_job_of_another_size_fails_on_every_rank(job_factory):
    """WORLD_SIZE=2 but tensor_parallel_size=4: rank 0 raises before loading, rank 1's
    command exits 2 with the same explanation; neither waits for the missing ranks."""
    job = job_factory(tp=4, world_size=2)
    code0, _, err0 = job.wait(0)
    code1, _, err1 = job.wait(1)
    message = "tensor_parallel_size (4) must equal the torchrun job's WORLD_SIZE (2"
    assert code0 == 1 and message in err0 and "ValueError" in err0
    assert code1 == 2 and f"parallm generate: error: {message}" in err1


def test_a_dead_rank_fails_the_driver_with_a_clear_error(job_factory):
    job = job_factory(rounds=2)
    assert len(json.loads(job.driver_line())) == len(PROMPTS)
    job.procs[1].kill()
    job.procs[1].wait()
    job.procs[0].stdin.write("go\n")
    job.procs[0].stdin.flush()
    code0, out0, err0 = job.wait(0)
    assert code0 == 3, err0
    kind, message = out0.split(" ", 1)
    assert kind == "ERROR"
    assert json.loads(message).startswith(
        "tensor-parallel engine stopped: a rank of the job died or lost its connection"
    )


def test_a_silent_rank_fails_the_driver_after_the_collective_timeout(job_factory):
    """A rank that is there but does not answer (a vanished host keeps no connection open to
    close; a stopped process stands in for it): the driver's next step gives up after the
    collective timeout (here 3 s) instead of waiting for ever."""
    job = job_factory(rounds=2, worker="script", timeout_s=3)
    json.loads(job.driver_line())
    os.kill(job.procs[1].pid, signal.SIGSTOP)
    job.procs[0].stdin.write("go\n")
    job.procs[0].stdin.flush()
    code0, out0, err0 = job.wait(0)
    assert code0 == 3, err0
    message = json.loads(out0.split(" ", 1)[1])
    assert message.startswith("tensor-parallel engine stopped: a rank of the job died or lost")
    assert "timed out" in message.lower()


def test_heartbeats_keep_an_idle_job_alive_past_the_timeout(job_factory):
    """The control group's waits are bounded (2 s here); the driver's no-ops keep idle
    workers waiting for its next step well past that."""
    job = job_factory(rounds=2, worker="script", timeout_s=2)
    first = json.loads(job.driver_line())
    time.sleep(6)  # idle for three timeouts
    job.procs[0].stdin.write("go\n")
    job.procs[0].stdin.flush()
    assert json.loads(job.driver_line()) == first
    code0, _, err0 = job.wait(0)
    code1, _, err1 = job.wait(1)
    assert (code0, code1) == (0, 0), err0 + err1


def test_ranks_wait_at_the_rendezvous_longer_than_the_collective_timeout(job_factory):
    """Ranks start minutes apart on separate hosts: a rank that reaches the rendezvous first
    waits for the rest beyond the collective timeout (2 s here), which bounds steps only."""
    job = job_factory(rounds=1, worker="script", timeout_s=2, rank0_delay_s=5)
    code0, out0, err0 = job.wait(0)
    code1, _, err1 = job.wait(1)
    assert (code0, code1) == (0, 0), err0 + err1
    assert len(json.loads(out0)) == len(PROMPTS)


def test_workers_exit_when_the_driver_dies(job_factory):
    job = job_factory(rounds=2)
    json.loads(job.driver_line())
    job.procs[0].kill()
    job.procs[0].wait()
    code1, _, err1 = job.wait(1)
    assert code1 == 1
    assert "parallm: tensor-parallel rank 1 failed; exiting" in err1
