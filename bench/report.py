"""Medians, ratios to the reference, agreement of tokens, and the three outputs: a Markdown table, JSON, a PNG chart
(matplotlib; `python -m bench.report RESULT.json` redraws a chart from a stored result).

Ratios read "higher is better" for speed: time to first token as reference / runtime (how many times faster),
decode as runtime / reference tokens per second. Memory is runtime / reference (lower is better).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from PIL import Image

from .limits import describe as limits_text
from .timing import Spread

REFERENCE = "transformers"


def runtime_row(result: dict) -> dict:
    """How every table's row of a runtime starts: its name and description, and its error when it failed."""
    row = dict(runtime=result["runtime"], info=result.get("info", ""))
    return dict(row, error=result["error"]) if "error" in result else row


def summarize(results: list[dict], targets: dict) -> list[dict]:
    """One row per runtime of a workload: medians, ratios to transformers, whether the tokens agree, the target."""
    reference = next((r for r in results if r["runtime"] == REFERENCE and "error" not in r), None)
    rows = []
    for r in results:
        row = runtime_row(r)
        if "error" in row:
            rows.append(row)
            continue
        row.update(ttft_s=Spread.of(r["ttft_s"]).median, decode_tokens_per_s=Spread.of(r["decode_tokens_per_s"]).median,
                   peak_rss_mb=r["peak_rss_mb"], peak_gpu_mb=r.get("peak_gpu_mb"), load_s=r["load_s"],
                   runs=len(r["ttft_s"]), repeatable=r["repeatable"], tokens=r["tokens"], kernels=r.get("kernels"),
                   prompt_ids=r["prompt_ids"], load_average=r.get("load_average"))
        if reference is not None and "check" in reference and "check" in r:
            # CUDA mode: the tokens that must agree are the float32 check's (see bench.__main__.float32_check).
            check, ref_check = r["check"], reference["check"]
            row.update(check_dtype=check["dtype"],
                       check_agreeing_tokens=agreeing_prefix(check["tokens"], ref_check["tokens"]),
                       check_agree=(check["prompt_ids"] == ref_check["prompt_ids"]
                                    and check["tokens"] == ref_check["tokens"]))
        if reference is not None:
            ref_ttft = Spread.of(reference["ttft_s"]).median
            ref_decode = Spread.of(reference["decode_tokens_per_s"]).median
            row.update(ttft_speedup=ref_ttft / row["ttft_s"], decode_speedup=row["decode_tokens_per_s"] / ref_decode,
                       memory_ratio=row["peak_rss_mb"] / reference["peak_rss_mb"] if row["peak_rss_mb"] else None,
                       same_prompt=r["prompt_ids"] == reference["prompt_ids"],
                       agreeing_tokens=agreeing_prefix(r["tokens"], reference["tokens"]))
            row["tokens_agree"] = row["same_prompt"] and row["agreeing_tokens"] == len(reference["tokens"])
            # The answer a user gets ends at the first end-of-sequence token; the rest is filler that the benchmark
            # generates only to time 64 tokens (near-ties there can flip without changing any answer).
            stops = set(reference.get("eos_token_ids", []))
            answer = next((i + 1 for i, t in enumerate(reference["tokens"]) if t in stops), len(reference["tokens"]))
            row["answer_length"] = answer
            row["answer_agrees"] = row["same_prompt"] and row["agreeing_tokens"] >= answer
        target = targets.get(r["runtime"])
        if target:
            row["target"] = target
        rows.append(row)
    return rows


def threads_text(workload: dict) -> str:
    threads = workload.get("threads")
    return f"{threads} thread{'s' if threads != 1 else ''}" if threads else "threads: all cores"


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def target_text(target: dict) -> str:
    parts = []
    if "decode" in target:
        parts.append(f"decode >= {target['decode']}x")
    if "ttft" in target:
        parts.append(f"TTFT >= {target['ttft']}x faster")
    if "decode_tokens_per_s" in target:
        parts.append(f">= {target['decode_tokens_per_s']} tok/s")
    if "ttft_ms" in target:
        parts.append(f"TTFT <= {target['ttft_ms']} ms")
    return ", ".join(parts)


