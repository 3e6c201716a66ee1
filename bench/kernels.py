"""Kernels per decoded token (and in prefill), counted with ONNX Runtime's profiler: the graphs as exported beside
the fused ones (export/runtime/fused.py), on one request, with the decode kernels by operator type.

    python -m bench.kernels                                # the embedded model, a detection answer
    python -m bench.kernels --model CHECKPOINT --onnx-dir EXPORT --new-tokens 16
    python -m bench.kernels --model CHECKPOINT --onnx-dir EXPORT --times --threads 2   # and where a step's time goes

`--times`: the fused graph's decode step, milliseconds per step by operator type and by the module a product
belongs to (q_proj ... down_proj, embed_tokens for the output projection), summed over the layers, with the node
count (the median step of the request; the profiler's own overhead included, so read the shares).

A kernel is one node's run as the profiler records it (an event of category "Node" ending in "_kernel_time"),
counted inside each `model_run` of a session: what the CPU provider really runs after ONNX Runtime's own
graph optimizations, not the node count of the file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
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


def node_events_by_run(profile: Path) -> list[list[dict]]:
    """For each run recorded in an ONNX Runtime profile file, the events of the kernels it ran (category "Node",
    names ending in "_kernel_time")."""
    events = json.loads(Path(profile).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e["name"] == "model_run")
    found: list[list[dict]] = [[] for _ in runs]
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        for index, (start, end) in enumerate(runs):
            if start <= event["ts"] <= end:
                found[index].append(event)
                break
    return found


def op_name(event: dict) -> str:
    return event.get("args", {}).get("op_name", "?")


def kernels_per_run(profile: Path) -> list[Counter]:
    """For each run recorded in an ONNX Runtime profile file, the kernels it ran, counted by operator type."""
    return [Counter(op_name(event) for event in run) for run in node_events_by_run(profile)]


def kernel_times_per_run(profile: Path) -> list[dict[str, float]]:
    """For each run recorded in an ONNX Runtime profile file, microseconds by node name (the profiler's name
    without its "_kernel_time" suffix) and by operator type ("op:NAME")."""
    times = []
    for run in node_events_by_run(profile):
        total: Counter = Counter()
        for event in run:
            total[event["name"].removesuffix("_kernel_time")] += event["dur"]
            total["op:" + op_name(event)] += event["dur"]
        times.append(dict(total))
    return times


def module_of(node: str) -> str:
    """The module a fused graph's node belongs to: its name without the numbering the graph builder appends."""
    return re.sub(r"(_\d+)+$", "", node)


def step_times(runs: list[dict[str, float]]) -> dict:
    """Milliseconds per decode step (the median over `runs`) by operator type and by module, with node counts."""
    ops: dict[str, list[float]] = {}
    modules: dict[str, list[float]] = {}
    counts: Counter = Counter()
    for run in runs:
        by_module: Counter = Counter()
        for name, us in run.items():
            if name.startswith("op:"):
                ops.setdefault(name[3:], []).append(us / 1e3)
            else:
                by_module[module_of(name)] += us / 1e3
        for module, ms in by_module.items():
            modules.setdefault(module, []).append(ms)
    for name in runs[-1]:
        if not name.startswith("op:"):
            counts[module_of(name)] += 1
    return dict(ops={op: statistics.median(v) for op, v in ops.items()},
                modules={m: (statistics.median(v), counts[m]) for m, v in modules.items()})


def profiled(options: ort.SessionOptions, folder: Path, name: str) -> ort.SessionOptions:
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / name)
    return options


def request_kernels(pipe, fused: bool, image, prompt: str, new_tokens: int, folder: Path,
                    read=kernels_per_run) -> dict[str, list]:
    """Kernels of each prefill and decode run of one request, with the graphs as exported or fused (`read`: the
    profile as counts, or kernel_times_per_run). The pipeline's model gets profiled sessions for the request, and
    its own back after."""
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
    runs = {graph: read(Path(session.end_profiling())) for graph, session in sessions.items()}
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
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime's intra-op threads (default 1)")
    parser.add_argument("--times", action="store_true",
                        help="only the fused decode step's time, by operator type and by module")
    args = parser.parse_args(argv)
    pipe = load_onnx_pipeline(args.model or paligemma.DEMO_CHECKPOINT, onnx_dir=args.onnx_dir, threads=args.threads)
    image = request_image(pipe.config.image_size)
    with tempfile.TemporaryDirectory() as folder:
        if args.times:
            pipe.generate(image, args.prompt, max_new_tokens=2, stop_ids=())  # the first run's allocations aside
            runs = request_kernels(pipe, True, image, args.prompt, args.new_tokens, Path(folder), kernel_times_per_run)
            times = step_times(runs["decode"][1:])
            # An If's time holds its branch's kernels, which the profiler records on their own too.
            branches = times["ops"].pop("If", 0.0)
            total = sum(times["ops"].values())
            print(f"fused decode step, {args.threads} thread(s), median of {len(runs['decode']) - 1} steps: "
                  f"{total:.2f} ms in kernels")
            for op, ms in sorted(times["ops"].items(), key=lambda item: -item[1])[:8]:
                print(f"  {op:<34} {ms:7.2f} ms  {ms / total:6.1%}")
            print(f"  (If, its branches' kernels above: {branches:.2f} ms)")
            print("by module (products and the rest):")
            modules = {m: v for m, v in times["modules"].items() if not m.startswith("If")}
            for module, (ms, nodes) in sorted(modules.items(), key=lambda item: -item[1][0])[:12]:
                print(f"  {module:<34} {ms:7.2f} ms  {nodes:3d} nodes, {ms / nodes:.3f} ms each")
            return 0
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
