"""Times the built page in Debian's chromium (WebAssembly backend), as a visitor sees it.

    python -m demo.web.measure_page [--site demo/web/site] [--loads 3] [--clicks 10] [--query "?dtype=q8"]

Each of `--loads` page loads is a fresh browser (nothing cached). Prints, per load: page opened -> model loaded and
-> first answer shown (both from the navigation start), where the load went (the page's marks, and when each
model and runtime file had arrived: resource timings), and for the caption preset clicked `--clicks` times, click
-> full answer (median and best) and its tokens/s; then the medians over the loads. `--query` is added to the
page's URL (app.js: ?dtype=, ?threads=, ?optimization=). Build the folder first: python -m demo.web.build. Run it
on a quiet machine: every number here is CPU time on the visitor's cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

from demo.web.build import WEB, server

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARRIVALS = (".wasm", ".onnx", ".onnx_data")  # the files whose arrival is worth a mark


def measure_load(playwright, url: str, clicks: int) -> dict:
    """One page load in a fresh browser: its marks, arrivals and `clicks` caption runs."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
    try:
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_function("window.paligemma && (window.paligemma.firstAnswerMs !== null"
                               " || !document.getElementById('error').hidden)")
        state = page.evaluate("(({runs, lastInputs, image, processor, model, ...rest}) => rest)(window.paligemma)")
        if state["firstAnswerMs"] is None:
            raise RuntimeError(f"the page showed an error: {page.locator('#error').text_content()}")
        arrivals = page.evaluate("performance.getEntriesByType('resource').map(e => [e.name.split('/').at(-1), "
                                 "e.responseEnd])")
        runs = []
        for i in range(clicks):
            page.click('#presets button[data-prompt="caption en"]')
            page.wait_for_function(f"window.paligemma.runs.length > {i + 1}")
            runs.append(page.evaluate("window.paligemma.runs.at(-1)"))
    finally:
        browser.close()
    return dict(state=state, runs=runs,
                arrivals=[(f"{name} arrived", ms) for name, ms in arrivals if name.endswith(ARRIVALS)])


def report(load: dict) -> dict:
    state, runs = load["state"], load["runs"]
    totals = [r["total_ms"] / 1000 for r in runs]
    row = dict(loaded=state["loadedMs"] / 1000, first=state["firstAnswerMs"] / 1000,
               click_median=statistics.median(totals), click_best=min(totals),
               ttft=statistics.median(r["ttft_ms"] for r in runs) / 1000,
               tokens_per_s=statistics.median(r["tokens_per_s"] for r in runs))
    print(f"device {state['device']}, {state.get('threads')} thread(s), crossOriginIsolated "
          f"{state.get('crossOriginIsolated')}, session options {state.get('sessionOptions')}; page opened -> model "
          f"loaded {row['loaded']:.2f} s, "
          f"-> first answer shown {row['first']:.2f} s")
    steps = sorted([*state["marks"].items(), *load["arrivals"]], key=lambda item: item[1])
    print("  loading: " + ", ".join(f"{name} {ms / 1000:.2f} s" for name, ms in steps))
    print(f"  caption ({len(runs[0]['tokens'])} tokens with <eos>), click -> full answer over {len(runs)} clicks: "
          f"median {row['click_median']:.3f} s, best {row['click_best']:.3f} s; time to first token median "
          f"{row['ttft']:.3f} s; decode median {row['tokens_per_s']:.1f} tokens/s")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.web.measure_page")
    parser.add_argument("--site", type=Path, default=WEB / "site")
    parser.add_argument("--loads", type=int, default=1, help="page loads, each in a fresh browser")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--query", default="", help='added to the URL, e.g. "?dtype=q8"')
    args = parser.parse_args(argv)
    if args.loads < 1 or args.clicks < 1:
        parser.error("--loads and --clicks take a number from 1")
    httpd = server(args.site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/{args.query}"
    rows = []
    try:
        with sync_playwright() as p:
            for _ in range(args.loads):
                rows.append(report(measure_load(p, url, args.clicks)))
    finally:
        httpd.shutdown()
    if len(rows) > 1:
        median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        print(f"median of {len(rows)} loads ({args.query or 'no query'}): model loaded {median['loaded']:.2f} s, "
              f"first answer {median['first']:.2f} s, click median {median['click_median']:.3f} s, "
              f"best click {min(r['click_best'] for r in rows):.3f} s, decode {median['tokens_per_s']:.1f} tokens/s")
    print(f"load average after measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
