"""The benchmark's smoke mode, so that it cannot rot: a tiny model, one run, every CPU runtime. No timing is
asserted."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXACT_RUNTIMES = ("transformers", "torch", "onnx")  # float32: the greedy tokens must be transformers' own


def quantized_runtimes() -> tuple[str, ...]:
    """The quantized ONNX runtimes the smoke mode runs: those whose export the exporter makes (int4 comes with the
    tensor-by-tensor quantizer)."""
    from export.writer.onnx_export import QUANTIZATIONS

    return ("onnx-int8",) + (("onnx-int4",) if "int4" in QUANTIZATIONS else ())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, cache = tmp_path_factory.mktemp("bench"), tmp_path_factory.mktemp("bench_cache")
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--cache-dir", str(cache)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stdout


def test_smoke_writes_table_json_and_plot(smoke, tmp_path):
    out, stdout = smoke
    chart = (out / "cpu.png").read_bytes()
    assert chart[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "cpu.png") as image:
        assert image.width <= 800 and image.mode == "P"  # small: 100 dpi, a palette
    assert len(chart) < 40_000
    # The chart is drawn from the stored result alone: redrawn from a copy of cpu.json, it is the same file.
    (tmp_path / "cpu.json").write_text((out / "cpu.json").read_text())
    redraw = subprocess.run([sys.executable, "-m", "bench.report", str(tmp_path / "cpu.json")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (tmp_path / "cpu.png").read_bytes() == chart
    table = (out / "cpu.md").read_text()
    assert stdout.strip().endswith(table.strip().splitlines()[-1])  # the table is printed last
    for runtime in EXACT_RUNTIMES + quantized_runtimes():
        assert f"| {runtime}: " in table


def test_smoke_tokens_agree_with_transformers(smoke):
    out, _ = smoke
    report = json.loads((out / "cpu.json").read_text())
    (workload,) = report["workloads"]
    rows = {row["runtime"]: row for row in workload["rows"]}
    assert set(rows) == {*EXACT_RUNTIMES, *quantized_runtimes()}
    assert not [row["error"] for row in rows.values() if "error" in row]
    reference = rows["transformers"]["tokens"]
    assert len(reference) == workload["new_tokens"]
    for runtime in EXACT_RUNTIMES:
        row = rows[runtime]
        assert row["tokens"] == reference, runtime
        assert row["same_prompt"] and row["tokens_agree"] and row["repeatable"]
        assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_rss_mb"] is None  # smoke mode runs everything in one process: no per-runtime memory
    # ONNX Runtime's kernels per decoded token, from its profiler: the fused graphs (float32) run fewer than the
    # graphs as exported (int8 decodes with those); torch runtimes have none to count.
    fused, exported = rows["onnx"]["kernels"], rows["onnx-int8"]["kernels"]
    assert 0 < fused["decode_per_token"] < exported["decode_per_token"] and fused["prefill"] > 0
    assert (sum(fused["decode_ops"].values()) == fused["decode_per_token"]
            and "GroupQueryAttention" in fused["decode_ops"])
    assert rows["transformers"]["kernels"] is None and rows["torch"]["kernels"] is None
    # Quantized runtimes may pick other tokens; they must still produce them all, and the table must say whether
    # they agree.
    for runtime in quantized_runtimes():
        assert len(rows[runtime]["tokens"]) == workload["new_tokens"]
        assert isinstance(rows[runtime]["tokens_agree"], bool) and isinstance(rows[runtime]["answer_agrees"], bool)


def test_smoke_sets_every_runtime_against_the_machines_limits(smoke):
    """The machine's memory bandwidth and matrix-multiply rates, measured in the same run, and each runtime's decode
    and first token as fractions of the bounds they give; the machine line names the CPU's ISA extensions."""
    out, _ = smoke
    report = json.loads((out / "cpu.json").read_text())
    machine = report["machine"]
    assert all(name in machine["summary"] for name in machine["isa_extensions"])
    (workload,) = report["workloads"]
    limits = workload["limits"]
    assert limits["bandwidth_bytes_per_s"] > 1e8 and limits["load_average"]
    assert {"float32", "int8", "int4"} <= set(limits["rates"]) and min(limits["rates"].values()) > 0
    rows = {row["runtime"]: row for row in workload["rows"]}
    for row in rows.values():
        assert 0 < row["decode_of_bound"] and 0 < row["ttft_of_bound"], row["runtime"]
        assert row["decode_bound_tokens_per_s"] * row["decode_step_bytes"] == pytest.approx(
            limits["bandwidth_bytes_per_s"])
        assert row["ttft_bound_s"] == pytest.approx(row["prefill_operations"] / max(limits["rates"].values()))
        assert row["load_average"]
    # A decode step reads the weights as each runtime stores them: the float32 parameters, or the export's data.
    steps = {name: rows[name]["decode_step_bytes"] for name in ("transformers", "onnx", "onnx-int8")}
    assert steps["onnx-int8"] < steps["onnx"] and steps["onnx"] == pytest.approx(steps["transformers"], rel=0.05)
    table = (out / "cpu.md").read_text()
    assert "Limits measured in this run" in table
    assert "| first token / compute bound | decode / bandwidth bound |" in table


