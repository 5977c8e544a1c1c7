"""The benchmark harness: report formatting on CPU; one tiny timed point on a GPU."""

import csv

import pytest
import torch

from benchmarks import report


def _meta():
    return {"gpu": "test", "date": "2026-11-24", "torch": torch.__version__, "copy_bw_TBps": 3.0, "dense_TFLOPs": 600.0}


def test_rows_markdown_and_ratios(tmp_path):
    meta = _meta()
    rows = [
        report.row(meta, "o", 4096, 4096, 128, 1, torch.float16, "dense", 14.0, 14.0, 3.0, ""),
        report.row(meta, "o", 4096, 4096, 128, 1, torch.float16, "w4a16_auto", 5.0, 14.0, 3.0, "", 2 * 4096**2, 9e6),
        report.row(meta, "o", 4096, 4096, 128, 1, torch.float16, "w4a16_cuda", None, None, 3.0, "not built"),
    ]
    assert rows[1]["speedup_vs_dense"] == 2.8
    assert rows[1]["GBps"] == 1800 and rows[1]["frac_copy_bw"] == 0.6
    md = tmp_path / "b.md"
    report.write_markdown(rows, meta, md)
    text = md.read_text()
    assert "| float16 | o | 4096 x 4096 | 128 | 1 | 3.0 | 14.0 (1.00x) | 5.0 (2.80x) | n/a |" in text
    assert "- w4a16_cuda: not built" in text


@pytest.mark.gpu
def test_bench_op_runs_one_point(tmp_path):
    from benchmarks import bench_op

    bench_op.main(["--out", str(tmp_path), "--shapes", "llama3-8b.o", "--ms", "1", "--reps", "3"])
    rows = list(csv.DictReader(open(tmp_path / "bench_op.csv")))
    dense = [r for r in rows if r["kernel"] == "dense"][0]
    auto = [r for r in rows if r["kernel"] == "w4a16_auto"][0]
    assert float(dense["time_us"]) > 0 and float(auto["time_us"]) > 0
