"""One runtime on one checkpoint, in a process of its own so that its peak memory is its own.

    python -m bench.worker SPEC.json RESULT.json

SPEC names the runtime, the checkpoint (and export) folders, the request, the mode and the run counts. In speed
mode (the default) every runtime generates exactly `new_tokens` greedy tokens (end-of-sequence does not stop it),
and RESULT gets, for each timed run, the time to first token and the decode rate, plus the greedy tokens, the prompt
ids, the peak resident memory, what ran the model and, for ONNX Runtime, the kernels it ran per decoded token. In
requests mode every runtime answers `scenes` drawn scenes as the app asks (one whole `generate` call each:
preprocessing, prefill, decoding until end-of-sequence or `new_tokens`, detokenizing), and RESULT gets each
request's seconds and each scene's answer.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .reference import transformers_processor
from .timing import timed
from .workloads import request_image

CPU_RUNTIMES = ("transformers", "torch", "onnx", "onnx-int8", "onnx-int4")
CUDA_RUNTIMES = ("transformers", "transformers-static", "torch", "torch-compiled", "onnx")
KERNEL_TOKENS = 16  # decoded tokens of the profiled request that counts ONNX Runtime's kernels


@dataclass(frozen=True)
class Runner:
    info: str  # what ran the model
    run: Callable[[], dict]  # one timed request of exactly new_tokens greedy tokens (speed mode)
    request: Callable[[object], list[int]]  # one request on an image as the app makes it: the answer's token ids
    pipe: object = None  # the project's paligemma.Pipeline (None for transformers)


def eos_token_ids(checkpoint) -> list[int]:
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    eos = config.get("text_config", {}).get("eos_token_id", config.get("eos_token_id", 1))
    return eos if isinstance(eos, list) else [eos]


def until_stop(ids: list[int], stop_ids) -> list[int]:
    """The answer: the ids before the first end-of-sequence token."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[:index]
    return ids


class TimingStreamer:
    """A transformers streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value):
        value.tolist()  # waits for the device, so the time is the token's
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def transformers_runner(spec: dict):
    import transformers
    from transformers import PaliGemmaForConditionalGeneration

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device, dtype = spec["device"], getattr(torch, spec["dtype"])
    folder = Path(spec["checkpoint"])
    model = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=dtype).to(device).eval()
    vision = model.config.vision_config
    processor = transformers_processor(folder, vision.image_size, (vision.image_size // vision.patch_size) ** 2)
    options = dict(max_new_tokens=spec["new_tokens"], do_sample=False, eos_token_id=None)
    if spec["runtime"] == "transformers-static":
        options["cache_implementation"] = "static"  # transformers compiles the decode step for a static cache
    image, prompt = request_image(), spec["prompt"]
    info = (f"transformers {transformers.__version__} "
            f"({'static cache, compiled' if 'static' in spec['runtime'] else 'eager'})")
    stop_ids = eos_token_ids(folder)

    def run():
        streamer = TimingStreamer()
        start = time.perf_counter()
        inputs = processor(images=[image], text=[prompt], return_tensors="pt").to(device, dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, streamer=streamer, **options)
        prompt_length = inputs["input_ids"].shape[1]
        times = [t - start for t in streamer.times]
        return dict(tokens=out[0, prompt_length:].tolist(), prompt_ids=inputs["input_ids"][0].tolist(),
                    ttft_s=times[0], decode_tokens_per_s=(len(times) - 1) / (times[-1] - times[0]))

    def request(scene):
        inputs = processor(images=[scene], text=[prompt], return_tensors="pt").to(device, dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=spec["new_tokens"], do_sample=False, eos_token_id=stop_ids)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        processor.decode(ids, skip_special_tokens=True)  # the app shows text
        return until_stop(ids, stop_ids)

    return Runner(info, run, request)


def pipeline_runner(pipe, spec: dict, info: str):
    """The project's runtimes all sit behind paligemma.Pipeline, which times each request itself."""
    image, prompt = request_image(), spec["prompt"]
    prompt_ids = pipe.processor([image], [prompt])["input_ids"][0].tolist()

    def run():
        # stop_ids=(): exactly new_tokens tokens, as transformers is told to generate
        result = pipe.generate(image, prompt, max_new_tokens=spec["new_tokens"], stop_ids=())
        return dict(tokens=result.token_ids, prompt_ids=prompt_ids, ttft_s=result.ttft_s,
                    decode_tokens_per_s=result.decode_tokens_per_s)

    def request(scene):  # the model's own stop ids; the answer's text is decoded inside
        return pipe.generate(scene, prompt, max_new_tokens=spec["new_tokens"]).token_ids

    return Runner(info, run, request, pipe)


def torch_runner(spec: dict):
    import paligemma

    pipe = paligemma.load(spec["checkpoint"], device=spec["device"], dtype=getattr(torch, spec["dtype"]),
                          engine="eager")
    return pipeline_runner(pipe, spec, f"paligemma eager torch {torch.__version__}")


