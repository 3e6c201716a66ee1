"""Many visitors at once: N concurrent clients against the library (one Pipeline called from N threads) and
against the running app over HTTP, beside the same load served one request at a time.

    python -m bench --mode load                                   # the demo model: library and app, N = 1..32
    python -m bench --mode load --workloads wide --runtimes onnx,onnx-int4 --clients 1,8 --targets library \\
        --mix caption --new-tokens 64
    python -m bench --mode load --targets app --root /tmp/main    # also the app of another checkout ("today's")
    python -m bench --mode load --targets api,app --clients 1,32  # the JSON endpoint beside the page, and the page

Each client sends `--requests` requests one after another (its next when its last has finished); the requests mix
caption, detect, segment and count prompts on drawn scenes, each with its own budget (`--mix caption`: captions of
`--new-tokens` tokens only, generated to the end: no end-of-sequence stop, through the library only). For every
number of clients: requests/s and generated tokens/s (from the first request sent to the last finished), time to
first token and whole-request latency (p50 and p95), the largest gap between two tokens of one request (a request
joining the batch is prefilled while the others decode: this is what it costs them), peak resident memory (of the
process that runs the model, reset before each N), and how many answers equal the one-at-a-time answers.

Targets: `library`, `app` (the page's API over HTTP; `http` is its former name) and `api` (the JSON endpoint
POST /api/answer on the same server, demo/api.py: one form posted, one JSON answer).

Library: each configuration (runtime, max_batch or one at a time) runs in a process of its own (bench/load.py as a
script, a JSON spec in, a JSON result out), as the speed benchmark's workers do. HTTP: `python app.py` is started as
a server process for each configuration and driven with the calls gradio_client makes (upload the image, join the
queue, read the event stream), over raw HTTP: one connection and one session a client (as a gradio_client Client
keeps), without its API discovery per client. The time to
first token over HTTP is the first streamed update that holds answer text. The JSON endpoint does not stream: its
first token is placed where the server's timings put it, (total_s - ttft_s) before the answer arrived.
"""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEMO_MIX = [  # (prompt, max_new_tokens): what the app's visitors ask, with the app's budgets
    ("caption en", 64),
    ("detect circle ; triangle", 48),
    ("segment circle ; triangle", 96),
    ("answer en how many shapes are there?", 16),
]
DEFAULT_CLIENTS = (1, 4, 8, 16, 32)


def requests_for(clients: int, per_client: int, mix: list[tuple[str, int]], scenes: int) -> list[list[dict]]:
    """The requests of each client: a scene (by index) and a prompt and budget, spread over the mix."""
    plan = []
    for client in range(clients):
        mine = []
        for j in range(per_client):
            k = client * per_client + j
            prompt, budget = mix[k % len(mix)]
            mine.append(dict(scene=k % scenes, prompt=prompt, max_new_tokens=budget))
        plan.append(mine)
    return plan


def percentile(values, q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict], wall_s: float) -> dict:
    """Aggregate figures of one load: records hold each request's start, first token, end (seconds, one clock),
    token times, token count and answer."""
    ttft = [r["first_s"] - r["start_s"] for r in records if r.get("first_s") is not None]
    latency = [r["end_s"] - r["start_s"] for r in records]
    gaps = [max(np.diff(r["token_s"])) for r in records if len(r.get("token_s", [])) > 1]
    tokens = sum(r["tokens"] for r in records)
    failed = [r for r in records if r.get("error")]
    return dict(requests=len(records), failed=len(failed), wall_s=wall_s, requests_per_s=len(records) / wall_s,
                tokens=tokens, tokens_per_s=tokens / wall_s, ttft_p50_s=percentile(ttft, 50),
                ttft_p95_s=percentile(ttft, 95), latency_p50_s=percentile(latency, 50),
                latency_p95_s=percentile(latency, 95), largest_gap_s=max(gaps) if gaps else None,
                gap_p50_s=percentile(gaps, 50), errors=[r["error"] for r in failed][:3])


def drive(clients: list[list[dict]], send) -> tuple[list[dict], float]:
    """Runs every client in a thread of its own, each sending its requests in turn with `send(request) -> record`;
    returns the records and the wall time from the first request to the last answer."""
    records: list[dict] = []
    lock = threading.Lock()
    start_barrier = threading.Barrier(len(clients))

    def client(mine):
        start_barrier.wait()
        for request in mine:
            try:
                record = send(request)
            except Exception as e:  # noqa: BLE001 - a failed request is counted, the load goes on
                record = dict(request, start_s=time.perf_counter(), end_s=time.perf_counter(), tokens=0,
                              error=f"{type(e).__name__}: {e}")
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in clients]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records, time.perf_counter() - start


