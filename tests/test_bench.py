"""The benchmark's smoke mode, so that it cannot rot: a tiny model, one run, every CPU runtime. No timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXACT_RUNTIMES = ("transformers", "torch", "onnx")  # float32: the greedy tokens must be transformers' own


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
    for runtime in ("transformers", "torch", "onnx", "onnx-int8"):
        assert f"| {runtime}: " in table


def test_smoke_tokens_agree_with_transformers(smoke):
    out, _ = smoke
    report = json.loads((out / "cpu.json").read_text())
    (workload,) = report["workloads"]
    rows = {row["runtime"]: row for row in workload["rows"]}
    assert set(rows) == {"transformers", "torch", "onnx", "onnx-int8"}
    assert not [row["error"] for row in rows.values() if "error" in row]
    reference = rows["transformers"]["tokens"]
    assert len(reference) == workload["new_tokens"]
    for runtime in EXACT_RUNTIMES:
        row = rows[runtime]
        assert row["tokens"] == reference, runtime
        assert row["same_prompt"] and row["tokens_agree"] and row["repeatable"]
        assert row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["peak_rss_mb"] is None  # smoke mode runs everything in one process: no per-runtime memory
    # int8 may pick other tokens; it must still produce them all, and the table must say whether they agree.
    assert len(rows["onnx-int8"]["tokens"]) == workload["new_tokens"]
    assert isinstance(rows["onnx-int8"]["tokens_agree"], bool) and isinstance(rows["onnx-int8"]["answer_agrees"], bool)


def test_runtime_in_its_own_process_reports_peak_memory(tmp_path):
    """The default mode: each runtime in a worker process of its own, which reports that process's peak memory."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "bench", "--workloads", "tiny", "--runtimes", "torch", "--runs", "1",
                           "--warmup", "0", "--new-tokens", "4", "--out", str(out), "--cache-dir", str(tmp_path / "cache")],
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
