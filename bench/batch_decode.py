"""One decode step of a continuous batch on ONNX Runtime's fused decode graph, by number of rows, with and without
the decode session's weights pre-packed (OnnxModel's batch_prepack; the prefill as the model's size decides): the
step's time, its tokens/s, the resident memory, and whether each row's logits are bit-identical to the same row
decoded alone.

    python -m bench.batch_decode --onnx-dir EXPORT --rows 1,2,4,8 [--prepack on|off|both]
    python -m bench.batch_decode --kernels       # which row counts give a row the same bits, per product kernel
    python -m bench.batch_decode --kernels --kernel-times 2048x16384 --rows 1,2,3,4,8   # and each one's time
    python -m bench.batch_decode --onnx-dir EXPORT --prefill-group 7 --steps 5   # 7 prefills one by one / as a group

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


def products(weight, blocks=(16, 32, 64, 128, 256), levels=(4,)) -> dict:
    """Callables x [M, width] -> x @ weight.T ([M, out]) by each product kernel: torch's F.linear (MKL), ONNX
    Runtime's MatMul (MLAS), its weight pre-packed or not, and MatMulNBits (pre-packed; int8 and int4 at each of
    `blocks`, each accuracy level of `levels`: 4 as the exports, int8 activations; 1 float32 ones). ONNX Runtime
    sessions on two threads, not spinning, as the serving sessions."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import block_rows

    out, width = weight.shape

    def session(node, initializers, packed=True):
        graph = helper.make_graph([node], "product", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                       ["rows", width])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", out])],
                                  [numpy_helper.from_array(value, name) for name, value in initializers.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(
            "com.microsoft", 1)])
        model.ir_version = 10
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.disable_prepacking", "0" if packed else "1")
        run = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return lambda a: run.run(None, {"x": np.ascontiguousarray(a.numpy())})[0]

    found = {"torch F.linear": lambda a: torch.nn.functional.linear(a, weight).numpy()}
    for packed in (False, True):
        found[f"ONNX Runtime MatMul, {'pre-packed' if packed else 'not pre-packed'}"] = session(
            helper.make_node("MatMul", ["x", "w"], ["y"]), {"w": weight.T.contiguous().numpy()}, packed)
    for bits in (8, 4):
        for block in blocks:
            blocked, scales = block_rows(weight.numpy(), bits, block)
            for level in levels:
                node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", K=width,
                                        N=out, bits=bits, block_size=block, accuracy_level=level)
                name = f"ONNX Runtime MatMulNBits, int{bits}, block {block}" + (f", accuracy level {level}"
                                                                               if len(levels) > 1 else "")
                found[name] = session(node, {"b": blocked, "scales": scales})
    return found


def prefill_times(onnx_dir: str, rows: int, repeats: int) -> dict:
    """`rows` prefills of "caption en" on drawn scenes, one after another and as one group through the fused prefill
    (the forward OnnxBatchEngine.prefill_many runs where its rows keep their solo bits; run here on any export, to
    time it), interleaved `repeats` times: the medians, and whether each row's first logits are bit-identical."""
    import torch

    from export.runtime.pipeline import OnnxBatchEngine, OnnxModel
    from paligemma.config import PaliGemmaConfig
    from paligemma.processor import PaliGemmaProcessor
    from shapes import scenes as S

    config = PaliGemmaConfig.from_json_file(Path(onnx_dir) / "config.json")
    model = OnnxModel(onnx_dir, config, batch_prepack=True)
    processor = PaliGemmaProcessor.from_pretrained(onnx_dir, config)
    engine, side = OnnxBatchEngine(model, rows), config.image_size
    inputs = [processor([scene.image.resize((side, side))], ["caption en"]) for scene in S.render_scenes(0, rows)]
    stacked = {key: torch.cat([row[key] for row in inputs]) for key in inputs[0]}
    alone = [engine.prefill(row, 64)[1] for row in inputs]  # warm, and each row's own logits
    together = [logits for _, logits in engine._prefill_rows(stacked, [64] * rows)]
    one_by_one, grouped = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        for row in inputs:
            engine.prefill(row, 64)
        one_by_one.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine._prefill_rows(stacked, [64] * rows)
        grouped.append(time.perf_counter() - start)
    identical = sum(bool(torch.equal(a, b)) for a, b in zip(alone, together))
    return dict(one_by_one_ms=float(np.median(one_by_one)) * 1000, group_ms=float(np.median(grouped)) * 1000,
                bit_identical=f"{identical}/{rows}", exact_groups=engine.exact_groups)


