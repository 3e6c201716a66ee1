"""Kernels per decoded token (and in prefill), counted with ONNX Runtime's profiler: the graphs as exported beside
the fused ones (export/runtime/fused.py), on one request, with the decode kernels by operator type.

    python -m bench.kernels                                # the embedded model, a detection answer
    python -m bench.kernels --model CHECKPOINT --onnx-dir EXPORT --new-tokens 16

A kernel is one node's run as the profiler records it (an event of category "Node" ending in "_kernel_time"),
counted inside each `model_run` of a session: what the CPU provider really runs after ONNX Runtime's own
graph optimizations, not the node count of the file.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import onnxruntime as ort

import paligemma
from export.runtime.fused import fused_session
from export.runtime.pipeline import load_onnx_pipeline, session_options
from paligemma.cli import ArgumentParser

from .timing import Spread
from .workloads import request_image


def kernels_per_run(profile: Path) -> list[Counter]:
    """For each run recorded in an ONNX Runtime profile file, the kernels it ran, counted by operator type."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    counts = [Counter() for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(runs):
            if start <= event["ts"] <= end:
                counts[index][event.get("args", {}).get("op_name", "?")] += 1
                break
    return counts


def profiled(options: ort.SessionOptions, folder: Path, name: str) -> ort.SessionOptions:
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / name)
    return options


def request_kernels(pipe, fused: bool, image, prompt: str, new_tokens: int, folder: Path) -> dict[str, list[Counter]]:
    """Kernels of each prefill and decode run of one request, with the graphs as exported or fused. The pipeline's
    model gets profiled sessions for the request, and its own back after."""
    model = pipe.engine_factory
    saved = dict(model.sessions), model.fused
    if fused:
        options = profiled(session_options(model.thread_plan, None, spinning=model.spinning), folder, "fused")
        model.fused = fused_session(model.onnx_dir, model.config, options, ["CPUExecutionProvider"],
                                    model.fused_prepack)
        sessions = {"fused": model.fused}
    else:
        model.fused, sessions = None, {}
        for graph in ("prefill", "decode"):
            options = profiled(model._exported_options(graph), folder, f"{graph}-exported")
            sessions[graph] = model.sessions[graph] = ort.InferenceSession(
                str(model.onnx_dir / f"{graph}.onnx"), options, providers=["CPUExecutionProvider"])
    try:
        pipe.generate(image, prompt, max_new_tokens=new_tokens, stop_ids=())
    finally:
        model.sessions, model.fused = saved
    runs = {graph: kernels_per_run(Path(session.end_profiling())) for graph, session in sessions.items()}
    if fused:  # one session: its first run is the prefill, the others are decode steps
        runs = {"prefill": runs["fused"][:1], "decode": runs["fused"][1:]}
    return runs


def kernel_summary(runs: dict[str, list[Counter]]) -> dict:
    """request_kernels' counts as figures: kernels per decoded token (the median over the steps, and their range),
    in the last prefill, and the last step's by operator type."""
    per_token = Spread.of(sum(c.values()) for c in runs["decode"])
    return dict(decode_per_token=per_token.median, decode_range=[per_token.low, per_token.high],
                decode_steps=per_token.count, prefill=sum(runs["prefill"][-1].values()),
                decode_ops=dict(runs["decode"][-1].most_common()))


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--onnx-dir", default=None, help="its export (default: the export cache)")
    parser.add_argument("--prompt", default="detect circle ; triangle")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    pipe = load_onnx_pipeline(args.model or paligemma.DEMO_CHECKPOINT, onnx_dir=args.onnx_dir, threads=1)
    image = request_image(pipe.config.image_size)
    with tempfile.TemporaryDirectory() as folder:
        for fused in (False, True):
            counts = kernel_summary(request_kernels(pipe, fused, image, args.prompt, args.new_tokens, Path(folder)))
            low, high = counts["decode_range"]
            ops = ", ".join(f"{op} {n}" for op, n in counts["decode_ops"].items())
            print(f"graphs {'fused' if fused else 'as exported'}: {counts['decode_per_token']:.0f} kernels per decoded "
                  f"token (min {low}, max {high} over {counts['decode_steps']} steps), {counts['prefill']} in prefill; "
                  f"decode by op: {ops}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
