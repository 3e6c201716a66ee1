"""The batch command against a plain loop, on Ray, and killed half-way (docs/datasets.md has the figures):

    python -m bench.batch --scenes 2000 [--backend onnx] [--parts loop,batch,ray1,ray,raycold,kill,steps]
                          [--results DIR]

Drawn scenes (shapes.scenes, seed 1) are written as PNG files into a folder; then, each in a process of its own:
- loop: what a user writes first, a plain loop that opens each file and calls `pipe.generate` on it, one at a time,
  on the same backend (`paligemma.load(backend=...)`, as it comes; and again with torch on one thread, as the batch
  command sets it for ONNX Runtime, so the comparison does not rest on that setting);
- batch: `python -m paligemma batch --input FOLDER --out FILE` (its defaults: 8 rows, 2 readers);
- ray: the same with `--ray ADDRESS --workers 2 --cpus-per-worker 1`: 2 actors, one thread each, on a local cluster
  of this machine's cores that is running already (as one started with `ray start --head` would be); ray1: one
  actor; raycold: `--ray` alone, which starts a local cluster for the run (its start-up counted);
- kill: the batch command killed with SIGKILL once half the lines are written, then run again to the end;
- steps (in this process, not by default): milliseconds per call of an answer's parts (read, preprocess, prefill
  alone and per image of 2-16 prefilled together, a decode step of 1-16 rows) and of pipe.generate.

Each reports images/s over its answering (the model loaded; for Ray, the cluster's start and the actors' start-up
included), from its first answer on (the steady rate), between its 10% and 90% lines (timed as the answers file
grows: the same clock for the single process and Ray), and over the whole command (process start to exit), the
process's wall time and peak resident memory
(/usr/bin/time; for Ray, the driver's), and the load average of the machine before and after. Answers: the token ids
of every image against the loop's, and the lines of the killed-and-resumed run against the uninterrupted one's
(timings aside). Results: DIR/batch.json and DIR/batch.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "caption en"
MAX_NEW_TOKENS = 96  # the batch command's default
SUMMARY = re.compile(r"answered (\d+), failed (\d+).*?; ([\d.]+) images/s \((\d+) in ([\d.]+) s; the first after "
                     r"([\d.]+) s\)")


def draw_scenes(folder: Path, count: int) -> Path:
    from shapes.scenes import render_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"scene-{i:05d}.png"
        if not path.exists():
            render_scene(1, i).image.save(path)
    return folder


def plain_loop(folder: Path, backend: str, torch_threads: int | None, out: Path) -> None:
    """In this process: the loop a user writes first, timed after the load."""
    import torch

    import paligemma

    if torch_threads:
        torch.set_num_threads(torch_threads)
    start = time.perf_counter()
    pipe = paligemma.load(backend=backend)
    loaded = time.perf_counter()
    answers, first = {}, None
    for path in sorted(folder.glob("*.png")):
        result = pipe.generate(str(path), PROMPT, max_new_tokens=MAX_NEW_TOKENS)
        answers[path.name] = result.token_ids
        first = first or time.perf_counter() - loaded
    seconds = time.perf_counter() - loaded
    out.write_text(json.dumps(dict(load_s=loaded - start, seconds=seconds, first_s=first, answers=answers,
                                   torch_threads=torch.get_num_threads())))


def timed(command: list[str], env: dict | None = None, actors_under: int | None = None, out: Path | None = None,
          total: int | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs `command` under /usr/bin/time -v: (the process, {wall_s, peak_rss_mb (its largest process: the driver,
    for Ray), load before and after}); with `actors_under`, also actor_peak_rss_mb: the largest peak RSS of a Ray
    actor process below that process (the cluster's holder; None: below the command); with `out` (the answers file
    it writes) and `total` (its lines at the end), also window_images_per_s: the rate between the 10% and the 90%
    line, as the file grows (the same clock for every run: start-up and tail left out)."""
    before = os.getloadavg()
    clock = LineClock(out, total) if out is not None else None
    if clock:
        clock.start()
    start = time.perf_counter()
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                       **(env or {})})
    actors = ActorMemory(actors_under or process.pid) if actors_under is not None or "--ray" in command else None
    if actors:
        actors.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    window = clock.stop() if clock else None
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    figures = dict(wall_s=round(wall, 2), peak_rss_mb=round(int(peak.group(1)) / 1024) if peak else None,
                   load_before=[round(x, 2) for x in before], load_after=[round(x, 2) for x in os.getloadavg()])
    if actors:
        figures["actor_peak_rss_mb"] = actors.stop()
    if window is not None:
        figures["window_images_per_s"] = window
    return result, figures


