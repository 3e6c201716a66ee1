"""One runtime on one checkpoint, in a process of its own so that its peak memory is its own.

    python -m bench.worker SPEC.json RESULT.json

SPEC names the runtime, the checkpoint (and export) folders, the request and the run counts; RESULT gets, for each
timed run, the time to first token and the decode rate, plus the greedy tokens, the prompt ids, the peak resident
memory and what ran the model. Every runtime generates exactly `new_tokens` tokens: end-of-sequence does not stop it.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from .reference import transformers_processor
from .workloads import request_image

CPU_RUNTIMES = ("transformers", "torch", "onnx", "onnx-int8", "onnx-int4")
CUDA_RUNTIMES = ("transformers", "transformers-static", "torch", "torch-compiled", "onnx")


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
    info = f"transformers {transformers.__version__} ({'static cache, compiled' if 'static' in spec['runtime'] else 'eager'})"

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

    return run, info


def pipeline_runner(pipe, spec: dict, info: str):
    """The project's runtimes all sit behind paligemma.Pipeline, which times each request itself."""
    image, prompt = request_image(), spec["prompt"]
    prompt_ids = pipe.processor([image], [prompt])["input_ids"][0].tolist()

    def run():
        # stop_ids=(): exactly new_tokens tokens, as transformers is told to generate
        result = pipe.generate(image, prompt, max_new_tokens=spec["new_tokens"], stop_ids=())
        return dict(tokens=result.token_ids, prompt_ids=prompt_ids, ttft_s=result.ttft_s,
                    decode_tokens_per_s=result.decode_tokens_per_s)

    return run, info


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def measure(spec: dict) -> dict:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cuda = spec["device"].startswith("cuda")
    if cuda:  # float32 means float32 (the token check relies on it); bfloat16 is unaffected
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    run, info = RUNNERS[spec["runtime"]](spec)
    load_s = time.perf_counter() - start
    warmups = [run() for _ in range(spec["warmup"])]
    runs = [run() for _ in range(spec["runs"])]
    tokens = [r["tokens"] for r in warmups + runs]
    config = json.loads((Path(spec["checkpoint"]) / "config.json").read_text())
    eos = config.get("text_config", {}).get("eos_token_id", config.get("eos_token_id", 1))
    return dict(
        runtime=spec["runtime"], info=info, load_s=load_s, eos_token_ids=eos if isinstance(eos, list) else [eos],
        ttft_s=[r["ttft_s"] for r in runs], decode_tokens_per_s=[r["decode_tokens_per_s"] for r in runs],
        tokens=runs[0]["tokens"], repeatable=all(t == tokens[0] for t in tokens),
        prompt_ids=runs[0]["prompt_ids"], peak_rss_mb=peak_rss_mb(),
        peak_gpu_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        threads=torch.get_num_threads(), python=platform.python_version(), compile=compile_counters(),
    )


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
