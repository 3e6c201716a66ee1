"""python -m bench: this project's runtimes side by side with transformers, on one machine, in one run.

    python -m bench                                   # CPU: demo model and the 3B-wide 2-layer model, all runtimes
    python -m bench --workloads wide --runtimes transformers,onnx-int8 --runs 3 --threads 2
    python -m bench --smoke --out /tmp/bench          # tiny model, one run: what CI runs
    python -m bench --cuda                            # full PaliGemma-3B shape in bfloat16 on an NVIDIA GPU
    python -m bench --mode requests --workloads demo  # whole caption requests as the app makes them
    python -m bench --mode load                       # N concurrent clients, library and app (bench/load.py)

Each runtime runs in its own process (so peak memory is its own) on the same checkpoint, image and prompt, and
generates the same number of greedy tokens; the table printed last gives each figure and its ratio to transformers,
marks a runtime whose tokens differ from transformers', and gives the kernels ONNX Runtime runs per decoded token
(its profiler, on one more request). Results go to OUT/{cpu,cuda}.{json,md,png}.

--mode requests times whole `pipeline.generate` calls as the app makes them instead: "caption en" on --scenes drawn
scenes, greedy, stopping at end-of-sequence or --new-tokens (the app's 64), each runtime on the threads the app
gives it unless --threads; the table gives the median per request, the ratios to transformers and to eager torch,
and on how many scenes each answer equals transformers'. Results go to OUT/{cpu,cuda}-requests.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import limits, report, worker
from .worker import CPU_RUNTIMES, CUDA_RUNTIMES
from .workloads import PROMPT, WORKLOADS, exporter_source_digest, request_image

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "paligemma-bench"

# The targets, as ratios to transformers on the same machine in the same run (or absolute on CUDA).
TARGETS = {
    "demo": {"onnx": dict(decode=4.0, ttft=2.0)},
    "wide": {"onnx": dict(decode=1.3, ttft=1.5), "onnx-int8": dict(decode=3.0, ttft=1.5),
             "onnx-int4": dict(decode=5.0, ttft=1.5)},
    "full3b": {"torch-compiled": dict(decode_tokens_per_s=400, ttft_ms=20)},
}
REQUEST_TARGETS = {"demo": {"onnx": dict(speedup=5.0, faster_than_torch=True)}}  # whole requests: the app's own target
EXPORTS = {"onnx": None, "onnx-int8": "int8", "onnx-int4": "int4"}  # runtime -> quantization


def default_runtimes(cuda: bool) -> list[str]:
    """Every runtime of the mode whose export the exporter can make (an ONNX quantization it does not offer yet is
    left out unless asked for by name)."""
    from export.writer.onnx_export import QUANTIZATIONS

    return [name for name in (CUDA_RUNTIMES if cuda else CPU_RUNTIMES) if EXPORTS.get(name) in (None, *QUANTIZATIONS)]


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)} "
                                            "(default: demo,wide on CPU, full3b with --cuda, tiny with --smoke)")
    parser.add_argument("--runtimes", help=f"comma-separated; CPU: {', '.join(CPU_RUNTIMES)}; "
                                           f"CUDA: {', '.join(CUDA_RUNTIMES)} (default: all the exporter can make)")
    parser.add_argument("--mode", choices=("speed", "requests", "load"), default="speed",
                        help="speed: time to first token and decode rate of a fixed-length answer (default); "
                             "requests: whole generate calls as the app makes them; load: N concurrent clients "
                             "(bench/load.py)")
    load = parser.add_argument_group("--mode load")
    load.add_argument("--clients", default=",".join(map(str, (1, 4, 8, 16, 32))),
                      help="numbers of concurrent clients, comma-separated (default %(default)s)")
    load.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    load.add_argument("--targets", default="library,app",
                      help="comma-separated: library, app (the page's API over HTTP; 'http' is its former name), api "
                           "(the JSON endpoint POST /api/answer) (default %(default)s)")
    load.add_argument("--mix", choices=("demo", "caption"), default="demo",
                      help="demo: caption, detect, segment and count prompts with the app's budgets; caption: "
                           "captions of --new-tokens tokens each, generated to the end")
    load.add_argument("--max-batch", type=int, default=None, help="rows of the batch (default: the library's)")
    load.add_argument("--root", help="also drive the app of this checkout, as it is (e.g. the code before a change)")
    load.add_argument("--seed", type=int, default=0, help="seed of the drawn scenes")
    load.add_argument("--prefill-between-steps", action="store_true",
                      help="also the library batched with each decode step waiting for a prefill in progress: what "
                           "a loop that prefilled arrivals between its steps would cost the running rows")
    load.add_argument("--keep-records", action="store_true", help="keep every request's record in load.json")
    parser.add_argument("--scenes", type=int, default=8, help="drawn scenes per run in --mode requests")
    parser.add_argument("--runs", type=int, default=5,
                        help="timed runs per runtime (in --mode requests: passes over the scenes); "
                             "the median is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first, in each process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="start every runtime's process this many times, taking turns (evens out a shared machine)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime (default: all cores)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny model, one run, few tokens: checks that it all works")
    parser.add_argument("--cuda", action="store_true", help="GPU mode: bfloat16, static cache and compiled paths")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"where results go (default {DEFAULT_OUT})")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help=f"built checkpoints and ONNX exports (default {DEFAULT_CACHE})")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each runtime's process")
    parser.add_argument("--in-process", action="store_true",
                        help="run every runtime and export in this process (faster; peak memory is not measured)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024,
                        help="the buffer the memory bandwidth is measured on (CPU; keep it much larger than the "
                             "last-level cache; default 1024, 64 with --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.workloads = args.workloads or "tiny"
        args.runs, args.rounds, args.warmup, args.in_process = 1, 1, 0, True
        args.new_tokens = min(args.new_tokens, 16)
        args.bandwidth_mib = min(args.bandwidth_mib, 64)
    default_workloads = "demo" if args.mode == "load" else "full3b" if args.cuda else "demo,wide"
    args.workloads = (args.workloads or default_workloads).split(",")
    allowed = CUDA_RUNTIMES if args.cuda else CPU_RUNTIMES
    args.runtimes = (args.runtimes.split(",") if args.runtimes
                     else ["onnx"] if args.mode == "load" else default_runtimes(args.cuda))
    if args.mode == "load":
        args.clients = [int(n) for n in args.clients.split(",")]
        args.targets = ["app" if t == "http" else t for t in args.targets.split(",")]
        if any(n < 1 for n in args.clients) or args.requests < 1 or not set(args.targets) <= {"library", "app", "api"}:
            parser.error("--clients must be whole numbers >= 1, --requests >= 1, --targets from library, app, api")
        if "transformers" in args.runtimes:
            parser.error("--mode load drives this project's pipeline: pick from torch, onnx, onnx-int8, onnx-int4")
        if args.mix == "caption" and {"app", "api"} & set(args.targets):
            parser.error("--mix caption generates to the end (no stop), which the app does not offer: "
                         "use --targets library")
    for name in args.workloads:
        if name not in WORKLOADS:
            parser.error(f"unknown workload '{name}'; choose from {', '.join(WORKLOADS)}")
    for name in args.runtimes:
        if name not in allowed:
            parser.error(f"unknown runtime '{name}' for {'--cuda' if args.cuda else 'CPU'}; "
                         f"choose from {', '.join(allowed)}")
    if args.runs < 1 or args.rounds < 1 or args.scenes < 1 or args.warmup < 0 or args.new_tokens < 2:
        parser.error("--runs, --rounds and --scenes must be >= 1, --warmup >= 0 and --new-tokens >= 2")
    if args.bandwidth_mib < 1:
        parser.error("--bandwidth-mib must be >= 1")
    return args


def machine(cuda: bool) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0))
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    extensions = limits.isa_extensions()
    info = dict(cpu=cpu, cores=cores, memory_gb=round(memory_gb), python=platform.python_version(),
                torch=torch.__version__, isa_extensions=extensions,
                summary=f"{cpu}, {cores} cores, {memory_gb:.0f} GiB, "
                        f"{' '.join(extensions) or 'ISA extensions unknown'}")
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["summary"] = f"{info['gpu']}; {info['summary']}"
    return info


class StepFailed(RuntimeError):
    """A worker or export process failed; the message is the tail of its output."""


def run_process(command: list[str], timeout: float) -> None:
    """Runs a command from the repository root; raises StepFailed with the tail of its output if it fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"timed out after {timeout:.0f}s: {' '.join(command)}") from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        if done.returncode < 0:  # no traceback: killed, e.g. by the kernel when memory ran out
            tail.append(f"killed by signal {-done.returncode} (out of memory?)")
        raise StepFailed("\n".join(tail) or f"exit status {done.returncode}")


