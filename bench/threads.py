"""ONNX Runtime's thread settings side by side on one model: for each number of intra-op threads, with and without
spinning, one request's decode rate and time to first token, and requests per second with two at once.

    python -m bench.threads                                # the embedded model, a detection answer
    python -m bench.threads --model CHECKPOINT --onnx-dir EXPORT --new-tokens 8 --runs 2
"""

from __future__ import annotations

import argparse
import threading

import paligemma
from export.runtime import load_onnx_pipeline
from paligemma.cli import ArgumentParser

from .timing import Spread, timed
from .workloads import request_image

SETTINGS = [(1, False), (2, False), (2, True)]  # (intra-op threads, spinning)


def one_request(pipe, image, prompt: str, new_tokens: int, runs: int) -> tuple[float, float]:
    results = [pipe.generate(image, prompt, max_new_tokens=new_tokens, stop_ids=()) for _ in range(runs)]
    return Spread.of(r.decode_tokens_per_s for r in results).median, Spread.of(r.ttft_s * 1000 for r in results).median


def two_at_once(pipe, image, prompt: str, new_tokens: int, runs: int) -> float:
    def work():
        for _ in range(runs):
            pipe.generate(image, prompt, max_new_tokens=new_tokens, stop_ids=())

    def both():
        workers = [threading.Thread(target=work) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()

    _, seconds = timed(both)
    return 2 * runs / seconds


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m bench.threads", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    parser.add_argument("--onnx-dir", default=None, help="its export (default: the export cache)")
    parser.add_argument("--prompt", default="detect circle ; triangle")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args(argv)
    folder = args.model or paligemma.DEMO_CHECKPOINT
    for threads, spinning in SETTINGS:
        pipe = load_onnx_pipeline(folder, onnx_dir=args.onnx_dir, threads=threads, spinning=spinning)
        image = request_image(pipe.config.image_size)
        pipe.generate(image, args.prompt, max_new_tokens=2)  # warm-up
        rate, ttft = one_request(pipe, image, args.prompt, args.new_tokens, args.runs)
        print(f"threads={threads} spinning={'on' if spinning else 'off'}: one request "
              f"{rate:.0f} tok/s, TTFT {ttft:.0f} ms; two at once "
              f"{two_at_once(pipe, image, args.prompt, args.new_tokens, args.runs):.2f} requests/s", flush=True)
        del pipe
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