def test_isa_extensions_are_read_from_cpuinfo(tmp_path):
    from bench.limits import isa_extensions

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n"
                       "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
    assert isa_extensions(cpuinfo) == ["avx2", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert isa_extensions(tmp_path / "missing") == []


def test_the_limits_command_prints_every_path_at_every_block(capsys):
    from bench.limits import main

    assert main(["--shapes", "8x64x128", "--blocks", "32,64", "--bandwidth-mib", "16", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory read" in out and "| int8, block 32 | int8, block 64 | int4, block 32 | int4, block 64 |" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| 8 x 64 x 128 |")]
    assert len(row.split("|")) == 2 + 2 + 4 + 1


def test_request_mode_times_whole_requests_and_compares_answers(tmp_path):
    """--mode requests: whole generate calls on drawn scenes, stopping at end-of-sequence, each runtime's answers
    held to transformers' scene by scene."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--mode", "requests", "--scenes", "2",
                           "--runtimes", ",".join(EXACT_RUNTIMES), "--out", str(out), "--cache-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (workload,) = json.loads((out / "cpu-requests.json").read_text())["workloads"]
    rows = {row["runtime"]: row for row in workload["rows"]}
    assert set(rows) == set(EXACT_RUNTIMES) and workload["scenes"] == 2
    for runtime in EXACT_RUNTIMES:
        row = rows[runtime]
        assert row["requests"] == 2 and row["request_s"] > 0 and row["same_answers"] == 2, runtime
        assert all(len(answer) <= workload["new_tokens"] for answer in row["answers"])
    assert rows["transformers"]["speedup"] == 1.0 and rows["torch"]["speedup_over_torch"] == 1.0
    table = (out / "cpu-requests.md").read_text()
    assert "| onnx: " in table and "2/2 scenes" in table and not (out / "cpu-requests.png").exists()


def test_runtime_in_its_own_process_reports_peak_memory(tmp_path):
    """The default mode: each runtime in a worker process of its own, which reports that process's peak memory."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "--workloads", "tiny", "--runtimes", "torch", "--runs", "1",
                           "--warmup", "0", "--new-tokens", "4", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((out / "cpu.json").read_text())["workloads"][0]["rows"]
    assert row["runtime"] == "torch" and len(row["tokens"]) == 4 and row["peak_rss_mb"] > 0
    assert "no reference" in (out / "cpu.md").read_text()


def ratio_report(rows: list[dict]) -> dict:
    """A stored result's shape (what `python -m bench` writes to cpu.json), with the given rows' ratios."""
    def row(runtime, ttft, decode, **extra):
        return dict(dict(runtime=runtime, ttft_s=0.1 / ttft, decode_tokens_per_s=10.0 * decode, ttft_speedup=ttft,
                         decode_speedup=decode, answer_agrees=True), **extra)

    workload = dict(description="a workload", threads=1, new_tokens=8,
                    rows=[row("transformers", 1.0, 1.0)] + [row(**r) for r in rows])
    return dict(machine=dict(summary="a CPU, 2 cores"), date="2026-12-01 00:00 UTC", workloads=[workload])


def test_the_chart_labels_its_axis_and_legend_and_goes_logarithmic_over_a_decade():
    from bench.report import ratio_figure

    linear = ratio_figure(ratio_report([dict(runtime="onnx", ttft=2.3, decode=8.5, target=dict(ttft=2.0))]))
    (ax,) = linear.axes
    assert ax.get_xscale() == "linear" and ax.get_xlabel().startswith("ratio to transformers (higher is better)")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["transformers", "onnx"]
    (legend,) = linear.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        "time to first token (x faster)", "decode tokens/s (x)", "transformers (1x)", "target"]
    # 0.5x to 20x spans more than a decade: a log axis, said in its label.
    wide = ratio_figure(ratio_report([dict(runtime="onnx", ttft=0.5, decode=20.0)]))
    assert wide.axes[0].get_xscale() == "log" and wide.axes[0].get_xlabel().endswith("log scale")