def ensure_export(folder: Path, runtime: str, args, log) -> Path:
    """The ONNX export a runtime reads, made once per checkpoint, variant and exporter source and kept in the
    benchmark's cache (export.runtime.cached_export's rule), without validation, in a process of its own unless
    --in-process."""
    from export.runtime import cached_export
    from export.variants import variant_name
    from paligemma.checkpoint import Checkpoint

    dtype = "float16" if args.cuda else "float32"
    quantize = EXPORTS[runtime]
    variant = variant_name(dtype, quantize)
    checkpoint = Checkpoint.resolve(folder)

    def make(staging: Path) -> None:
        log(f"  exporting {folder.name} to ONNX ({variant}) in {staging}")
        start = time.perf_counter()
        if args.in_process:
            from export.writer.onnx_export import export_model

            export_model(checkpoint, staging, dtype=dtype, quantize=quantize, progress=False, log=lambda message: None)
        else:
            command = [sys.executable, "-m", "export", "--model", str(folder), "--output", str(staging),
                       "--no-validate", "--dtype", dtype] + (["--quantize", quantize] if quantize else [])
            run_process(command, args.timeout)
        log(f"  exported in {time.perf_counter() - start:.0f}s")

    return cached_export(checkpoint, dtype, quantize, root=args.cache_dir / "onnx",
                         salt=exporter_source_digest(), make=make)


