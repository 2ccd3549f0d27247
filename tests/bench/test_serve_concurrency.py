"""benchmarks/serve_concurrency.py: TPOT per load band from bench serve's per-request records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from trace_files import write_serve_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import serve_concurrency as sc  # noqa: E402


def _record(send: float, ttft: float, e2e: float, tpot: float | None, status: str = "ok") -> dict:
    return {"send_s": send, "ttft_s": ttft, "e2e_s": e2e, "tpot_s": tpot, "status": status}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    # Two requests decode together over [0.1, 1.1] s; a third decodes alone over [3.2, 4.2] s.
    # A failed request and a one-token one (no TPOT) must not count.
    return write_serve_json(tmp_path, "run", [
        _record(0.0, 0.1, 1.1, 0.010),
        _record(0.05, 0.05, 1.05, 0.020),
        _record(3.0, 0.2, 1.2, 0.005),
        _record(0.0, 0.1, 1.1, 0.5, status="error"),
        _record(0.0, 0.1, 0.1, None),
    ])  # fmt: skip


def test_mean_concurrency_counts_overlaps(run: Path):
    intervals = sc.decode_intervals(run)
    assert len(intervals) == 3
    load = sc.mean_concurrency(intervals)
    assert load == pytest.approx([2.0, 2.0, 1.0], abs=0.02)


def test_mean_concurrency_of_a_partial_overlap():
    # [0, 1] and [0.5, 1.5]: each is alone half its time and paired the other half.
    load = sc.mean_concurrency(sc.np.array([[0.0, 1.0, 0.01], [0.5, 1.5, 0.01]]))
    assert load == pytest.approx([1.5, 1.5], abs=0.01)


def test_bands_take_the_median_tpot_of_their_requests(run: Path):
    result = sc.tpot_by_band(run, [1, 2, 3, 10])
    bands = result["bands"]
    assert [b["requests"] for b in bands] == [1, 2, 0]
    assert bands[0]["tpot_ms_p50"] == pytest.approx(5.0)
    assert bands[1]["tpot_ms_p50"] == pytest.approx(15.0)
    assert bands[2]["tpot_ms_p50"] is None
    assert "| run | 5.0 (1) | 15.0 (2) | - |" in sc.table([result])


def test_cli_writes_the_table_json_and_plot(run: Path, tmp_path: Path, capsys):
    out, png = tmp_path / "bands.json", tmp_path / "tpot.png"
    assert sc.main([str(run), "--bands", "1,2,3", "--out", str(out), "--plot", str(png)]) == 0
    assert "| run |" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved[0]["bands"][1]["requests"] == 2 and "load" not in saved[0]
    assert png.stat().st_size > 0


def test_a_file_without_records_is_refused(tmp_path: Path, capsys):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"benchmark": "serve", "summary": {}}))
    assert sc.main([str(path)]) == 2
    assert "no per-request records" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["50", "0,50,50", "100,50", "0,a", "-1,5"])
def test_bands_must_increase(text: str):
    with pytest.raises(argparse.ArgumentTypeError, match="--bands"):
        sc._bands(text)
