"""The benchmark's smoke mode, so that it cannot rot: a tiny model, one run, every CPU runtime. No timing is
asserted."""

import json
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


def test_smoke_writes_table_json_and_plot(smoke):
    out, stdout = smoke
    assert (out / "cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