def measure(spec: dict, args, tmp: Path) -> dict:
    """One runtime's measurements: in a process of its own (so peak memory is its own), or in this one."""
    if args.in_process:
        return dict(worker.measure(spec), peak_rss_mb=None)
    name = f"{spec['runtime']}-{spec['dtype']}"
    spec_path, result_path = tmp / f"{name}.spec.json", tmp / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    run_process([sys.executable, "-m", "bench.worker", str(spec_path), str(result_path)], args.timeout)
    return json.loads(result_path.read_text())


def bench_workload(name: str, args, log) -> dict:
    """Every runtime on one workload. With several rounds the runtimes take turns (round 1: each runtime, round 2:
    each again, ...), so that a change in the machine's load during the run weighs on all of them alike."""
    workload = WORKLOADS[name]
    device, dtype = ("cuda", "bfloat16") if args.cuda else ("cpu", "float32")
    folder = workload.prepare(args.cache_dir, dtype=getattr(torch, dtype), device=device, log=log)
    rounds: dict[str, list[dict]] = {runtime: [] for runtime in args.runtimes}
    with_limits = not args.cuda and args.mode == "speed"
    limit_rounds, onnx_dirs = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for round_ in range(args.rounds):
            if with_limits:
                log(f"  {name}: the machine's limits" + (f" (round {round_ + 1})" if args.rounds > 1 else ""))
                limit_rounds.append(measure_limits(folder, args))
            for runtime in args.runtimes:
                if rounds[runtime] and "error" in rounds[runtime][0]:
                    continue
                log(f"  {name}: {runtime}" + (f" (round {round_ + 1} of {args.rounds})" if args.rounds > 1 else ""))
                start = time.perf_counter()
                spec = dict(runtime=runtime, checkpoint=str(folder), onnx_dir=None, prompt=PROMPT,
                            new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup, threads=args.threads,
                            device=device, dtype=dtype, mode=args.mode, scenes=args.scenes)
                try:
                    if runtime.startswith("onnx"):
                        spec["onnx_dir"] = onnx_dirs[runtime] = str(ensure_export(folder, runtime, args, log))
                    result = measure(spec, args, Path(tmp))
                    if args.cuda and args.mode == "speed" and not rounds[runtime]:
                        result["check"] = float32_check(spec, args, Path(tmp))
                    rounds[runtime].append(result)
                except Exception as e:  # one runtime failing must not hide the others' figures
                    log(f"    failed: {e}")
                    rounds[runtime] = [dict(runtime=runtime, error=f"{type(e).__name__}: {e}")]
                log(f"  {runtime} took {time.perf_counter() - start:.0f}s")
    results = [merge_rounds(r) for r in rounds.values()]
    summary = dict(name=name, description=workload.description, checkpoint=str(folder), new_tokens=args.new_tokens,
                   runs=args.runs * args.rounds, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                   in_process=args.in_process, mode=args.mode, raw=results)
    if args.mode == "requests":
        return dict(summary, prompt=PROMPT, scenes=args.scenes, runs=args.runs * args.rounds * args.scenes,
                    rows=report.summarize_requests(results, REQUEST_TARGETS.get(name, {})))
    rows = report.summarize(results, TARGETS.get(name, {}))
    if limit_rounds:
        summary["limits"] = limits.best_of(limit_rounds)
        set_against_limits(rows, folder, onnx_dirs, summary["limits"], args.new_tokens)
    return dict(summary, rows=rows)