def compiled_runner(spec: dict):
    import paligemma

    # The library's static engine: on CUDA it compiles and records its decode step while loading (in load_s).
    pipe = paligemma.load(spec["checkpoint"], device=spec["device"], dtype=getattr(torch, spec["dtype"]),
                          engine="static")
    return pipeline_runner(pipe, spec, f"paligemma static cache + torch.compile (CUDA graphs) {torch.__version__}")


def onnx_runner(spec: dict):
    import onnxruntime

    from export.runtime import load_onnx_pipeline
    from export.variants import exported_variant

    pipe = load_onnx_pipeline(spec["checkpoint"], onnx_dir=spec["onnx_dir"], device=spec["device"],
                              threads=spec.get("threads"))
    model = pipe.engine_factory
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in model.providers)
    precision = exported_variant(model.manifest)
    info = f"onnxruntime {onnxruntime.__version__} {precision} ({providers})"
    return pipeline_runner(pipe, spec, info)


RUNNERS = {
    "transformers": transformers_runner,
    "transformers-static": transformers_runner,
    "torch": torch_runner,
    "torch-compiled": compiled_runner,
    "onnx": onnx_runner,
    "onnx-int8": onnx_runner,
    "onnx-int4": onnx_runner,
}


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started its program (VmHWM). Not ru_maxrss: Linux carries that
    across exec from the forked copy of the parent, so a worker started by a benchmark that had built the full 3B's
    5 GB shards reported 5081 MB whatever it ran."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux; macOS: bytes


def measure(spec: dict) -> dict:
    """One runtime's figures, in the spec's mode (see the module's docstring)."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    load_before = os.getloadavg()[0]
    cuda = spec["device"].startswith("cuda")
    if cuda:  # float32 means float32 (the token check relies on it); bfloat16 is unaffected
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    runner, load_s = timed(lambda: RUNNERS[spec["runtime"]](spec))
    figures = requests(runner, spec) if spec.get("mode") == "requests" else speed(runner, spec)
    peak_rss = peak_rss_mb()  # before the profiled request, whose extra sessions are the benchmark's, not the runtime's
    if spec.get("mode") != "requests" and spec["runtime"].startswith("onnx") and not cuda:
        figures["kernels"] = onnx_kernels(runner.pipe, spec)
    return dict(
        runtime=spec["runtime"], info=runner.info, load_s=load_s, eos_token_ids=eos_token_ids(spec["checkpoint"]),
        **figures, peak_rss_mb=peak_rss, peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        threads=torch.get_num_threads(), python=platform.python_version(), compile=compile_counters(),
        load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )


def speed(runner: Runner, spec: dict) -> dict:
    warmups = [runner.run() for _ in range(spec["warmup"])]
    runs = [runner.run() for _ in range(spec["runs"])]
    tokens = [r["tokens"] for r in warmups + runs]
    return dict(ttft_s=[r["ttft_s"] for r in runs], decode_tokens_per_s=[r["decode_tokens_per_s"] for r in runs],
                tokens=runs[0]["tokens"], repeatable=all(t == tokens[0] for t in tokens),
                prompt_ids=runs[0]["prompt_ids"])


def onnx_kernels(pipe, spec: dict) -> dict:
    """Kernels ONNX Runtime runs per decoded token (the median over a profiled request's steps) and in prefill,
    with the graphs this runtime serves (fused where they apply), counted by its profiler (bench/kernels.py)."""
    import tempfile

    from .kernels import kernel_summary, request_kernels

    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        runs = request_kernels(pipe, pipe.engine_factory.fused is not None, request_image(), spec["prompt"],
                               min(spec["new_tokens"], KERNEL_TOKENS), Path(folder))
    return kernel_summary(runs)


def requests(runner: Runner, spec: dict) -> dict:
    """Whole requests on drawn scenes (shapes/scenes.py), `runs` times over all of them after `warmup` requests."""
    from shapes.scenes import render_scenes

    scenes = [scene.image for scene in render_scenes(0, spec["scenes"])]
    for _ in range(spec["warmup"]):
        runner.request(scenes[0])
    seconds, answers = [], []
    for _ in range(spec["runs"]):
        timings = [timed(lambda: runner.request(scene)) for scene in scenes]
        seconds += [s for _, s in timings]
        answers.append([ids for ids, _ in timings])
    return dict(request_s=seconds, answers=answers[0], repeatable=all(a == answers[0] for a in answers))


def compile_counters() -> dict:
    """What torch.compile did in this process (empty when nothing was compiled): graph breaks, recompilations and
    skipped CUDA graphs each cost decode speed, so the result says how many there were."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]} if counters["stats"]["unique_graphs"] else {}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(measure(spec), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