class LineClock(threading.Thread):
    """Polls an answers file every 5 ms from empty to `total` lines; `stop` gives the lines per second between the
    10% and the 90% line (None if it did not get there)."""

    def __init__(self, path: Path, total: int):
        super().__init__(daemon=True)
        self.path, self.marks, self.done = path, (total // 10, total - total // 10), threading.Event()
        self.times: dict[int, float] = {}

    def run(self) -> None:
        lines, offset = 0, 0
        while not self.done.wait(0.005) and len(self.times) < 2:
            try:
                with open(self.path, "rb") as file:
                    file.seek(offset)
                    data = file.read()
            except FileNotFoundError:
                continue
            offset += len(data)
            lines += data.count(b"\n")
            now = time.perf_counter()
            for mark in self.marks:
                if lines >= mark and mark not in self.times:
                    self.times[mark] = now

    def stop(self) -> float | None:
        self.done.set()
        self.join()
        low, high = self.marks
        if len(self.times) < 2 or self.times[high] <= self.times[low]:
            return None
        return round((high - low) / (self.times[high] - self.times[low]), 1)


class ActorMemory(threading.Thread):
    """Samples, every 0.2 s, the peak RSS (VmHWM) of the Ray actor processes below process `root`; `stop` gives the
    largest, in MB (None if none was seen). /usr/bin/time sees only the driver (the actors are the raylet's)."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kb, self.done = root, 0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for pid in descendants(self.root):
                try:
                    if not Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                        continue
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                found = re.search(r"VmHWM:\s+(\d+) kB", status)
                if found:
                    self.peak_kb = max(self.peak_kb, int(found.group(1)))

    def stop(self) -> int | None:
        self.done.set()
        self.join()
        return round(self.peak_kb / 1024) if self.peak_kb else None


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.extend(children.get(pid, []))
        todo.extend(children.get(pid, []))
    return found


def summary_of(stderr: str) -> dict:
    found = SUMMARY.findall(stderr)
    if not found:
        raise RuntimeError(f"no summary line in:\n{stderr[-2000:]}")
    answered, failed, rate, count, seconds, first = found[-1]
    count, seconds, first = int(count), float(seconds), float(first)
    return dict(answered=int(answered), failed=int(failed), images_per_s=float(rate), seconds=seconds,
                first_s=first, steady_images_per_s=round((count - 1) / max(seconds - first, 1e-9), 1))


def token_ids(path: Path) -> dict:
    return {r["id"]: r["token_ids"] for r in map(json.loads, path.read_text().splitlines())}


def lines_without_timings(path: Path) -> set[str]:
    records = map(json.loads, path.read_text().splitlines())
    return {json.dumps({k: v for k, v in r.items() if k != "timings"}, sort_keys=True) for r in records}


def batch_command(folder: Path, out: Path, backend: str, *extra) -> list[str]:
    return [sys.executable, "-m", "paligemma", "batch", "--input", str(folder), "--out", str(out),
            "--backend", backend, "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS), *map(str, extra)]


# A process that holds a local Ray cluster (started by ray.init, so it ends with the process) and prints its address:
# the runs on a "running cluster" connect to it as the docs' `ray start --head` cluster would be connected to. Both
# sides use token authentication (Ray's default for a new cluster) with this machine's token, ~/.ray/auth_token: a
# driver given an address uses it only when RAY_AUTH_MODE=token says so.
TOKEN_AUTH = {"RAY_AUTH_MODE": "token"}
CLUSTER_HOLDER = ("import sys, ray; ray.init(address='local', num_cpus=int(sys.argv[1]), include_dashboard=False); "
                  "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()")


def start_cluster(cpus: int) -> tuple[subprocess.Popen, str]:
    holder = subprocess.Popen([sys.executable, "-c", CLUSTER_HOLDER, str(cpus)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, **TOKEN_AUTH})
    address = holder.stdout.readline().strip()
    if not address:
        holder.kill()
        raise RuntimeError("the local Ray cluster did not start")
    return holder, address


def stop_cluster(holder: subprocess.Popen) -> None:
    holder.stdin.close()  # it returns from its read and exits; ray.shutdown runs at exit
    try:
        holder.wait(timeout=60)
    except subprocess.TimeoutExpired:
        holder.kill()


def kill_half_way(folder: Path, out: Path, backend: str, count: int) -> dict:
    """The batch command killed with SIGKILL once half the lines are written, then run again to the end."""
    out.unlink(missing_ok=True)
    process = subprocess.Popen(batch_command(folder, out, backend), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    while process.poll() is None and (not out.exists() or out.read_bytes().count(b"\n") < count // 2):
        time.sleep(0.01)
    if process.poll() is not None:
        raise RuntimeError("the run ended before it was killed")
    process.send_signal(signal.SIGKILL)
    process.wait()
    data = out.read_bytes()
    killed = dict(lines=data.count(b"\n"), partial_line_bytes=len(data) - (data.rfind(b"\n") + 1))
    result, process_figures = timed(batch_command(folder, out, backend))
    return dict(killed=killed, resumed=summary_of(result.stderr), **process_figures)


def step_times(backend: str, rounds: int = 3) -> dict:
    """In this process, milliseconds per call of an answer's parts, as the batch command runs them (torch on one
    thread, ONNX Runtime on its plan): reading and preprocessing an image, its prefill (vision tower and prompt) alone
    and per image of 2, 4, 8 and 16 prefilled together, a decode step of 1, 2, 4, 8 and 16 rows; and `pipe.generate`
    whole, as the plain loop calls it."""
    import torch

    from paligemma.batch import load_pipeline
    from paligemma.processor import load_image_and_size

    load = dict(path_or_repo_id=None, backend=backend, quantize=None, onnx_dir=None, device="cpu", max_batch=8)
    pipe = load_pipeline(load, None)
    engine = pipe.batcher.engine
    folder = draw_scenes(Path("/tmp/paligemma-bench-batch-steps"), 20)
    paths = sorted(str(path) for path in folder.glob("*.png"))

    def per_call(function, calls) -> float:
        function()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        return round((time.perf_counter() - start) / calls * 1e3, 3)

    images = [load_image_and_size(path, pipe.config.image_size)[0] for path in paths]
    inputs = [pipe.processor([image], [PROMPT]) for image in images]
    cycle = iter(range(10**9))
    times = dict(
        read=per_call(lambda: load_image_and_size(paths[next(cycle) % 20], pipe.config.image_size), 20 * rounds),
        preprocess=per_call(lambda: pipe.processor([images[next(cycle) % 20]], [PROMPT]), 20 * rounds),
        prefill=per_call(lambda: engine.prefill(inputs[next(cycle) % 20], MAX_NEW_TOKENS), 20 * rounds),
        generate=per_call(lambda: pipe.generate(paths[next(cycle) % 20], PROMPT, max_new_tokens=MAX_NEW_TOKENS),
                          20 * rounds))
    for count in (2, 4, 8, 16):  # images prefilled together (prefill_many): milliseconds per image
        times[f"prefill_{count}_together_per_image"] = round(per_call(
            lambda: engine.prefill_many([inputs[next(cycle) % 20] for _ in range(count)], [MAX_NEW_TOKENS] * count),
            20 * rounds // count) / count, 3)
    load["max_batch"] = 16
    pipe = load_pipeline(load, None)
    engine = pipe.batcher.engine
    for count in (1, 2, 4, 8, 16):
        rows = [engine.join(engine.prefill(inputs[i % 20], MAX_NEW_TOKENS)[0]) for i in range(count)]
        tokens = torch.tensor([2] * count)
        times[f"decode_{count}_rows"] = per_call(lambda: engine.decode(rows, tokens), 30 * rounds)
        for row in reversed(rows):
            engine.release(row)
    return dict(ms_per_call=times, thread_plan=str(pipe.engine_factory.thread_plan), load=os.getloadavg())


def markdown(report: dict) -> str:
    rows = ["| run | images/s (answering) | steady, from the first answer | between the 10% and 90% lines | whole "
            "command | first answer | wall (process) | peak RSS (process; an actor) | load average before / after |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in report["runs"].items():
        actor = f"; {run['actor_peak_rss_mb']} MB" if run.get("actor_peak_rss_mb") else ""
        window = run.get("window_images_per_s")
        rows.append(f"| {name} | {run['images_per_s']:.1f} | {run['steady_images_per_s']:.1f} | "
                    f"{'-' if window is None else f'{window:.1f}'} | {report['scenes'] / run['wall_s']:.1f} | "
                    f"{run['first_s']:.2f} s | {run['wall_s']:.1f} s | {run['peak_rss_mb']} MB{actor} | "
                    f"{run['load_before'][0]} / {run['load_after'][0]} |")
    lines = [f"# The batch command: {report['scenes']} drawn scenes, backend {report['backend']}", "",
             f"CPU: {report['cpu']}; {report['cores']} cores.", "", *rows, ""]
    for key, value in report["checks"].items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def ratios(run: dict, single: dict, scenes: int) -> str:
    """A Ray run's rates against the single process's: answering (each as it prints it), between the 10% and 90%
    lines, and over each whole command (process start to exit)."""
    window = (f"{run['window_images_per_s'] / single['window_images_per_s']:.2f}x"
              if run.get("window_images_per_s") and single.get("window_images_per_s") else "-")
    return (f"answering {run['images_per_s'] / single['images_per_s']:.2f}x, 10%-90% lines {window}, whole command "
            f"{single['wall_s'] / run['wall_s']:.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torch"])
    parser.add_argument("--parts", default="loop,batch,ray1,ray,raycold,kill")
    parser.add_argument("--work", default="/tmp/paligemma-bench-batch", help="scenes and answers are written here")
    parser.add_argument("--results", default=None, help="folder for batch.json and batch.md (default: print only)")
    parser.add_argument("--plain-loop", nargs=3, metavar=("FOLDER", "TORCH_THREADS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_loop:
        folder, threads, out = args.plain_loop
        plain_loop(Path(folder), args.backend, int(threads) or None, Path(out))
        return 0
    work = Path(args.work)
    folder = draw_scenes(work / f"scenes-{args.scenes}", args.scenes)
    parts = args.parts.split(",")
    report = dict(scenes=args.scenes, backend=args.backend, cores=len(os.sched_getaffinity(0)), cpu=cpu_name(),
                  runs={}, checks={})
    answers = {}
    if "loop" in parts:
        for threads in (0, 1):
            out = work / f"loop-{threads}.json"
            _, figures = timed([sys.executable, "-m", "bench.batch", "--backend", args.backend, "--plain-loop",
                                str(folder), str(threads), str(out)])
            loop = json.loads(out.read_text())
            name = f"plain loop (torch threads {loop['torch_threads']})"
            report["runs"][name] = dict(images_per_s=round(args.scenes / loop["seconds"], 1),
                                        steady_images_per_s=round((args.scenes - 1) / (loop["seconds"]
                                                                                        - loop["first_s"]), 1),
                                        first_s=loop["first_s"], **figures)
            answers[name] = loop["answers"]
    if {"batch", "kill", "ray", "ray1", "raycold"} & set(parts):
        out = work / "batch.jsonl"
        out.unlink(missing_ok=True)
        result, figures = timed(batch_command(folder, out, args.backend), out=out, total=args.scenes)
        report["runs"]["batch (its defaults)"] = dict(**summary_of(result.stderr), **figures)
        answers["batch"] = token_ids(out)
    for name, loop_answers in answers.items():
        if name != "batch" and "batch" in answers:
            same = sum(loop_answers[k] == answers["batch"].get(k) for k in loop_answers)
            report["checks"][f"batch's token ids equal to the {name}'s"] = f"{same} of {len(loop_answers)}"
    ray_runs = [(workers, running) for workers, running, part in [(1, True, "ray1"), (2, True, "ray"),
                                                                  (2, False, "raycold")] if part in parts]
    holder, address = start_cluster(report["cores"]) if any(running for _, running in ray_runs) else (None, None)
    try:
        for workers, running in ray_runs:
            out = work / f"ray-{workers}-{'running' if running else 'new'}.jsonl"
            out.unlink(missing_ok=True)
            result, figures = timed(batch_command(folder, out, args.backend, "--ray", *([address] if running else []),
                                                  "--workers", workers, "--cpus-per-worker", 1),
                                    env=TOKEN_AUTH if running else None, actors_under=holder.pid if running else None,
                                    out=out, total=args.scenes)
            name = (f"ray, {workers} actor{'s' if workers > 1 else ''} x 1 CPU, "
                    f"{'local cluster running' if running else 'new local cluster (--ray alone)'}")
            report["runs"][name] = dict(**summary_of(result.stderr), **figures)
            report["checks"][f"{name} against the single process"] = ratios(
                report["runs"][name], report["runs"]["batch (its defaults)"], args.scenes)
            ray_answers = token_ids(out)
            same = sum(ray_answers.get(k) == v for k, v in answers["batch"].items())
            report["checks"][f"{name}: token ids equal to the batch's"] = f"{same} of {len(answers['batch'])}"
    finally:
        if holder is not None:
            stop_cluster(holder)
    if "steps" in parts:
        report["steps"] = step_times(args.backend)
        report["checks"]["milliseconds per call (steps)"] = report["steps"]
    if "kill" in parts:
        out = work / "killed.jsonl"
        kill = kill_half_way(folder, out, args.backend, args.scenes)
        report["kill"] = kill
        equal = lines_without_timings(out) == lines_without_timings(work / "batch.jsonl")
        killed, resumed = kill["killed"], kill["resumed"]
        report["checks"]["killed at half-way"] = (
            f"{killed['lines']} lines and {killed['partial_line_bytes']} bytes of a partial line when killed; "
            f"resumed: {resumed['answered']} answered in {resumed['seconds']} s")
        report["checks"]["killed and resumed: the same lines as uninterrupted (timings aside)"] = equal
    text = markdown(report)
    print(text)
    if args.results:
        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        (results / "batch.json").write_text(json.dumps(report, indent=1) + "\n")
        (results / "batch.md").write_text(text)
    return 0


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = re.search(r"model name\s*:\s*(.*)", info)
    flags = sorted(set(re.findall(r"\b(avx512_vnni|avx512_bf16|avx2)\b", info)))
    return f"{model.group(1) if model else 'unknown'} ({', '.join(flags)})"


if __name__ == "__main__":
    sys.exit(main())
