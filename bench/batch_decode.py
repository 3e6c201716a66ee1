"""One decode step of a continuous batch on ONNX Runtime's fused decode graph, by number of rows, with and without
the decode session's weights pre-packed (OnnxModel's batch_prepack; the prefill as the model's size decides): the
step's time, its tokens/s, the resident memory, and whether each row's logits are bit-identical to the same row
decoded alone.

    python -m bench.batch_decode --onnx-dir EXPORT --rows 1,2,4,8 [--prepack on|off|both]
    python -m bench.batch_decode --kernels       # which row counts give a row the same bits, per product kernel

Each pre-packing setting runs in a process of its own (its resident memory is its own). Rows are prefilled from
"caption en" on drawn scenes (one request each, as the library does), then stepped together: `--steps` timed
steps per number of rows, the median reported. Exactness: at each number of rows' first step, each row's logits
from the step of all rows against a step of that row alone, from the same cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(onnx_dir: str, prepack: bool, rows: list[int], steps: int) -> dict:
    import torch

    from export.runtime.pipeline import OnnxBatchEngine, OnnxModel
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from shapes import scenes as S

    before = rss_mb()
    config = PaliGemmaConfig.from_json_file(Path(onnx_dir) / "config.json")
    model = OnnxModel(onnx_dir, config, batch_prepack=prepack)
    loaded = rss_mb()
    processor = PaliGemmaProcessor.from_pretrained(onnx_dir, config)
    side = config.image_size
    prefill = OnnxBatchEngine(model, 1)
    prefilled, first = [], []
    for scene in S.render_scenes(0, max(rows)):
        row, logits = prefill.prefill(processor([scene.image.resize((side, side))], ["caption en"]), steps + 2)
        prefilled.append(row)
        first.append(int(logits.argmax()))
    result = dict(prepack=prepack, fused_prepack=model.fused_prepack, rss_before_mb=before, rss_loaded_mb=loaded,
                  threads=model.thread_plan.intra_op_threads, steps={})

    def batch(indices):
        engine = OnnxBatchEngine(model, len(indices))
        return engine, [engine.join(prefilled[i]) for i in indices]

    for n in rows:
        engine, ids = batch(range(n))
        tokens = torch.tensor(first[:n])
        # Exactness, at the first step: each row alone against all n together, from the same caches.
        together = engine.decode(ids, tokens)
        identical = 0
        for i in range(n):
            alone_engine, alone_ids = batch([i])
            identical += bool(torch.equal(alone_engine.decode(alone_ids, tokens[i : i + 1])[0], together[i]))
        tokens = together.argmax(-1)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            tokens = engine.decode(ids, tokens).argmax(-1)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        result["steps"][n] = dict(step_ms=median * 1000, tokens_per_s=n / median, bit_identical=f"{identical}/{n}")
    result["rss_end_mb"] = rss_mb()
    return result


def kernel_classes(width: int = 2048, out: int = 4096, most: int = 20) -> dict[str, list[list[int]]]:
    """For a product by a weight (x [M, width] times [width, out]), the numbers of rows M whose first row gets
    bit-identical results, grouped: row 0 of a batch of M rows, and the same row placed last. torch's F.linear (MKL),
    ONNX Runtime's MatMul (MLAS), its weight pre-packed or not, and MatMulNBits (pre-packed, accuracy level 4, as the
    exports' int8 and int4 products) at blocks of 32 and 128."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import block_rows

    torch.manual_seed(0)
    weight, x = torch.randn(out, width) * 0.02, torch.randn(most + 1, width)

    def session(node, initializers, packed=True):
        graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       ["rows", width])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", out])],
                                  [numpy_helper.from_array(value, name) for name, value in initializers.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(
            "com.microsoft", 1)])
        model.ir_version = 10
        options = ort.SessionOptions()
        options.add_session_config_entry("session.disable_prepacking", "0" if packed else "1")
        run = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda a: run.run(None, {"x": a.numpy()})[0]

    products = {"torch F.linear": lambda a: torch.nn.functional.linear(a, weight).numpy()}
    for packed in (False, True):
        products[f"ONNX Runtime MatMul, {'pre-packed' if packed else 'not pre-packed'}"] = session(
            helper.make_node("MatMul", ["x", "w"], ["y"]), {"w": weight.T.contiguous().numpy()}, packed)
    for bits in (8, 4):
        for block in (16, 32, 64, 128, 256):
            blocks, scales = block_rows(weight.numpy(), bits, block)
            node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", K=width,
                                    N=out, bits=bits, block_size=block, accuracy_level=4)
            products[f"ONNX Runtime MatMulNBits, int{bits}, block {block}"] = session(
                node, {"b": blocks, "scales": scales})
    classes = {}
    for name, product in products.items():
        groups: dict[bytes, list[int]] = {}
        for rows in range(1, most + 1):
            last = torch.cat([x[1:rows], x[:1]])
            for result in (product(x[:rows])[0], product(last)[-1]):
                groups.setdefault(result.tobytes(), []).append(rows)
        classes[name] = [sorted(set(group)) for group in groups.values()]
    return classes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir")
    parser.add_argument("--kernels", action="store_true", help="only the product kernels' row classes")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prepack", choices=("on", "off", "both"), default="both")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting in this process
    args = parser.parse_args(argv)
    if args.kernels:
        for name, groups in kernel_classes().items():
            print(f"{name}: {len(groups)} class(es) of row counts giving row 0 the same bits: {groups}")
        return 0
    if not args.onnx_dir:
        parser.error("--onnx-dir is needed (or --kernels)")
    rows = [int(n) for n in args.rows.split(",")]
    if args.one is not None:
        print(json.dumps(measure(args.onnx_dir, args.one == "on", rows, args.steps)))
        return 0
    settings = ["off", "on"] if args.prepack == "both" else [args.prepack]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for setting in settings:
        done = subprocess.run([sys.executable, "-m", "bench.batch_decode", "--onnx-dir", args.onnx_dir, "--rows",
                               args.rows, "--steps", str(args.steps), "--one", setting], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        result = json.loads(done.stdout.strip().splitlines()[-1])
        steps = "; ".join(f"{n} rows {s['step_ms']:.0f} ms, {s['tokens_per_s']:.1f} tok/s, rows bit-identical to "
                          f"alone {s['bit_identical']}" for n, s in result["steps"].items())
        print(f"prepack {setting}: RSS {result['rss_before_mb']:.0f} -> loaded {result['rss_loaded_mb']:.0f} -> "
              f"end {result['rss_end_mb']:.0f} MB; {steps}; load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