def markdown_table(workload: dict) -> str:
    """The table for one workload; a speed figure whose tokens disagree with transformers is struck through."""
    rows = workload["rows"]
    lines = [limits_text(workload["limits"]), ""] if workload.get("limits") else []
    lines += [f"**{workload['description']}** ({workload['new_tokens']} new tokens, {threads_text(workload)}, "
             f"median of {workload['runs']} run(s) after {workload['warmup']} warm-up"
             + (f", runtimes taking turns over {workload['rounds']} rounds)" if workload.get("rounds", 1) > 1 else ")"),
             "",
             "| runtime | time to first token | decode | first token / compute bound | decode / bandwidth bound "
             "| peak memory | greedy tokens vs transformers | target | kernels per decoded token (in prefill) "
             "| load average |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        name = f"{row['runtime']}: {row['info']}" if row.get("info") else row["runtime"]
        if "error" in row:
            lines.append(f"| {name} | failed: {error_line(row['error'])} | | | | | | | | |")
            continue
        reference = row["runtime"] == REFERENCE
        ttft = f"{row['ttft_s'] * 1000:.0f} ms"
        decode = f"{row['decode_tokens_per_s']:.1f} tok/s"
        memory = f"{row['peak_rss_mb']:.0f} MB RSS" if row["peak_rss_mb"] else "not measured (one process)"
        if row.get("peak_gpu_mb") is not None:
            memory += f", {row['peak_gpu_mb']:.0f} MB GPU"
        if "ttft_speedup" in row and not reference:
            ttft += f" ({row['ttft_speedup']:.2f}x faster)"
            decode += f" ({row['decode_speedup']:.2f}x)"
            memory += f" ({row['memory_ratio']:.2f}x)" if row["memory_ratio"] else ""
        if "check_agree" in row:
            check = f"{row['check_dtype']}: " + (f"identical ({row['check_agreeing_tokens']}/{len(row['tokens'])})"
                                                 if row["check_agree"] else
                                                 f"**DIFFER** after {row['check_agreeing_tokens']}/"
                                                 f"{len(row['tokens'])}")
            if reference:
                agree = f"reference ({row['check_dtype']} check run)"
            else:
                agree = check + ("; bfloat16: identical" if row["tokens_agree"] else
                                 f"; bfloat16: differ after {row['agreeing_tokens']}/{len(row['tokens'])}"
                                 + (" (rounding)" if row["check_agree"] else ""))
                if not row["check_agree"]:
                    ttft, decode = f"~~{ttft}~~", f"~~{decode}~~"
        elif reference:
            agree = "reference"
        elif "tokens_agree" not in row:
            agree = "no reference"
        elif row["tokens_agree"]:
            agree = f"identical ({row['agreeing_tokens']}/{len(row['tokens'])})"
        elif row["answer_agrees"]:
            agree = (f"answer identical (end-of-sequence at {row['answer_length']}); differ after "
                     f"{row['agreeing_tokens']}/{len(row['tokens'])}")
        else:
            agree = f"**DIFFER** after {row['agreeing_tokens']}/{len(row['tokens'])}" + (
                "" if row["same_prompt"] else ", prompt ids differ")
            ttft, decode = f"~~{ttft}~~", f"~~{decode}~~"
        if not row["repeatable"]:
            agree += ", not repeatable across runs"
        target = row.get("target")
        kernels = row.get("kernels")
        kernels = f"{kernels['decode_per_token']:.0f} ({kernels['prefill']})" if kernels else ""
        compute, bandwidth = bound_texts(row)
        loads = row.get("load_average") or []
        load = f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""
        lines.append(f"| {name} | {ttft} | {decode} | {compute} | {bandwidth} | {memory} | {agree} | "
                     f"{target_verdict(row, target) if target else ''} | {kernels} | {load} |")
    return "\n".join(lines)


def bound_texts(row: dict) -> tuple[str, str]:
    """'38% (bound 1.9 s, int8)' and '71% (bound 21.3 tok/s, 1.37 GB a step)', or blanks without limits."""
    if "ttft_of_bound" not in row:
        return "", ""
    compute = f"{row['ttft_of_bound']:.0%} (bound {format_seconds(row['ttft_bound_s'])}, {row['ttft_bound_path']})"
    bandwidth = (f"{row['decode_of_bound']:.0%} (bound {row['decode_bound_tokens_per_s']:.3g} tok/s, "
                 f"{row['decode_step_bytes'] / 1e9:.3g} GB a step)")
    return compute, bandwidth


def format_seconds(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1000:.3g} ms"


def summarize_requests(results: list[dict], targets: dict) -> list[dict]:
    """Request mode: one row per runtime, its median seconds per request, its ratio to transformers (times faster)
    and to the eager torch engine, and on how many scenes its answer is transformers'."""
    by_name = {r["runtime"]: r for r in results if "error" not in r}
    medians = {name: Spread.of(r["request_s"]) for name, r in by_name.items()}
    rows = []
    for r in results:
        row = runtime_row(r)
        if "error" in row:
            rows.append(row)
            continue
        spread = medians[r["runtime"]]
        row.update(request_s=spread.median, request_range_s=[spread.low, spread.high], requests=spread.count,
                   peak_rss_mb=r["peak_rss_mb"], repeatable=r["repeatable"], answers=r["answers"])
        for other, key in ((REFERENCE, "speedup"), ("torch", "speedup_over_torch")):
            if other in medians:
                row[key] = medians[other].median / spread.median
        if REFERENCE in by_name:
            reference = by_name[REFERENCE]["answers"]
            row["same_answers"] = sum(a == b for a, b in zip(r["answers"], reference))
            row["scenes"] = len(reference)
        if r["runtime"] in targets:
            row["target"] = targets[r["runtime"]]
        rows.append(row)
    return rows


def requests_table(workload: dict) -> str:
    """Request mode's table for one workload."""
    lines = [f"**{workload['description']}**, whole requests (\"{workload['prompt']}\" on {workload['scenes']} drawn "
             f"scenes, up to {workload['new_tokens']} new tokens, stopping at end-of-sequence; "
             f"{threads_text(workload)}, "
             f"median of {workload['runs']} request(s) after {workload['warmup']} warm-up"
             + (f", runtimes taking turns over {workload['rounds']} rounds)" if workload.get("rounds", 1) > 1 else ")"),
             "", "| runtime | per request | x faster than transformers | x faster than eager torch | peak memory "
             "| answers equal to transformers' | target |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in workload["rows"]:
        name = f"{row['runtime']}: {row['info']}" if row.get("info") else row["runtime"]
        if "error" in row:
            lines.append(f"| {name} | failed: {error_line(row['error'])} | | | | | |")
            continue
        low, high = row["request_range_s"]
        per_request = f"{row['request_s'] * 1000:.1f} ms ({low * 1000:.1f}-{high * 1000:.1f})"
        ratios = [f"{row[key]:.2f}x" if key in row else "" for key in ("speedup", "speedup_over_torch")]
        memory = f"{row['peak_rss_mb']:.0f} MB RSS" if row["peak_rss_mb"] else "not measured (one process)"
        if row["runtime"] == REFERENCE:
            agree = "reference"
        elif "same_answers" in row:
            agree = f"{row['same_answers']}/{row['scenes']} scenes"
        else:
            agree = "no reference"
        if not row["repeatable"]:
            agree += ", not repeatable across runs"
        lines.append(f"| {name} | {per_request} | {ratios[0]} | {ratios[1]} | {memory} | {agree} "
                     f"| {requests_verdict(row, row['target']) if 'target' in row else ''} |")
    return "\n".join(lines)


def requests_verdict(row: dict, target: dict) -> str:
    """Request mode's targets: x faster than transformers, and faster than eager torch."""
    wanted = [(f">= {target['speedup']}x transformers", row.get("speedup"), target["speedup"])]
    if target.get("faster_than_torch"):
        wanted.append(("faster than eager torch", row.get("speedup_over_torch"), 1.0))
    missed = [what for what, value, least in wanted if value is None or value < least]
    text = ", ".join(what for what, _, _ in wanted)
    verdict = "met" if not missed else "not met: " + ", ".join(missed)
    if row.get("same_answers") != row.get("scenes"):
        verdict += " (answers differ: does not count)"
    return f"{text}: {verdict}"


def error_line(error: str) -> str:
    """The line of a failure's output that says what went wrong (progress bars and warnings skipped)."""
    lines = [line.split("\r")[-1].strip() for line in error.splitlines() if line.strip()]
    named = [line for line in lines if "Error" in line or "error" in line or "Killed" in line or "signal" in line]
    return ((named or lines or ["unknown error"])[-1])[:200].replace("|", "/")


def counts(row: dict) -> bool:
    """Whether a row's speed counts: its tokens agree with transformers' (the float32 check's, where there is one;
    else up to the answer's end-of-sequence). A row with no reference to compare counts."""
    if "check_agree" in row:
        return row["check_agree"]
    return row.get("answer_agrees", True)


def target_verdict(row: dict, target: dict) -> str:
    """'met' or the gap: the fraction of each target reached."""
    reached = []
    if "decode" in target and "decode_speedup" in row:
        reached.append(("decode", row["decode_speedup"] / target["decode"]))
    if "ttft" in target and "ttft_speedup" in row:
        reached.append(("TTFT", row["ttft_speedup"] / target["ttft"]))
    if "decode_tokens_per_s" in target:
        reached.append(("decode", row["decode_tokens_per_s"] / target["decode_tokens_per_s"]))
    if "ttft_ms" in target:
        reached.append(("TTFT", target["ttft_ms"] / (row["ttft_s"] * 1000)))
    missed = [f"{what} at {fraction:.0%} of target" for what, fraction in reached if fraction < 1]
    verdict = "met" if not missed else "; ".join(missed)
    if not counts(row):
        verdict += " (tokens differ: does not count)"
    return f"{target_text(target)}: {verdict}"


def write_json(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=1) + "\n")


def ratio_target(row: dict, reference: dict | None, key: str) -> float | None:
    """A row's target for one bar as a ratio to transformers: given as a ratio ("ttft", "decode"), or as an absolute
    figure ("ttft_ms", "decode_tokens_per_s") divided by the reference's own."""
    target = row.get("target", {})
    if key in target:
        return target[key]
    if reference is None:
        return None
    if key == "decode" and "decode_tokens_per_s" in target:
        return target["decode_tokens_per_s"] / reference["decode_tokens_per_s"]
    if key == "ttft" and "ttft_ms" in target:
        return reference["ttft_s"] * 1000 / target["ttft_ms"]
    return None


LOG_SCALE_SPAN = 10.0  # a ratio axis goes logarithmic once its values span a decade


def ratio_panels(report: dict) -> list[dict]:
    """The workloads that have ratios to draw: those in which transformers ran beside the other runtimes."""
    return [w for w in report["workloads"] if any("ttft_speedup" in r for r in w["rows"])]


def ratio_figure(report: dict) -> Figure:
    """Each runtime's speed-up over transformers, time to first token and decode side by side as horizontal bars,
    one panel per workload: a line at 1x, a black tick at each target, hatched bars where the tokens differ (their
    speed does not count). The axis is logarithmic where the ratios span a decade."""
    panels = ratio_panels(report)
    if not panels:
        raise ValueError("no runtime in this report has ratios to transformers (request mode, or no reference run)")
    heights = [1 + len([r for r in w["rows"] if "ttft_speedup" in r]) for w in panels]
    figure = Figure(figsize=(7, 1.3 + 0.45 * sum(heights)), dpi=100, layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    figure.suptitle(f"Speed-up over transformers\n{report['machine']['summary']}, {report['date']}", fontsize=9)
    bar = 0.38
    series = (("ttft", "time to first token (x faster)", "tab:blue"), ("decode", "decode tokens/s (x)", "tab:orange"))
    for ax, panel in zip(axes, panels):
        rows = [r for r in panel["rows"] if "ttft_speedup" in r]
        reference = next((r for r in rows if r["runtime"] == REFERENCE), None)
        values = [r[f"{key}_speedup"] for r in rows for key, _, _ in series]
        targets = [(i, k, ratio_target(r, reference, key)) for i, r in enumerate(rows)
                   for k, (key, _, _) in enumerate(series)]
        targets = [(i, k, t) for i, k, t in targets if t is not None]
        extent = values + [t for _, _, t in targets] + [1.0]
        logarithmic = max(extent) / min(extent) >= LOG_SCALE_SPAN
        for k, (key, label, color) in enumerate(series):
            offsets = [i + (k - 0.5) * bar for i in range(len(rows))]
            bars = ax.barh(offsets, [r[f"{key}_speedup"] for r in rows], height=bar, color=color, label=label,
                           left=None if not logarithmic else min(extent) / 2)
            for patch, row in zip(bars, rows):
                if not counts(row):
                    patch.set_hatch("///")
                    patch.set_alpha(0.45)
            ax.bar_label(bars, fmt="%.2fx", padding=2, fontsize=8)
        for i, k, t in targets:
            ax.plot([t], [i + (k - 0.5) * bar], marker="|", markersize=12, markeredgewidth=2.5, color="black",
                    linestyle="none", label="target", zorder=3)
        ax.axvline(1.0, color="gray", linewidth=1, linestyle="--", label="transformers (1x)")
        if logarithmic:
            ax.set_xscale("log")
            ax.set_xlim(min(extent) / 2, max(extent) * 2)
        else:
            ax.set_xlim(0, max(extent) * 1.18)
        ax.set_yticks(range(len(rows)), [r["runtime"] + ("" if counts(r) else "\n(tokens differ)") for r in rows],
                     fontsize=9)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(f"{panel['description']}, {threads_text(panel)}, {panel['new_tokens']} new tokens",
                                   72), fontsize=9)
        ax.set_xlabel("ratio to transformers (higher is better)" + (", log scale" if logarithmic else ""),
                      fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    legend = {}
    for ax in axes:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    order = [label for _, label, _ in series] + ["transformers (1x)", "target"]
    figure.legend([legend[label] for label in order if label in legend], [label for label in order if label in legend],
                  loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    return figure


def plot_ratios(path: Path, report: dict) -> None:
    """The ratio chart as a small PNG: drawn at 100 dpi, then stored with a 32-colour palette (a third of the
    bytes of matplotlib's RGBA file, no visible change for flat bars and text). The same report gives the same
    bytes: no date or version is written into the file."""
    drawn = io.BytesIO()
    ratio_figure(report).savefig(drawn, format="png", metadata={"Software": None})
    with Image.open(drawn) as image:
        palette = image.convert("RGB").quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.save(path, format="PNG", optimize=True)


def main(argv: list[str] | None = None) -> int:
    """Redraws the chart of each stored result (`python -m bench.report bench/results/*/cpu.json`) from its JSON,
    beside it, without running the benchmark again."""
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    parser.add_argument("results", nargs="+", type=Path, help="a result's JSON, as `python -m bench` wrote it")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.results:
        try:
            plot_ratios(path.with_suffix(".png"), json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {path}: cannot draw its chart ({type(e).__name__}: {e}); pass a speed-mode result "
                  "written by python -m bench", file=sys.stderr)
            failed += 1
            continue
        print(path.with_suffix(".png"))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
