"""Where the time to first token and the decode step go on a GPU, for the compiled and the eager torch paths.

    python -m bench.cuda_breakdown CHECKPOINT
    # e.g. ~/.cache/paligemma-bench/full3b-v2-bfloat16 after `python -m bench --cuda`

In one process, after two warm-up requests: preprocessing and prefill alone (medians of 7, synchronized), time to
first token through `generate`, decode with no host reads at all (the GPU-bound rate), and `generate` with and
without read-ahead. docs/benchmarks.md "Where the time goes" was measured with these steps.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import paligemma

from .workloads import PROMPT, request_image


def median_ms(run, repeats: int = 7) -> str:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return f"median {statistics.median(times):.1f} ms (min {min(times):.1f})"


def decode_only(pipe, inputs, steps: int = 63) -> float:
    """Tokens per second of `steps` decode steps queued back to back, greedy on the GPU, never read by the host."""
    engine = pipe.engine_factory()
    tokens = engine.prefill(inputs, steps + 1).argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        tokens = engine.decode_step(tokens).argmax(-1)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def breakdown(folder: str, image, name: str, engine: str) -> None:
    """Print one engine's measurements; its model is freed when this returns."""
    pipe = paligemma.load(folder, device="cuda", dtype=torch.bfloat16, engine=engine)

    def request():
        return pipe.generate(image, PROMPT, max_new_tokens=64, stop_ids=())  # 64 tokens every time

    for _ in range(2):
        request()
    inputs = pipe.processor([image], [PROMPT])
    print(name, "preprocessing", median_ms(lambda: pipe.processor([image], [PROMPT])))
    print(name, "prefill", median_ms(lambda: pipe.engine_factory().prefill(inputs, 64)))
    print(name, "time to first token in generate, ms", [round(request().ttft_s * 1000, 1) for _ in range(5)])
    print(name, "decode without host reads, tok/s", [round(decode_only(pipe, inputs)) for _ in range(3)])
    for ahead in (False, True):
        pipe.read_ahead = ahead
        rates = [round(request().decode_tokens_per_s) for _ in range(3)]
        print(name, f"generate, read_ahead={ahead}, tok/s", rates)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not torch.cuda.is_available():
        print("usage: python -m bench.cuda_breakdown CHECKPOINT (needs an NVIDIA GPU)", file=sys.stderr)
        return 2
    folder, image = argv[0], request_image()
    for name, engine in [("compiled", "static"), ("eager", "eager")]:
        breakdown(folder, image, name, engine)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
