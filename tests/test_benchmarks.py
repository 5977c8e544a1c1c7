"""The benchmark harness: presets, report and dispatch derivation on CPU; one tiny timed point on a GPU."""

import csv

import numpy
import pytest
import torch

from benchmarks import bench_op, contenders, derive_dispatch, report


def _meta(**kw):
    return {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-24", "torch": torch.__version__, "copy_bw_TBps": 3.0,
            "dense_TFLOPs": 600.0, **kw}


def _rows(times, shape="o", K=4096, N=4096, G=128, meta=None):
    """times: {M: {kernel: us or None}} -> rows as bench_op writes them (dense first: the speedup base)."""
    meta = meta or _meta()
    rows = []
    for M, ts in times.items():
        base = ts.get("dense")
        for k, t in ts.items():
            rows.append(report.row(meta, shape, K, N, G, M, torch.float16, k, t, base, 1.0, "" if t else "n/a",
                                   flops=2 * M * K * N, nbytes=K * N // 2))
    return rows


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
    assert "| float16 | o | 128 | 1 | w4a16_auto | 5.0 | 6.7 | 1800 | 60 | 1 |" in text  # rates table


def test_presets_expand_to_the_issue_sweeps():
    quick = bench_op.points(bench_op.expand("quick"))
    assert len(quick) == 16 and {p.dtype for p in quick} == {"float16"} and {p.M for p in quick} == {1, 16, 256, 4096}
    full = bench_op.points(bench_op.expand("full"))
    assert {p.shape for p in full} == set(bench_op.SHAPES) and len(full) == 14 * 14
    assert sorted({p.M for p in full}) == [2**i for i in range(14)]
    sub = bench_op.expand("subsets")
    assert {d for s in sub for d in s.dtypes} == {"float16", "bfloat16"}
    sub_pts = bench_op.points(sub)
    assert any(p.G == 32 for p in sub_pts) and any(p.G == p.K for p in sub_pts)
    over = bench_op.expand("subsets", shapes=["K704.moe_down"], ms=[8], dtypes=["bfloat16"], group=64)
    assert all(s.shapes == ["K704.moe_down"] and s.ms == [8] and s.dtypes == ["bfloat16"] and s.group == 64
               for s in over)
    with pytest.raises(SystemExit):
        bench_op.expand("full", shapes=["nope"])
    with pytest.raises(SystemExit):
        bench_op.expand("nope")


def test_shape_table_and_groups():
    assert bench_op.SHAPES["llama3-70b.gate_up"] == (8192, 57344) and bench_op.SHAPES["llama3-70b.down"] == (28672, 8192)
    assert bench_op.group_for(4096, 128) == 128
    assert bench_op.group_for(2112, 128) == 64 and bench_op.group_for(704, 128) == 64
    assert bench_op.group_for(7392, 128) == 32
    assert bench_op.group_for(4096, bench_op.CHANNELWISE) == 4096 and bench_op.group_for(704, 704) == 704


def test_int4_skip_and_cost_model():
    assert bench_op.skip_reason("torch_int4", 512, 1024) is None
    assert "M >= 1024" in bench_op.skip_reason("torch_int4", 1024, 1024)
    assert bench_op.skip_reason("w4a16_auto", 8192, 1024) is None
    kernels = list(contenders.contenders())
    est = {p: bench_op.estimate_seconds(bench_op.points(bench_op.expand(p)), kernels, 20, 0.05, 1024)
           for p in ("quick", "full", "subsets")}
    assert est["quick"] < 60 and est["full"] < 300 and est["subsets"] < 150, est


def test_budget_stops_cleanly_and_writes_outputs(tmp_path, monkeypatch):
    """The run loop without a GPU: a fake measurement per point and a clock that passes the budget."""
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(bench_op.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(bench_op.torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench_op.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench_op, "measure_copy_bandwidth", lambda: 3e12)
    monkeypatch.setattr(bench_op, "measure_matmul_rate", lambda: 6e14)
    monkeypatch.setattr(bench_op.report, "plot", lambda rows, path: None)

    def fake_point(rows, meta, p, names, all_kernels, args):
        for k, t in (("dense", 10.0), ("w4a16_auto", 5.0), ("w4a16_cuda", 5.0), ("w4a16_triton", 6.0)):
            rows.append(report.row(meta, p.shape, p.K, p.N, p.G, p.M, p.dtype, k, t, 10.0, 1.0, ""))

    monkeypatch.setattr(bench_op, "measure_point", fake_point)
    bench_op.main(["--out", str(tmp_path), "--preset", "quick", "--budget-s", "35"])
    rows = list(csv.DictReader(open(tmp_path / "bench_op.csv")))
    assert 0 < len({(r["shape"], r["M"]) for r in rows}) < 16
    text = (tmp_path / "bench_op.md").read_text()
    assert "Stopped at the time budget (35 s)" in text and "torch_int4 is not run at M >= 1024" in text


def test_auto_vs_best_section(tmp_path):
    rows = _rows({
        1: {"dense": 14.0, "w4a16_auto": 10.0, "w4a16_cuda": 10.0, "w4a16_triton": 15.0},
        16: {"dense": 17.0, "w4a16_auto": 17.5, "w4a16_cuda": 17.5, "w4a16_triton": 14.0},  # 1.25x: listed
        64: {"dense": 15.0, "w4a16_auto": 24.9, "w4a16_cuda": 28.0, "w4a16_triton": 24.0},  # 1.04x: within 5%
    })
    checked, slow = report.auto_vs_best(rows)
    assert checked == 3 and [(s[0][-1], s[2]) for s in slow] == [(16, "w4a16_triton")]
    path = tmp_path / "b.md"
    report.write_markdown(rows, _meta(), path)
    text = path.read_text()
    assert "## Automatic choice vs best forced backend" in text
    assert "| float16 | o | 128 | 16 | 17.5 | w4a16_triton | 14.0 | 1.250 |" in text
    report.write_markdown([r for r in rows if r["M"] != 16], _meta(), path)
    assert "forced w4a16 backend (2 points with both measured):\n\nnone" in path.read_text()


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_derive_dispatch_from_a_csv(tmp_path, capsys):
    ms = {1: (10.0, 15.0), 16: (18.0, 14.0), 64: (28.0, 24.0), 256: (30.0, 33.2), 4096: (195.0, 210.0)}
    rows = []
    for shape, K, N in (("o", 4096, 4096), ("down", 14336, 4096), ("K2112", 2112, 4096)):
        rows += _rows({M: {"dense": 20.0, "w4a16_auto": c, "w4a16_cuda": c, "w4a16_triton": t}
                       for M, (c, t) in ms.items()}, shape=shape, K=K, N=N)
    rows += _rows({8: {"dense": 9.0, "w4a16_cuda": None, "w4a16_triton": 9.5}}, shape="odd", K=2112, N=4096)
    path = tmp_path / "bench_op.csv"
    _write_csv(path, rows)
    derive_dispatch.main([str(path), "--md", str(tmp_path / "t.md")])
    out = capsys.readouterr().out
    expected = ("_MEASURED_ORDER = {\n    9: (\n        (16, ('cuda', 'triton', 'reference')),\n"
                "        (256, ('triton', 'cuda', 'reference')),\n        (None, ('cuda', 'triton', 'reference')),\n"
                "    ),\n}")
    assert "# symmetric, float16, aligned: 10 points; 0 over" in out
    assert out.count(expected) == 3, out  # each class and all shapes merged
    table = (tmp_path / "t.md").read_text()
    assert "| symmetric | float16 | unaligned | 16 <= M < 256 | triton, cuda, reference | 1.000 | 2 |" in table
    # M = 8 measured only where CUDA could not run: the order that skips to Triton there is not penalised
    assert "| symmetric | float16 | unaligned | 1 <= M < 16 | cuda, triton, reference | 1.000 | 2 |" in table


def test_derive_reports_points_no_order_serves():
    by_m = {1: {("a",): {"cuda": 10.0, "triton": 12.0}, ("b",): {"cuda": 12.0, "triton": 10.0}}}
    buckets = derive_dispatch.derive(by_m)
    assert len(buckets) == 1 and buckets[0][0] is None and buckets[0][2] == pytest.approx(1.2)
    assert len(derive_dispatch.violations(by_m, buckets)) == 1
    assert derive_dispatch.shape_class(2112, 4096) == "unaligned" and derive_dispatch.shape_class(4096, 2120) == "unaligned"
    assert derive_dispatch.shape_class(8192, 57344) == "aligned"
    assert derive_dispatch.major_for("NVIDIA H100 80GB HBM3") == 9 and derive_dispatch.major_for("NVIDIA A100-SXM4-80GB") == 8


def test_conch_layout_matches_pack_rows():
    """contenders packs conch's weights on the GPU; the layout is that of conch's pack_rows (numpy)."""
    q = torch.randint(0, 16, (64, 24), dtype=torch.int32)
    ref = numpy.zeros((8, 24), dtype=numpy.uint32)
    for i in range(8):
        ref |= q.numpy().astype(numpy.uint32)[i::8, :] << (4 * i)
    assert torch.equal(contenders._pack_rows_k(q), torch.from_numpy(ref.astype(numpy.int32)))


def test_plot_one_panel_per_shape(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _rows({1: {"dense": 14.0, "w4a16_auto": 7.0}, 16: {"dense": 17.0, "w4a16_auto": 17.0}})
    rows += _rows({1: {"dense": 10.0, "w4a16_auto": 8.0}}, shape="down", K=14336)
    report.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


@pytest.mark.gpu
def test_bench_op_runs_one_point(tmp_path):
    bench_op.main(["--out", str(tmp_path), "--shapes", "llama3-8b.o", "--ms", "1", "--reps", "3"])
    rows = list(csv.DictReader(open(tmp_path / "bench_op.csv")))
    dense = [r for r in rows if r["kernel"] == "dense"][0]
    auto = [r for r in rows if r["kernel"] == "w4a16_auto"][0]
    assert float(dense["time_us"]) > 0 and float(auto["time_us"]) > 0


def test_noise_line_states_median_and_worst_difference():
    from benchmarks.report import noise_line

    line = noise_line([("float16", "a", 1, 10.0, 10.5), ("float16", "b", 16, 20.0, 20.0), ("float16", "c", 1, 8.0, 9.0)])
    assert "5.0% (median over 3 points)" in line and "12.5% (float16 c M=1)" in line, line
    assert noise_line([]) == ""
