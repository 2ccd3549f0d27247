"""benchmarks/serve_gaps.py: long inter-token gaps grouped into stall events, from bench serve's
detailed per-request records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from trace_files import write_serve_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve_gaps as sg  # noqa: E402


def _record(send: float, ttft: float, itl: list[float], status: str = "ok") -> dict:
    e2e = ttft + sum(itl)
    return {"send_s": send, "ttft_s": ttft, "e2e_s": e2e, "status": status, "itl_s": itl}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    # Requests 0 and 1 decode side by side at 10 ms a token until one 60 ms step holds both
    # up (their gaps end at 0.18 s and 0.1805 s: one event); request 2 stalls 30 ms alone much
    # later (a second event). A failed request's gaps must not count.
    return write_serve_json(tmp_path, "run", [
        _record(0.0, 0.1, [0.01, 0.01, 0.06, 0.01]),
        _record(0.0005, 0.1, [0.01, 0.01, 0.06]),
        _record(2.0, 0.05, [0.01, 0.03, 0.01]),
        _record(0.0, 0.1, [0.5, 0.5], status="failed"),
    ])  # fmt: skip


def test_gaps_are_placed_on_the_runs_clock(run: Path):
    rows = sg.gaps(run)
    assert len(rows) == 10
    assert rows[2] == pytest.approx([0.18, 0.06])  # 0 + 0.1 + 0.01 + 0.01 + 0.06
    assert rows[6] == pytest.approx([0.1805, 0.06])


def test_stalls_of_one_step_are_one_event(run: Path):
    events = sg.stall_events(sg.gaps(run), long_s=0.025, join_s=0.002)
    assert [len(e) for e in events] == [2, 1]
    # A tighter join splits the first step's two stalls (0.5 ms apart) into two events.
    assert len(sg.stall_events(sg.gaps(run), long_s=0.025, join_s=0.0001)) == 3
    assert sg.stall_events(sg.gaps(run), long_s=0.1, join_s=0.002) == []


def test_summary_bands_and_events(run: Path):
    s = sg.summarize(run, [15, 50], long_ms=25, join_ms=2)
    assert [b["gaps"] for b in s["bands"]] == [7, 1, 2]
    assert s["bands"][2]["time_share"] == pytest.approx(0.12 / 0.22)
    assert s["bands"][2]["band_ms"] == [50, None]
    assert (s["events"], s["requests_per_event"]) == (2, 1.5)
    assert (s["event_ms_p50"], s["itl_ms_p50"]) == (pytest.approx(45.0), pytest.approx(10.0))
    text = sg.table([s, s], 25)
    assert "| stall events (gaps >= 25 ms) | 2 | 2 |" in text
    assert "| gaps >= 50 ms (share of ITL time) | 2 (55%) | 2 (55%) |" in text


def test_a_file_without_gaps_is_refused_with_the_flag_to_use(tmp_path: Path, capsys):
    plain = write_serve_json(tmp_path, "plain", [{"send_s": 0.0, "ttft_s": 0.1, "e2e_s": 0.5,
                                        "status": "ok"}])  # fmt: skip
    assert sg.main([str(plain)]) == 2
    assert "--save-detailed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags", [["--bands-ms", "50,15"], ["--long-ms", "0"], ["--bands-ms", "x"]]
)
def test_bad_flags_name_the_flag(flags, run: Path, capsys):
    with pytest.raises(SystemExit):
        sg.main([str(run), *flags])
    assert flags[0] in capsys.readouterr().err


def test_main_prints_the_table_and_writes_json(run: Path, tmp_path: Path, capsys):
    out = tmp_path / "gaps.json"
    assert sg.main([str(run), "--out", str(out)]) == 0
    assert "| requests held up an event | 1.5 |" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["events"] == 2
