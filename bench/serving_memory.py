"""Serving memory: an export loaded by this project's ONNX Runtime loop and one request answered, in a process of
its own, its peak resident memory above its baseline once the libraries are imported, against the export's file bytes.

    python -m bench.serving_memory EXPORT [EXPORT ...] [--model CHECKPOINT] [--new-tokens 16] [--max-batch N]

EXPORT is a three-graph export folder (`python -m export`), or `FOLDER:VARIANT` for one variant of a transformers.js
folder (`python -m export --format transformers.js`; VARIANT float32, int8 or int4). The checkpoint is the export's
own (its config.json and tokenizer) unless --model names one. Each export runs in a fresh process, one after the
other: it imports the libraries (export.runtime, onnxruntime, torch), notes its resident memory (the baseline), loads
the export (`export.runtime.load_onnx_pipeline`; --max-batch rows of continuous batching, the library's default
unless given: more than one pre-packs the fused session), answers one request (an image and "caption en",
--new-tokens greedy tokens) and reports its peak resident memory (VmHWM) above the baseline. The table gives it
beside the files' bytes (the graphs and weight files the loop reads: for transformers.js the variant's own files).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def export_files(folder: Path, variant: str | None) -> list[Path]:
    """The files the loop reads: every graph and data file of a three-graph export, or one transformers.js
    variant's graphs and their data chunks (the mask decoder, float32 in every variant, included)."""
    if variant is None:
        return [p for p in folder.iterdir() if p.is_file() and (p.suffix == ".onnx" or ".onnx." in p.name
                                                                or p.name.endswith(".data"))]
    from export.transformers_js.graphs import GRAPH_ORDER
    from export.transformers_js.writer import find_variant, graph_file

    chosen = find_variant("float32", None if variant == "float32" else variant)
    onnx = folder / "onnx"
    files = [p for name in GRAPH_ORDER for p in onnx.glob(graph_file(name, chosen) + "*")]
    return files + list(onnx.glob("mask_decoder.onnx*"))


def child(target: str, model: str | None, new_tokens: int, max_batch: int | None = None) -> dict:
    """Runs in the measured process: imports, baseline, load, one request, peak."""
    import numpy as np
    import onnxruntime  # noqa: F401 (imported before the baseline, as the libraries are)
    import torch  # noqa: F401
    from PIL import Image

    from export.runtime import load_onnx_pipeline

    folder, _, variant = target.partition(":")
    folder = Path(folder)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8))
    baseline = status_kb("VmRSS")
    quantize = None if variant in ("", "float32") else variant
    pipe = load_onnx_pipeline(model or folder, onnx_dir=folder if model else None, quantize=quantize,
                              max_batch=max_batch)
    loaded, load_peak = status_kb("VmRSS"), status_kb("VmHWM")
    result = pipe.generate(image, "caption en", max_new_tokens=new_tokens, stop_ids=())
    files = export_files(folder, variant or None)
    return dict(export=str(folder), variant=variant or getattr(pipe.engine_factory, "manifest", {}).get("quantize"),
                file_bytes=sum(p.stat().st_size for p in files), baseline_bytes=baseline * 1024,
                loaded_bytes=(loaded - baseline) * 1024, load_peak_bytes=(load_peak - baseline) * 1024,
                peak_bytes=(status_kb("VmHWM") - baseline) * 1024,
                tokens=len(result.token_ids), max_batch=pipe.max_batch,
                prepacked=getattr(pipe.engine_factory, "fused_prepack", None),
                load_average=round(os.getloadavg()[0], 2))


def measure(export: str, model: str | None = None, new_tokens: int = 16, max_batch: int | None = None,
            timeout: float = 3600) -> dict:
    """`child` in a fresh process."""
    command = [sys.executable, "-m", "bench.serving_memory", "--child", export, "--new-tokens", str(new_tokens)]
    command += ["--model", str(model)] if model else []
    command += ["--max-batch", str(max_batch)] if max_batch else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {export} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| export | variant | max_batch, fused session pre-packed | files | loaded: resident, peak (above "
             "baseline) | peak, load + one request (above baseline) | peak / files | load average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['export']} | {r['variant']} | {r['max_batch']}, {r['prepacked']} | "
                     f"{r['file_bytes'] / 1e9:.3f} GB | "
                     f"{r['loaded_bytes'] / 1e9:.3f} GB, {r['load_peak_bytes'] / 1e9:.3f} GB | "
                     f"{r['peak_bytes'] / 1e9:.3f} GB | "
                     f"**{r['peak_bytes'] / r['file_bytes']:.2f}x** | {r['load_average']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("exports", nargs="+", help="export folders, or FOLDER:VARIANT for a transformers.js folder")
    parser.add_argument("--model", help="the checkpoint the exports were made from (default: each export's own)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, help="rows of the continuous batch (default: the library's)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.exports[0], args.model, args.new_tokens, args.max_batch)))
        return 0
    results = []
    for export in args.exports:
        results.append(measure(export, args.model, args.new_tokens, args.max_batch))
        print(table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