def reset_peak(pid: int | str = "self") -> None:
    """Resets the process's peak resident memory (VmHWM) to its current size (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb(pid: int | str = "self") -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def answers_equal(records: list[dict], reference: dict) -> tuple[int, int]:
    """How many answers equal the one-at-a-time answer of the same request, of those compared."""
    compared = [r for r in records if r.get("key") in reference and not r.get("error")]
    return sum(r["answer"] == reference[r["key"]] for r in compared), len(compared)


def request_key(request: dict) -> str:
    return f"{request['scene']}|{request['prompt']}|{request['max_new_tokens']}"


# ---- the library --------------------------------------------------------------------------------------------------


def library_worker(spec: dict) -> dict:
    """In a process of its own: load the pipeline once, then each number of clients in turn."""
    import paligemma
    from shapes import scenes as S

    start = time.perf_counter()
    if spec["onnx_dir"]:
        pipe = paligemma.load(spec["checkpoint"], backend="onnx", onnx_dir=spec["onnx_dir"],
                              max_batch=spec["max_batch"])
    else:
        pipe = paligemma.load(spec["checkpoint"], max_batch=spec["max_batch"])
    load_s = time.perf_counter() - start
    if spec.get("prefill_between_steps") and pipe.batcher is not None:
        # The alternative to prefilling beside the loop: a step waits for a prefill in progress, as in a loop that
        # prefilled arrivals between its steps (the running rows stop for the whole prefill).
        engine, decode = pipe.batcher.engine, pipe.batcher.engine.decode

        def waiting_decode(rows, tokens):
            with pipe.batcher.prefilling:
                return decode(rows, tokens)

        engine.decode = waiting_decode
    side = pipe.config.image_size
    scenes = [s.image.resize((side, side)) for s in S.render_scenes(spec["seed"], spec["scenes"])]
    stop = () if spec["to_the_end"] else None
    pipe.generate(scenes[0], "caption en", max_new_tokens=2)  # warm-up
    mix = [tuple(m) for m in spec["mix"]]

    def send(request):
        start_s = time.perf_counter()
        token_s, ids, text = [], [], ""
        for update in pipe.stream(scenes[request["scene"]], request["prompt"],
                                  max_new_tokens=request["max_new_tokens"], stop_ids=stop):
            if update.token_ids and len(update.token_ids) > len(ids):
                token_s.append(time.perf_counter())
                ids = update.token_ids
            text = update.text
        end_s = time.perf_counter()
        return dict(request, key=request_key(request), start_s=start_s, first_s=token_s[0] if token_s else None,
                    end_s=end_s, token_s=token_s, tokens=len(ids), answer=ids, text=text)

    loads = []
    for clients in spec["clients"]:
        reset_peak()
        records, wall = drive(requests_for(clients, spec["requests"], mix, len(scenes)), send)
        steps = pipe.batcher.steps if pipe.batcher else None
        loads.append(dict(clients=clients, records=records, summary=dict(summarize(records, wall),
                                                                          peak_rss_mb=peak_rss_mb(),
                                                                          decode_steps=steps)))
    return dict(load_s=load_s, max_batch=pipe.max_batch, batching=pipe.batcher is not None, loads=loads)


# ---- the app over HTTP --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """`python app.py` of the checkout `root` on a free port, started and waited for; stopped on exit."""

    def __init__(self, root: Path, args: list[str], log: Path):
        self.root, self.args, self.log = root, args, log

    def __enter__(self):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=str(self.root))
        self.output = open(self.log, "w")
        self.process = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *self.args],
                                        cwd=self.root, env=env, stdout=self.output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1800  # a first start exports the model
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}: see {self.log}")
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"app.py did not answer in time: see {self.log}")

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.output.close()


def http_send_factory(url: str, images: list[bytes]):
    """send(request) -> record for the app at `url`: upload, join the queue, read the event stream."""
    import httpx

    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):  # a connection and a session per client thread, as gradio_client keeps
            local.client = httpx.Client(base_url=url, timeout=600)
            local.session = uuid.uuid4().hex[:12]
        return local.client

    def send(request):
        http = client()
        start_s = time.perf_counter()
        files = {"files": (f"scene_{request['scene']}.png", images[request["scene"]], "image/png")}
        (path,) = http.post("gradio_api/upload", files=files).raise_for_status().json()
        uploaded_s = time.perf_counter()
        image = {"path": path, "meta": {"_type": "gradio.FileData"}}
        data = [image, request["prompt"], "greedy", 1.0, 0.9, 0, request["max_new_tokens"], 0, False]
        body = {"data": data, "session_hash": local.session}
        event = http.post("gradio_api/call/generate", json=body).raise_for_status().json()["event_id"]
        first_s, kind, last, updates = None, None, None, 0
        with http.stream("GET", f"gradio_api/call/generate/{event}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: ") and kind in ("generating", "complete"):
                    payload = json.loads(line[len("data: "):])
                    updates += 1
                    if first_s is None and payload and payload[0]:
                        first_s = time.perf_counter()
                    last = payload
                elif line.startswith("data: ") and kind == "error":
                    raise RuntimeError(f"the app answered an error: {line[len('data: '):][:200]}")
        end_s = time.perf_counter()
        answer = last[0] if last else None
        counted = re.search(r"(\d+) tokens? in", last[3]) if last and isinstance(last[3], str) else None
        tokens = int(counted.group(1)) if counted else 0  # the timings line counts the request's tokens
        return dict(request, key=request_key(request), start_s=start_s, upload_s=uploaded_s - start_s,
                    first_s=first_s, end_s=end_s, tokens=tokens, answer=answer, updates=updates)

    return send


def api_send_factory(url: str, images: list[bytes]):
    """send(request) -> record for the JSON endpoint of the app at `url`: one form posted, one JSON answer."""
    import httpx

    local = threading.local()

    def send(request):
        if not hasattr(local, "client"):  # a connection per client thread
            local.client = httpx.Client(base_url=url, timeout=600)
        start_s = time.perf_counter()
        files = {"image": (f"scene_{request['scene']}.png", images[request["scene"]], "image/png")}
        data = {"prompt": request["prompt"], "max_new_tokens": str(request["max_new_tokens"])}
        response = local.client.post("api/answer", files=files, data=data)
        end_s = time.perf_counter()
        if response.status_code != 200:
            raise RuntimeError(f"the endpoint answered {response.status_code}: {response.text[:200]}")
        answer = response.json()
        timings = answer["timings"]
        return dict(request, key=request_key(request), start_s=start_s,
                    first_s=end_s - (timings["total_s"] - timings["ttft_s"]), end_s=end_s,
                    tokens=len(answer["token_ids"]), answer=answer["text"])

    return send


def http_load(spec: dict, log) -> dict:
    """The app of spec['root'] with spec['app_args'], its page's API (spec['target'] 'app') or its JSON endpoint
    ('api') driven by each number of clients."""
    import io

    from shapes import scenes as S

    scenes = []
    for scene in S.render_scenes(spec["seed"], spec["scenes"]):
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        scenes.append(buffer.getvalue())
    mix = [tuple(m) for m in spec["mix"]]
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp, \
            AppServer(Path(spec["root"]), spec["app_args"], Path(tmp) / "app.log") as server:
        send = (api_send_factory if spec["target"] == "api" else http_send_factory)(server.url, scenes)
        send(dict(scene=0, prompt="caption en", max_new_tokens=2))  # warm-up (and the first upload)
        loads = []
        for clients in spec["clients"]:
            log(f"    {clients} client(s)")
            reset_peak(server.process.pid)
            records, wall = drive(requests_for(clients, spec["requests"], mix, len(scenes)), send)
            summary = dict(summarize(records, wall), peak_rss_mb=peak_rss_mb(server.process.pid),
                           upload_p50_s=percentile([r["upload_s"] for r in records if "upload_s" in r], 50),
                           updates_p50=percentile([r["updates"] for r in records if "updates" in r], 50))
            loads.append(dict(clients=clients, records=records, summary=summary))
    return dict(loads=loads)


def worker_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = library_worker(spec)
    result["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])


# ---- the command --------------------------------------------------------------------------------------------------


def run_library(spec: dict, tmp: Path, timeout: float) -> dict:
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "bench.load", str(spec_path), str(result_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError("\n".join((done.stderr or done.stdout).strip().splitlines()[-15:]))
    return json.loads(result_path.read_text())


def run(args, workload: str, folder: Path, runtime: str, onnx_dir: Path | None, log) -> dict:
    """Every configuration of one workload and runtime: the library batched and one at a time, the app batched and
    one at a time, and the app of --root (as it is) when given."""
    mix = [("caption en", args.new_tokens)] if args.mix == "caption" else DEMO_MIX
    base = dict(checkpoint=str(folder), onnx_dir=str(onnx_dir) if onnx_dir else None, clients=args.clients,
                requests=args.requests, mix=mix, scenes=args.scenes, seed=args.seed, to_the_end=args.mix == "caption")
    configurations = []
    if "library" in args.targets:
        served = [("batched", dict(max_batch=args.max_batch)), ("one at a time", dict(max_batch=1))]
        if args.prefill_between_steps:
            served.insert(1, ("batched, prefill between steps", dict(max_batch=args.max_batch,
                                                                     prefill_between_steps=True)))
        for name, options in served:
            log(f"  {workload}/{runtime}: library, {name}")
            with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
                result = run_library(dict(base, **options), Path(tmp), args.timeout)
            configurations.append(dict(target="library", name=name, **result))
    for target in [t for t in ("api", "app") if t in args.targets]:
        model = [] if workload == "demo" else ["--model", str(folder)] + (["--onnx-dir", str(onnx_dir)] if onnx_dir
                                                                          else [])
        quantize = {"onnx-int8": ["--quantize", "int8"], "onnx-int4": ["--quantize", "int4"]}.get(runtime, [])
        backend = ["--backend", "torch"] if runtime == "torch" else []
        served = [("batched", ROOT, [*model, *quantize, *backend] + (["--concurrency", str(args.max_batch)]
                                                                     if args.max_batch else [])),
                  ("one at a time", ROOT, [*model, *quantize, *backend, "--concurrency", "1"])]
        if args.root and target == "app":  # another checkout's app may have no JSON endpoint
            served.append((f"app of {args.root}", Path(args.root), [*model, *quantize, *backend]))
        for name, root, app_args in served:
            log(f"  {workload}/{runtime}: {target} over HTTP, {name}")
            result = http_load(dict(base, root=str(root), app_args=app_args, target=target), log)
            configurations.append(dict(target=target, name=name, app_args=app_args, **result))
    reference = {}  # per target, its one-at-a-time answers: the library's token ids, the app's and the api's text
    for target in ("library", "app", "api"):
        for configuration in configurations:
            if configuration["target"] == target and configuration["name"] == "one at a time":
                for load in configuration["loads"]:
                    for record in load["records"]:
                        if not record.get("error"):
                            reference.setdefault((target, record["key"]), record["answer"])
    for configuration in configurations:
        for load in configuration["loads"]:
            ref = {key: answer for (target, key), answer in reference.items() if target == configuration["target"]}
            equal, compared = answers_equal(load["records"], ref)
            load["summary"].update(equal_answers=equal, compared_answers=compared)
            if not args.keep_records:
                load.pop("records")
    return dict(workload=workload, runtime=runtime, mix=args.mix, configurations=configurations)


def fmt(value, scale=1.0, digits=2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(result: dict) -> str:
    mix = "captions to the end" if result["mix"] == "caption" else "caption, detect, segment, count"
    lines = [f"### {result['workload']} / {result['runtime']} ({mix})", "",
             "| target | serving | clients | requests/s | tokens/s | TTFT p50 / p95 ms | latency p50 / p95 ms "
             "| largest gap ms | peak RSS MB | answers as one at a time |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for configuration in result["configurations"]:
        for load in configuration["loads"]:
            s = load["summary"]
            failed = f" ({s['failed']} failed)" if s["failed"] else ""
            lines.append(
                f"| {configuration['target']} | {configuration['name']} | {load['clients']} | "
                f"{fmt(s['requests_per_s'])}{failed} | {fmt(s['tokens_per_s'], digits=0)} | "
                f"{fmt(s['ttft_p50_s'], 1000, 0)} / {fmt(s['ttft_p95_s'], 1000, 0)} | "
                f"{fmt(s['latency_p50_s'], 1000, 0)} / {fmt(s['latency_p95_s'], 1000, 0)} | "
                f"{fmt(s['largest_gap_s'], 1000, 0)} | {fmt(s['peak_rss_mb'], digits=0)} | "
                f"{s['equal_answers']}/{s['compared_answers']} |")
    return "\n".join(lines)


def main(args, log, ensure_export, machine) -> int:
    """The load mode of `python -m bench`, which passes its export cache (ensure_export) and machine description."""
    from .workloads import WORKLOADS

    results = []
    start = time.time()
    for workload in args.workloads:
        folder = WORKLOADS[workload].prepare(args.cache_dir, log=log)
        for runtime in args.runtimes:
            onnx_dir = ensure_export(folder, runtime, args, log) if runtime.startswith("onnx") else None
            results.append(run(args, workload, folder, runtime, onnx_dir, log))
    load_average = os.getloadavg()
    result = dict(mode="load", machine=machine(False), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                  command="python -m bench " + " ".join(sys.argv[1:]), load_average_after=load_average,
                  results=results)
    args.out.mkdir(parents=True, exist_ok=True)
    tables = "\n\n".join(table(r) for r in results)
    markdown = (f"Machine: {result['machine']['summary']}; {result['date']}; load average after "
                f"{', '.join(f'{v:.1f}' for v in load_average)}; `{result['command']}`\n\n{tables}\n")
    (args.out / "load.json").write_text(json.dumps(result, indent=1))
    (args.out / "load.md").write_text(markdown)
    print(markdown)
    log(f"wrote {args.out / 'load'}.json and .md in {time.time() - start:.0f}s")
    return 0
