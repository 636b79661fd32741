"""``make bench``'s closing table of ratios reads each benchmark's saved results."""

from __future__ import annotations

import json

from benchmarks import summary


def test_ratio_table_reads_saved_results_and_marks_old_and_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(summary, "RESULTS", tmp_path)
    (tmp_path / "evaluate.json").write_text(
        json.dumps({"created": "2026-11-30T01:00:00", "results": {"model_over_lk": 0.712}})
    )
    (tmp_path / "scale.json").write_text(
        json.dumps(
            {
                "created": "2026-11-01T01:00:00",
                "results": {"growth": {"ingest": {"peak_rss_ratio": {"x16": 1.04}}}},
            }
        )
    )
    (tmp_path / "predict.json").write_text(json.dumps({"created": "x", "results": {}}))
    lines = {
        line.split("  ")[1].strip(): line for line in summary.ratio_table({"evaluate"}).splitlines()
    }
    evaluate = lines["model nowcast / pysteps LK, BoM 512², CPU"]
    assert "0.71x" in evaluate and "target <= 0.8x" in evaluate and "[from" not in evaluate
    ingest = lines["ingest peak RSS, 16x / 1x archive"]
    assert "1.04" in ingest and "[from 2026-11-01]" in ingest  # not run now: dated
    assert "not in predict.json" in lines["`nowcast predict` wall / its own work"]
    assert (
        "not measured (make bench ARGS=ingest)"
        in lines["ingest speed-up over pysteps, fresh process"]
    )