def test_the_chart_marks_runtimes_whose_tokens_differ_and_absolute_targets_as_ratios():
    from bench.report import ratio_figure, ratio_target

    report = ratio_report([dict(runtime="onnx-int4", ttft=1.4, decode=6.8, answer_agrees=False),
                           dict(runtime="compiled", ttft=1.7, decode=7.8,
                                target=dict(decode_tokens_per_s=400, ttft_ms=20))])
    (ax,) = ratio_figure(report).axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["transformers", "onnx-int4\n(tokens differ)", "compiled"]
    hatched = [bar.get_hatch() for bar in ax.patches]
    assert hatched.count("///") == 2  # both of onnx-int4's bars, no other
    reference, compiled = report["workloads"][0]["rows"][0], report["workloads"][0]["rows"][2]
    assert ratio_target(compiled, reference, "decode") == pytest.approx(400 / 10.0)  # reference decodes 10 tok/s
    assert ratio_target(compiled, reference, "ttft") == pytest.approx(100 / 20)  # reference's first token: 100 ms


def test_the_chart_command_refuses_a_result_without_ratios(tmp_path):
    result = tmp_path / "cpu-requests.json"
    result.write_text(json.dumps(dict(ratio_report([]), workloads=[dict(description="d", rows=[dict(runtime="x")])])))
    done = subprocess.run([sys.executable, "-m", "bench.report", str(result)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and not (tmp_path / "cpu-requests.png").exists()
    assert done.stderr.count("\n") == 1 and "no runtime in this report has ratios to transformers" in done.stderr


def test_cuda_breakdown_says_what_it_needs():
    """The GPU breakdown cannot run here; without a GPU (or a checkpoint) it says so instead of failing in torch."""
    done = subprocess.run([sys.executable, "-m", "bench.cuda_breakdown"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "usage: python -m bench.cuda_breakdown CHECKPOINT" in done.stderr


def test_thread_settings_are_measured_side_by_side(capsys):
    from bench.threads import SETTINGS, main

    assert main(["--new-tokens", "2", "--runs", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(SETTINGS) and all("tok/s" in line and "requests/s" in line for line in lines)


def test_a_checkpoint_in_hub_style_shards_runs_every_runtime(tmp_path, monkeypatch):
    """What `--workloads full3b` does on a CPU (a float32 checkpoint in Hub-style shards and their index, exported
    and run by every runtime), on the tiny shape with 1 + 1 layers cut into several shards."""
    import bench.__main__ as bench_main
    from bench.workloads import TINY, WORKLOADS, Workload

    sharded = Workload("sharded", "tiny, Hub-style shards", TINY, vision_layers=1, text_layers=1, std=0.2,
                       embed_std=0.05, attn_out_std=0.2, shard_bytes=100_000)
    monkeypatch.setitem(WORKLOADS, "sharded", sharded)
    out = tmp_path / "out"
    assert bench_main.main(["--workloads", "sharded", "--smoke", "--out", str(out), "--cache-dir", str(tmp_path)]) == 0
    folder = sharded.folder(tmp_path)
    assert (len(list(folder.glob("model-*-of-*.safetensors"))) >= 3
            and (folder / "model.safetensors.index.json").exists())
    rows = {row["runtime"]: row for row in json.loads((out / "cpu.json").read_text())["workloads"][0]["rows"]}
    assert set(rows) == {*EXACT_RUNTIMES, *quantized_runtimes()}
    for runtime in EXACT_RUNTIMES:
        assert rows[runtime]["tokens"] == rows["transformers"]["tokens"], runtime
    exports = sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "onnx").iterdir() if p.is_dir())
    assert exports == sorted(["float32", *(name.removeprefix("onnx-") for name in quantized_runtimes())])


def test_a_spread_is_the_median_range_and_count_of_its_figures():
    from bench.timing import Spread

    assert Spread.of([0.030, 0.010, 0.020, 0.500]) == Spread(0.025, 0.010, 0.500, 4)
    assert Spread.of([0.0123, 0.0119, 0.0140]).text("ms", 1000) == "12.3 ms (median of 3; 11.9-14.0)"
    with pytest.raises(ValueError, match="at least one run"):
        Spread.of([])



def test_the_limits_command_gives_the_decode_kernels_rate_against_the_bandwidth(capsys):
    from bench.limits import main

    args = ["--gemv", "64x128,128x64", "--gemv-mib", "1", "--blocks", "32", "--bandwidth-mib", "16", "--runs", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| K x N | int8, block 32 | int4, block 32 |" in out
    for shape in ("64 x 128", "128 x 64"):
        (row,) = [line for line in out.splitlines() if line.startswith(f"| {shape} |")]
        cells = row.strip("| ").split(" | ")[1:]
        assert len(cells) == 2 and all(re.fullmatch(r"[\d.]+ \(\d+%\)", cell) for cell in cells), row
