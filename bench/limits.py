"""The machine's limits, measured in the benchmark's own run, and each runtime's figures set against them.

- **Memory read bandwidth**: each core reduces its own slice of a buffer much larger than the last-level cache
  (numpy's integer OR over int64 words: one cheap operation per 8 bytes, so the pass waits on memory, not on the
  core; numpy releases the GIL, so the threads run at once); the best of several passes, bytes / seconds. A decode
  step reads the decoder's weights (the output projection among them) and the cache at least once, so those bytes /
  the bandwidth is the fastest a step can be: the **bandwidth bound**.
- **Matrix-multiply rates** at the prefill's shape, [T, C] x [C, I] (the decoder MLP's gate and up products, T the
  prompt's tokens), for each path the CPU has: float32 (ONNX Runtime's MatMul, pre-packed), 8-bit and 4-bit (ONNX
  Runtime's MatMulNBits at accuracy level 4, activations quantized to int8 per block inside the kernel, at the
  exports' block sizes), and bfloat16 (torch.matmul, oneDNN) where the CPU has bfloat16 dot products (ONNX Runtime
  1.31's CPU provider has no bfloat16 MatMul). The operations a first token needs (`prefill_operations`) at the best
  of these rates is the **compute bound**.

A fraction of 1 would be a runtime at the machine's limit; real kernels reach part of it. Both limits are measured
in the same run as the runtimes, under the same load, and the load average is recorded beside them.

    python -m bench.limits [--shapes 266x2048x16384,266x16384x2048] [--blocks 32,64,128,256] [--threads N]
    python -m bench.limits --gemv 2048x16384,16384x2048 [--blocks 32,128]

prints the bandwidth and, for each shape (rows x K x N), the float32, bfloat16 and MatMulNBits rates at each block
(docs/quantization.md's table of blocks); with --gemv, instead of the shapes, a decode step's product alone: one row
times a K x N weight by MatMulNBits (accuracy level 4), over distinct weights that together are far larger than the
last-level cache (each read from memory, as a decode step reads its layers), as bytes of stored weight (blocks and
scales) per second and as a fraction of the bandwidth measured beside it: how fast the decode kernel itself goes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# Instruction-set extensions that decide which matrix-multiply paths are fast, as /proc/cpuinfo names them (x86
# "flags", Arm "Features").
ISA_EXTENSIONS = ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "asimddp",
                  "i8mm", "bf16", "sve")
BFLOAT16_EXTENSIONS = {"avx512_bf16", "amx_bf16", "bf16"}


def isa_extensions(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The ISA_EXTENSIONS this CPU lists, in that order ([] where /proc/cpuinfo cannot be read)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return []
    flags = set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [name for name in ISA_EXTENSIONS if name in flags]


def load_average() -> float:
    """The 1-minute load average: above the core count, the figures beside it were measured on a busy machine."""
    return round(os.getloadavg()[0], 2)


def memory_bandwidth(buffer_bytes: int, threads: int, passes: int = 5) -> float:
    """Bytes per second read by `threads` threads, each OR-reducing its slice of a `buffer_bytes` buffer; the best of
    `passes` after one that brings the pages in."""
    words = np.ones(buffer_bytes // 8, dtype=np.int64)
    slices = np.array_split(words, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes + 1):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, slices))
            best = min(best, time.perf_counter() - start)
    return words.nbytes / best


def _session(nodes: list, weights: dict[str, np.ndarray], K: int, N: int, threads: int):
    """A session of products of the input x [M, K], each node's output [M, N], as the runtime's sessions run."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["M", N])
               for node in nodes for name in node.output]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              outputs, [numpy_helper.from_array(value, name) for name, value in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(
        "com.microsoft", 1)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION, 10)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the runtime runs
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _best_seconds(call, runs: int) -> float:
    call()  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rates(M: int, K: int, N: int, blocks: dict[int, int], threads: int, runs: int = 5,
                 extensions: list[str] | None = None) -> dict[str, float]:
    """Operations per second of an [M, K] x [K, N] product on each path (best of `runs`): "float32", "int{bits}" for
    each MatMulNBits width in `blocks` (bits -> block size), "bfloat16" where the CPU has bfloat16 dot products."""
    from onnx import helper

    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K), dtype=np.float32)
    operations = 2 * M * K * N
    rates = {}
    weight = (rng.standard_normal((K, N), dtype=np.float32) * 0.02).astype(np.float32)
    session = _session([helper.make_node("MatMul", ["x", "w"], ["y"])], {"w": weight}, K, N, threads)
    rates["float32"] = operations / _best_seconds(lambda: session.run(None, {"x": x}), runs)
    for bits, block in blocks.items():
        count = -(-K // block)
        data = rng.integers(0, 256, (N, count, block * bits // 8), dtype=np.uint8)
        scales = (rng.random((N, count), dtype=np.float32) * 0.01).astype(np.float32)
        node = helper.make_node("MatMulNBits", ["x", "b", "scales"], ["y"], domain="com.microsoft", K=K, N=N,
                                bits=bits, block_size=block, accuracy_level=4)
        session = _session([node], {"b": data, "scales": scales}, K, N, threads)
        rates[f"int{bits}"] = operations / _best_seconds(lambda: session.run(None, {"x": x}), runs)
    extensions = isa_extensions() if extensions is None else extensions
    if BFLOAT16_EXTENSIONS & set(extensions):
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        a, b = torch.from_numpy(x).bfloat16(), torch.from_numpy(weight).bfloat16()
        rates["bfloat16"] = operations / _best_seconds(lambda: a @ b, runs)
        torch.set_num_threads(previous)
    return rates


def gemv_rate(K: int, N: int, bits: int, block: int, threads: int, runs: int = 7,
              total_bytes: int = 256 * 2**20) -> float:
    """Bytes of stored weight (blocks and scales) per second of one row times K x N weights by MatMulNBits (accuracy
    level 4): one session of as many such products of the same row by distinct weights as make `total_bytes`, run
    one after the other, so that each weight comes from memory; the best of `runs`."""
    from onnx import helper

    rng = np.random.default_rng(0)
    count = -(-K // block)
    shape = (N, count, block * bits // 8)
    weight_bytes = math.prod(shape) + N * count * 4
    copies = max(2, -(-total_bytes // weight_bytes))
    nodes, weights = [], {}
    for i in range(copies):  # each its own contents: ONNX Runtime shares the packed copy of equal weights
        weights[f"b{i}"] = rng.integers(0, 256, shape, dtype=np.uint8)
        weights[f"s{i}"] = (rng.random((N, count), dtype=np.float32) * 0.01).astype(np.float32)
        nodes.append(helper.make_node("MatMulNBits", ["x", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=K, N=N, bits=bits, block_size=block, accuracy_level=4))
    session = _session(nodes, weights, K, N, threads)
    x = rng.standard_normal((1, K), dtype=np.float32)
    return copies * weight_bytes / _best_seconds(lambda: session.run(None, {"x": x}), runs)


def measure(config, prompt_tokens: int, threads: int, buffer_bytes: int, blocks: dict[int, int],
            runs: int = 5) -> dict:
    """The machine's limits for `config`'s prefill shape, with the load average before and after."""
    before = load_average()
    bandwidth = memory_bandwidth(buffer_bytes, threads, runs)
    t = config.text
    shape = (prompt_tokens, t.hidden_size, t.intermediate_size)
    rates = matmul_rates(*shape, blocks=blocks, threads=threads, runs=runs)
    return dict(bandwidth_bytes_per_s=bandwidth, buffer_bytes=buffer_bytes, threads=threads, matmul_shape=shape,
                rates=rates, blocks={f"int{bits}": block for bits, block in blocks.items()},
                load_average=[before, load_average()])


def best_of(rounds: list[dict]) -> dict:
    """One set of limits from several rounds' measurements: each limit's best (the machine's limit is the fastest it
    was seen to go), every load average."""
    best = dict(rounds[0])
    best["bandwidth_bytes_per_s"] = max(r["bandwidth_bytes_per_s"] for r in rounds)
    best["rates"] = {path: max(r["rates"][path] for r in rounds) for path in rounds[0]["rates"]}
    best["load_average"] = [value for r in rounds for value in r["load_average"]]
    best["rounds"] = len(rounds)
    return best


def prefill_operations(config, prompt_tokens: int) -> int:
    """Multiply-adds x 2 that the first token needs: the vision tower over its patches (patch embedding, every layer's
    products and attention), the projector, every decoder layer over the prompt's T tokens (the last layer: keys and
    values of every token, the rest for the last token only, as the logits read nothing else), attention, and the
    output projection for the last token."""
    v, t = config.vision, config.text
    P, T = v.num_patches, prompt_tokens
    vision_layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    vision = (v.num_channels * v.patch_size**2 * v.hidden_size * P
              + v.num_hidden_layers * (vision_layer * P + 2 * P * P * v.hidden_size))
    projector = v.hidden_size * config.projection_dim * P
    q, kv = t.hidden_size * t.num_attention_heads * t.head_dim, t.hidden_size * t.num_key_value_heads * t.head_dim
    rest = 2 * q + 3 * t.hidden_size * t.intermediate_size  # q and o, the MLP
    attention = 2 * T * T * t.num_attention_heads * t.head_dim  # scores and values, every query against every key
    decoder = ((t.num_hidden_layers - 1) * ((rest + 2 * kv) * T + attention)
               + 2 * kv * T + rest + 2 * T * t.num_attention_heads * t.head_dim)
    return 2 * (vision + projector + decoder + t.hidden_size * t.vocab_size)


def float_decoder_bytes(config, itemsize: int = 4) -> int:
    """The decoder's weights in a float format: every layer's products and norms, the final norm, the tied
    embedding (the output projection reads all of it each step)."""
    t = config.text
    q, kv = t.hidden_size * t.num_attention_heads * t.head_dim, t.hidden_size * t.num_key_value_heads * t.head_dim
    norms = 4 if t.is_gemma2 else 2
    layer = 2 * q + 2 * kv + 3 * t.hidden_size * t.intermediate_size + norms * t.hidden_size
    return itemsize * (t.num_hidden_layers * layer + t.hidden_size + t.vocab_size * t.hidden_size)


def export_decoder_bytes(onnx_dir: Path) -> int:
    """The bytes of an export's decoder weights as stored (its shared data file's tensors: what its prefill and
    decode graphs read)."""
    import json

    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    return sum(entry["length"] for entry in manifest["shared_data"]["tensors"].values())


def decode_bytes(config, weight_bytes: int, prompt_tokens: int, new_tokens: int, itemsize: int = 4) -> int:
    """Bytes a decode step reads at least: the decoder's weights and the cache (keys and values of every layer, at
    the mean length over the timed steps)."""
    t = config.text
    mean_length = prompt_tokens + new_tokens / 2
    return weight_bytes + int(2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * itemsize * mean_length)


def against_limits(row: dict, limits: dict, operations: int, step_bytes: int) -> dict:
    """A runtime's decode as a fraction of the bandwidth bound and its first token as a fraction of the compute
    bound (the best rate measured), with the bounds themselves."""
    bound_tokens_per_s = limits["bandwidth_bytes_per_s"] / step_bytes
    best_path, best_rate = max(limits["rates"].items(), key=lambda item: item[1])
    bound_ttft_s = operations / best_rate
    return dict(decode_bound_tokens_per_s=bound_tokens_per_s, decode_step_bytes=step_bytes,
                decode_of_bound=row["decode_tokens_per_s"] / bound_tokens_per_s,
                prefill_operations=operations, ttft_bound_s=bound_ttft_s, ttft_bound_path=best_path,
                ttft_of_bound=bound_ttft_s / row["ttft_s"])


def describe(limits: dict) -> str:
    """One line: what was measured, and at which load."""
    M, K, N = limits["matmul_shape"]
    units = {"float32": "GFLOP/s", "bfloat16": "GFLOP/s (torch)"}
    rates = ", ".join(f"{path} {rate / 1e9:.3g} {units.get(path, 'GOP/s')}"
                      + (f" (MatMulNBits, block {limits['blocks'][path]}, accuracy level 4)" if path in limits["blocks"]
                         else "")
                      for path, rate in limits["rates"].items())
    loads = limits["load_average"]
    return (f"Limits measured in this run ({limits['threads']} threads, best of each round's passes): memory read "
            f"{limits['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s ({limits['buffer_bytes'] / 2**30:.2g} GiB buffer); "
            f"matrix products at the prefill's shape {M} x {K} x {N}: {rates}; load average "
            f"{min(loads):.1f}-{max(loads):.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="266x2048x16384,266x16384x2048,256x1152x4304,266x2048x65536",
                        help="rows x K x N, comma-separated (default: the 3B's prefill products)")
    parser.add_argument("--blocks", default="32,64,128,256", help="MatMulNBits block sizes")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--bandwidth-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--gemv", metavar="KxN,...", help="a decode step's products alone, one row times K x N weights "
                                                          "(e.g. 2048x16384,16384x2048), instead of --shapes")
    parser.add_argument("--gemv-mib", type=int, default=256,
                        help="with --gemv: the distinct weights' bytes together (far above the last-level cache)")
    args = parser.parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    print(f"load average {load_average()}; {' '.join(isa_extensions())}; {args.threads} threads")
    bandwidth = memory_bandwidth(args.bandwidth_mib * 2**20, args.threads, args.runs)
    print(f"memory read {bandwidth / 1e9:.1f} GB/s ({args.bandwidth_mib} MiB buffer, best of {args.runs})")
    if args.gemv:
        print("| K x N | " + " | ".join(f"int{bits}, block {b}" for bits in (8, 4) for b in blocks) + " |")
        print("| --- " * (1 + 2 * len(blocks)) + "|")
        for shape in args.gemv.split(","):
            K, N = (int(v) for v in shape.split("x"))
            cells = [gemv_rate(K, N, bits, b, args.threads, args.runs, args.gemv_mib * 2**20) for bits in (8, 4)
                     for b in blocks]
            print(f"| {K} x {N} | " + " | ".join(f"{c / 1e9:.1f} ({c / bandwidth:.0%})" for c in cells) + " |",
                  flush=True)
        print(f"(GB/s of stored weight, and its fraction of the bandwidth; best of {args.runs}; load average "
              f"{load_average()})")
        return 0
    print("| rows x K x N | float32 | bfloat16 (torch) | " + " | ".join(f"int{bits}, block {b}" for bits in (8, 4)
                                                             for b in blocks) + " |")
    print("| --- " * (3 + 2 * len(blocks)) + "|")
    for shape in args.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        rates = {}
        for block in blocks:
            measured = matmul_rates(M, K, N, {8: block, 4: block}, args.threads, args.runs,
                                    extensions=isa_extensions() if block == blocks[0] else [])
            rates.update({(path, block if path.startswith("int") else None): r for path, r in measured.items()})
        cells = [rates[("float32", None)], rates.get(("bfloat16", None))]
        cells += [rates[(f"int{bits}", b)] for bits in (8, 4) for b in blocks]
        print(f"| {M} x {K} x {N} | " + " | ".join("-" if c is None else f"{c / 1e9:.0f}" for c in cells) + " |",
              flush=True)
    print(f"(GOP/s, best of {args.runs}; load average {load_average()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