def kernel_classes(width: int = 2048, out: int = 4096, most: int = 20) -> dict[str, list[list[int]]]:
    """For a product by a weight (x [M, width] times [width, out]), the numbers of rows M whose first row gets
    bit-identical results, grouped: row 0 of a batch of M rows, and the same row placed last (`products`)."""
    import torch

    torch.manual_seed(0)
    weight, x = torch.randn(out, width) * 0.02, torch.randn(most + 1, width)
    classes = {}
    for name, product in products(weight).items():
        groups: dict[bytes, list[int]] = {}
        for rows in range(1, most + 1):
            last = torch.cat([x[1:rows], x[:1]])
            for result in (product(x[:rows])[0], product(last)[-1]):
                groups.setdefault(result.tobytes(), []).append(rows)
        classes[name] = [sorted(set(group)) for group in groups.values()]
    return classes


def kernel_times(width: int, out: int, rows: list[int], repeats: int = 15) -> dict[str, dict[int, float]]:
    """Milliseconds of one product by a [out, width] weight, by number of rows M (median of `repeats`, the row
    counts interleaved so that a busy moment of a shared machine spreads over all of them): MatMul pre-packed, and
    MatMulNBits int4 and int8 at blocks of 32 and 128, accuracy levels 4 and 1."""
    import torch

    torch.manual_seed(0)
    weight, x = torch.randn(out, width) * 0.02, torch.randn(max(rows), width)
    chosen = {name: product for name, product in products(weight, blocks=(32, 128), levels=(4, 1)).items()
              if name.startswith("ONNX Runtime MatMulNBits") or name.endswith(", pre-packed")}
    times = {}
    for name, product in chosen.items():
        samples: dict[int, list[float]] = {m: [] for m in rows}
        for m in rows:
            product(x[:m])  # warm
        for _ in range(repeats):
            for m in rows:
                start = time.perf_counter()
                product(x[:m])
                samples[m].append(time.perf_counter() - start)
        times[name] = {m: float(np.median(values)) * 1000 for m, values in samples.items()}
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_decode", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir")
    parser.add_argument("--kernels", action="store_true", help="only the product kernels' row classes")
    parser.add_argument("--kernel-times", metavar="WIDTHxOUT",
                        help="with --kernels: also each kernel's time by rows (--rows) for a WIDTHxOUT weight, e.g. "
                             "2048x16384")
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prepack", choices=("on", "off", "both"), default="both")
    parser.add_argument("--prefill-group", type=int, metavar="N",
                        help="with --onnx-dir: only N prefills one by one against the same N as one group")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one setting in this process
    args = parser.parse_args(argv)
    if args.prefill_group:
        if not args.onnx_dir:
            parser.error("--prefill-group needs --onnx-dir")
        load = os.getloadavg()[0]
        result = prefill_times(args.onnx_dir, args.prefill_group, args.steps)
        print(f"{args.prefill_group} prefills: one by one {result['one_by_one_ms']:.0f} ms, as one group "
              f"{result['group_ms']:.0f} ms (medians of {args.steps}); first logits bit-identical to alone "
              f"{result['bit_identical']} (the engine groups: {result['exact_groups']}); load average {load:.1f} -> "
              f"{os.getloadavg()[0]:.1f}")
        return 0
    if args.kernels:
        for name, groups in kernel_classes().items():
            print(f"{name}: {len(groups)} class(es) of row counts giving row 0 the same bits: {groups}")
        if args.kernel_times:
            width, out = (int(n) for n in args.kernel_times.lower().split("x"))
            load = os.getloadavg()[0]
            for name, by_rows in kernel_times(width, out, [int(n) for n in args.rows.split(",")]).items():
                print(f"{name}, {width}x{out}: " + ", ".join(f"{m} rows {ms:.2f} ms" for m, ms in by_rows.items()))
            print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")
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