def measure_limits(folder: Path, args) -> dict:
    """The machine's limits (bench/limits.py) at this checkpoint's prefill shape, with the blocks the int8 and int4
    exports give a product that wide."""
    from export.quantize import SCHEMES
    from paligemma.checkpoint import Checkpoint

    checkpoint = Checkpoint.resolve(folder)
    prompt_tokens = checkpoint.processor()([request_image()], [PROMPT])["input_ids"].shape[1]
    width = checkpoint.config.text.hidden_size
    blocks = {SCHEMES[name].bits: SCHEMES[name].block(width) for name in ("int8", "int4")}
    return limits.measure(checkpoint.config, prompt_tokens, args.threads or len(os.sched_getaffinity(0)),
                          args.bandwidth_mib * 2**20, blocks=blocks)


def set_against_limits(rows: list[dict], folder: Path, onnx_dirs: dict, machine_limits: dict, new_tokens: int) -> None:
    """Each row's decode as a fraction of the bandwidth bound (its weights as it stores them: float32, or the
    export's data file) and its first token as a fraction of the compute bound."""
    from paligemma.checkpoint import Checkpoint

    config = Checkpoint.resolve(folder).config
    for row in rows:
        if "error" in row:
            continue
        prompt_tokens = len(row["prompt_ids"])
        weights = (limits.export_decoder_bytes(Path(onnx_dirs[row["runtime"]])) if row["runtime"] in onnx_dirs
                   else limits.float_decoder_bytes(config))
        row.update(limits.against_limits(row, machine_limits, limits.prefill_operations(config, prompt_tokens),
                                         limits.decode_bytes(config, weights, prompt_tokens, new_tokens)))


def float32_check(spec: dict, args, tmp: Path) -> dict:
    """The runtime's greedy tokens with the same weights in float32 (TF32 off). Random bfloat16 weights leave
    near-ties that rounding flips, differently in every runtime (transformers' own two paths disagree), so in
    CUDA mode the tokens that must agree with transformers' are these; the bfloat16 ones are reported beside."""
    result = measure(dict(spec, dtype="float32", runs=1, warmup=0), args, tmp)
    return dict(dtype="float32", tokens=result["tokens"], prompt_ids=result["prompt_ids"])


def merge_rounds(rounds: list[dict]) -> dict:
    """One runtime's rounds as one result: all timed runs, the highest peak memory, tokens (or answers) repeatable
    across rounds."""
    first = rounds[0]
    if "error" in first or len(rounds) == 1:
        return first
    outputs = "answers" if "answers" in first else "tokens"
    timings = ("request_s",) if outputs == "answers" else ("ttft_s", "decode_tokens_per_s")
    merged = dict(first, **{key: [t for r in rounds for t in r[key]] for key in (*timings, "load_average")
                            if key in first},
                  load_s=max(r["load_s"] for r in rounds),
                  repeatable=all(r["repeatable"] and r[outputs] == first[outputs] for r in rounds))
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        merged[key] = max(values) if values else None
    return merged


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cuda and not torch.cuda.is_available():
        print("error: --cuda needs an NVIDIA GPU that torch can see (torch.cuda.is_available() is False here); "
              "run without --cuda for the CPU benchmark", file=sys.stderr)
        return 2

    def log(message):
        print(message, file=sys.stderr, flush=True)

    if args.mode == "load":
        from . import load

        return load.main(args, log, ensure_export, machine)
    start = time.time()
    workloads = []
    for name in args.workloads:
        log(f"workload {name}")
        try:
            workloads.append(bench_workload(name, args, log))
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    mode = ("cuda" if args.cuda else "cpu") + ("-requests" if args.mode == "requests" else "")
    result = dict(mode=mode, machine=machine(args.cuda), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                  command="python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
                  smoke=args.smoke, workloads=workloads)
    args.out.mkdir(parents=True, exist_ok=True)
    table = report.requests_table if args.mode == "requests" else report.markdown_table
    tables = "\n\n".join(table(w) for w in workloads)
    markdown = f"Machine: {result['machine']['summary']}; {result['date']}; `{result['command']}`\n\n{tables}\n"
    report.write_json(args.out / f"{mode}.json", result)
    (args.out / f"{mode}.md").write_text(markdown)
    chart = args.mode == "speed" and bool(report.ratio_panels(result))  # ratios need transformers beside the others
    if chart:
        report.plot_ratios(args.out / f"{mode}.png", result)
    print(markdown)
    log(f"wrote {args.out / mode}.json, .md{' and .png' if chart else ''} in {time.time() - start:.0f}s")
    failed = [f"{w['name']}/{r['runtime']}" for w in workloads for r in w["rows"] if "error" in r]
    if failed:
        print(f"error: {', '.join(failed)} failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
