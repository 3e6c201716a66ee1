"""Times the built page in Debian's chromium (WebAssembly backend), as a visitor sees it.

    python -m demo.web.measure_page [--site demo/web/site] [--clicks 10] [--query "?dtype=q8"]

Prints: page opened -> model loaded, page opened -> first answer shown (both from the navigation start), where the
load went (the page's marks, and when the runtime's .wasm file had arrived), and for the caption preset clicked
`--clicks` times, click -> full answer (median and best) and its tokens/s. `--query` is added to the page's URL.
Build the folder first: python -m demo.web.build.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.web.measure_page")
    parser.add_argument("--site", type=Path, default=WEB / "site")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--query", default="", help='added to the URL, e.g. "?dtype=q8"')
    args = parser.parse_args(argv)
    httpd = server(args.site)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page()
        page.set_default_timeout(120_000)
        page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/{args.query}")
        page.wait_for_function("window.paligemma && window.paligemma.firstAnswerMs !== null")
        loaded, first, marks = page.evaluate("[window.paligemma.loadedMs, window.paligemma.firstAnswerMs, "
                                             "window.paligemma.marks]")
        wasm = page.evaluate("performance.getEntriesByType('resource').filter(e => e.name.endsWith('.wasm'))"
                             ".map(e => [e.name.split('/').at(-1), e.responseEnd])")
        runs = []
        for i in range(args.clicks):
            page.click('#presets button[data-prompt="caption en"]')
            page.wait_for_function(f"window.paligemma.runs.length > {i + 1}")
            runs.append(page.evaluate("window.paligemma.runs.at(-1)"))
        device = page.evaluate("window.paligemma.device")
        browser.close()
    httpd.shutdown()
    totals = [r["total_ms"] / 1000 for r in runs]
    print(f"device {device}; page opened -> model loaded {loaded / 1000:.2f} s, -> first answer shown {first / 1000:.2f} s")
    steps = sorted([*marks.items(), *((f"{name} arrived", end) for name, end in wasm)], key=lambda item: item[1])
    print("  loading: " + ", ".join(f"{name} {ms / 1000:.2f} s" for name, ms in steps))
    print(f"caption ({len(runs[0]['tokens'])} tokens with <eos>), click -> full answer over {len(runs)} clicks: "
          f"median {statistics.median(totals):.3f} s, best {min(totals):.3f} s; time to first token median "
          f"{statistics.median(r['ttft_ms'] for r in runs) / 1000:.3f} s; decode median "
          f"{statistics.median(r['tokens_per_s'] for r in runs):.1f} tokens/s")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
