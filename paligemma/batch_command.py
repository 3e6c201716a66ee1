"""`python -m paligemma batch`: the command line of paligemma/batch.py (and of paligemma/ray_batch.py with --ray)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Iterable

from .batch_io import (
    CPU_ROWS,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPT,
    DEFAULT_READERS,
    AnswerFile,
    Summary,
    answer_line,
    pending_items,
    read_items,
)

logger = logging.getLogger(__name__)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of at least 0")
    return value


def add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, metavar="SOURCE",
                        help="a folder of images (recursively, by extension), a glob (quoted: 'photos/**/*.jpg') or a "
                             'JSONL of {"id", "image", "prompt"} records (a record\'s prompt overrides --prompt)')
    parser.add_argument("--out", required=True, help="the answers, one JSON line per input; a rerun with the same "
                                                     "file skips the ids it holds")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder, Hub repo id or export folder (default: the embedded demo model)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"task prompt (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                        help=f"budget of each answer, greedy (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "torch"],
                        help="ONNX Runtime (the default, as the app's; exported on first use) or PyTorch")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"], help="the quantized export (onnx)")
    parser.add_argument("--onnx-dir", default=None, help="exported graphs (onnx); default: the export cache")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-batch", type=positive_int, default=None,
                        help=f"rows of the continuous batch (default: {CPU_ROWS} on a CPU where memory allows, 64 "
                             "on a GPU)")
    parser.add_argument("--readers", type=positive_int, default=DEFAULT_READERS,
                        help=f"threads reading and preprocessing images ahead of the model (default: "
                             f"{DEFAULT_READERS})")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="the model's threads: ONNX Runtime's per session (default: its plan for the model), or "
                             "torch's (default: torch's)")
    ray = parser.add_argument_group("Ray (paligemma/ray_batch.py; pip install -r requirements-ray.txt)")
    ray.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run on a Ray cluster: auto (the cluster this node has joined with `ray start`) or its "
                          "head's HOST:6379; none: a new local cluster of this machine's cores, for this run")
    ray.add_argument("--workers", type=positive_int, default=None,
                     help="actors, each holding one pipeline (default: as many as the cluster's CPUs, or GPUs, hold)")
    ray.add_argument("--cpus-per-worker", type=non_negative_float, default=None,
                     help="CPUs each actor reserves (default: 1); its model threads follow it")
    ray.add_argument("--gpus-per-worker", type=non_negative_float, default=None,
                     help="GPUs each actor reserves (default: 1 with --device cuda, else 0)")
    ray.add_argument("--batch-size", type=positive_int, default=None,
                     help="inputs handed to an actor at a time (default: 4 x its batch rows)")


def run_batch(args: argparse.Namespace) -> int:
    ray_flags = [name for name in ("workers", "cpus_per_worker", "gpus_per_worker", "batch_size")
                 if getattr(args, name) is not None]
    if args.ray is None and ray_flags:
        raise ValueError(f"--{ray_flags[0].replace('_', '-')} sets up Ray's actors; add --ray (a local cluster) or "
                         "--ray ADDRESS")
    if args.device == "cuda" and args.ray is None:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu")
    items = read_items(args.input, args.prompt)  # every input checked before the model loads
    with AnswerFile(args.out) as answers:
        pending = pending_items(items, answers)
        summary = Summary(skipped=len(items) - len(pending))
        if not pending:
            print(f"all {len(items)} inputs already have answers in {args.out}", file=sys.stderr)
            return 0
        load = dict(path_or_repo_id=args.model, backend=args.backend, quantize=args.quantize,
                    onnx_dir=args.onnx_dir, device=args.device, max_batch=args.max_batch)
        if args.ray is not None:
            from .ray_batch import RaySettings, answer_on_ray

            settings = RaySettings(address=args.ray or None, workers=args.workers,
                                   cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                   batch_size=args.batch_size)
            lines = answer_on_ray(pending, load, settings, readers=args.readers,
                                  max_new_tokens=args.max_new_tokens, threads=args.threads)
        else:
            from .batch import Answerer, load_pipeline  # the model's side: torch (the Ray driver goes without)

            pipe = load_pipeline(load, args.threads)
            answerer = Answerer(pipe, readers=args.readers, max_new_tokens=args.max_new_tokens)
            lines = (answer_line(record) for record in answerer.answer(pending))
        write_answers(lines, answers, len(pending), summary)
    print(summary.describe(), file=sys.stderr)
    for error, count in sorted(summary.errors.items(), key=lambda e: -e[1])[:5]:
        print(f"  {count} x {error}", file=sys.stderr)
    return 0


def write_answers(lines: Iterable[str], answers: AnswerFile, total: int, summary: Summary) -> None:
    """Writes each line as it comes, with a progress bar (images/s and the time left); fills `summary`."""
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=total, unit="img", desc="answering", dynamic_ncols=True, smoothing=0.05) as bar:
        try:
            for line in lines:
                answers.write(line)
                if summary.first_s is None:
                    summary.first_s = time.perf_counter() - start
                record = json.loads(line)
                summary.add(record)
                bar.update(1)
                if record["error"] is not None:
                    bar.set_postfix(failed=summary.failed, refresh=False)
        finally:
            summary.seconds = time.perf_counter() - start
