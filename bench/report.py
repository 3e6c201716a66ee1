"""Medians, ratios to the reference, agreement of tokens, and the three outputs: a Markdown table, JSON, a PNG.

Ratios read "higher is better" for speed: time to first token as reference / runtime (how many times faster),
decode as runtime / reference tokens per second. Memory is runtime / reference (lower is better).
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

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
                   runs=len(r["ttft_s"]), repeatable=r["repeatable"], tokens=r["tokens"], kernels=r.get("kernels"))
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
    lines = [f"**{workload['description']}** ({workload['new_tokens']} new tokens, {threads_text(workload)}, "
             f"median of {workload['runs']} run(s) after {workload['warmup']} warm-up"
             + (f", runtimes taking turns over {workload['rounds']} rounds)" if workload.get("rounds", 1) > 1 else ")"),
             "",
             "| runtime | time to first token | decode | peak memory | greedy tokens vs transformers | target "
             "| kernels per decoded token (in prefill) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        name = f"{row['runtime']}: {row['info']}" if row.get("info") else row["runtime"]
        if "error" in row:
            lines.append(f"| {name} | failed: {error_line(row['error'])} | | | | | |")
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
        lines.append(f"| {name} | {ttft} | {decode} | {memory} | {agree} | "
                     f"{target_verdict(row, target) if target else ''} | {kernels} |")
    return "\n".join(lines)


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


def plot_ratios(path: Path, report: dict) -> None:
    """Horizontal bars of each runtime's speed-up over transformers (TTFT and decode), one panel per workload,
    drawn with Pillow; a line marks 1x and a tick each target."""
    panels = [w for w in report["workloads"] if any("ttft_speedup" in r for r in w["rows"])]
    font = ImageFont.load_default(14)
    small = ImageFont.load_default(12)
    bar_h, gap, label_w, plot_w, margin = 16, 14, 230, 460, 20
    heights = [40 + len([r for r in w["rows"] if "ttft_speedup" in r]) * (2 * bar_h + gap) + 30 for w in panels]
    image = Image.new("RGB", (label_w + plot_w + 2 * margin + 60, sum(heights) + 60 + margin), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), f"Speed-up over transformers ({report['machine']['summary']})", fill="black", font=font)
    colors = {"ttft": (66, 133, 244), "decode": (234, 120, 40)}
    draw.rectangle((margin, 34, margin + 12, 46), fill=colors["ttft"])
    draw.text((margin + 18, 32), "time to first token (x faster)", fill="black", font=small)
    draw.rectangle((margin + 240, 34, margin + 252, 46), fill=colors["decode"])
    draw.text((margin + 258, 32), "decode tokens/s (x)", fill="black", font=small)
    top = 60
    for panel, height in zip(panels, heights):
        rows = [r for r in panel["rows"] if "ttft_speedup" in r]
        largest = max([2.0] + [max(r["ttft_speedup"], r["decode_speedup"]) for r in rows]
                      + [v for r in rows for k, v in r.get("target", {}).items() if k in ("ttft", "decode")])
        scale = plot_w / (largest * 1.1)
        x0 = margin + label_w
        draw.text((margin, top), f"{panel['description']}, {threads_text(panel)}", fill="black", font=font)
        y = top + 26
        for row in rows:
            draw.text((margin, y + bar_h // 2), row["runtime"] + ("" if counts(row) else " (tokens differ)"),
                      fill="black", font=small)
            for i, key in enumerate(("ttft", "decode")):
                value = row[f"{key}_speedup"]
                yb = y + i * bar_h
                draw.rectangle((x0, yb + 2, x0 + value * scale, yb + bar_h - 2), fill=colors[key])
                draw.text((x0 + value * scale + 4, yb + 1), f"{value:.2f}x", fill="black", font=small)
                target = row.get("target", {}).get(key)
                if target:
                    xt = x0 + target * scale
                    draw.line((xt, yb, xt, yb + bar_h), fill="red", width=3)
            y += 2 * bar_h + gap
        draw.line((x0 + scale, top + 22, x0 + scale, y), fill="gray", width=1)
        draw.text((x0 + scale + 3, y - 4), "1x", fill="gray", font=small)
        top += height
    draw.text((margin, top), "red ticks: targets", fill="red", font=small)
    image.save(path)
