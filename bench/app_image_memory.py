"""The served app's memory and CPU time for the largest accepted image, measured from outside as any client sends it.

    python -m bench.app_image_memory [--root CHECKOUT] [--burst 4]

Starts `python app.py` of the checkout `root` (default: this one) with its own upload folder, warms it with one shipped
example, then uploads a 7990 x 7990 16-bit gray PNG (0.14 MB on disk, 128 MB decoded; made once into /tmp) and asks
for a caption through the queue: prints the app's peak resident memory during that request above its warm idle level
(VmHWM after resetting it through /proc/PID/clear_refs, minus VmRSS before), the app's CPU time for the request (from
/proc/PID/stat; the tiny model's eight tokens are a few hundredths of it), then sends `burst` such requests at once and
prints the resident memory a second after the last answer, above warm idle.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BIG_PNG = Path(tempfile.gettempdir()) / "paligemma-7990-16bit.png"
TICKS = os.sysconf("SC_CLK_TCK")


def big_png() -> Path:
    if not BIG_PNG.exists():
        row = (np.arange(7990, dtype=np.uint32) * 65535 // 7989).astype(np.uint16)
        Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (7990, 7990)))).save(BIG_PNG, compress_level=9)
    return BIG_PNG


def status_mb(pid: int, field: str) -> float:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def caption(url: str, image: Path) -> str:
    """Upload `image`, then run generate through the queue; the final answer's text."""
    sys.path.insert(0, str(ROOT / "tests"))
    from app_server import last_event, raw_call, raw_upload, request

    path = raw_upload(url, image.name, image.read_bytes())
    kind, data = last_event(raw_call(url, request({"path": path, "meta": {"_type": "gradio.FileData"}}), timeout=600))
    if kind != "complete":
        raise RuntimeError(f"the request failed: {data}")
    return data[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_image_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose app.py to serve")
    parser.add_argument("--burst", type=int, default=4)
    parser.add_argument("--port", type=int, default=7931)
    args = parser.parse_args(argv)
    image = big_png()
    example = args.root / "demo" / "examples" / json.loads((args.root / "demo/examples/examples.json").read_text())[0][
        "file"]
    with tempfile.TemporaryDirectory() as uploads:
        env = {**os.environ, "GRADIO_TEMP_DIR": uploads}
        process = subprocess.Popen([sys.executable, "app.py", "--port", str(args.port)], cwd=args.root, env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{args.port}/"
        try:
            for _ in range(360):
                try:
                    urllib.request.urlopen(url + "gradio_api/info", timeout=5).read()
                    break
                except OSError:
                    time.sleep(0.5)
            caption(url, example)
            caption(url, example)
            time.sleep(1)
            idle = status_mb(process.pid, "VmRSS")
            Path(f"/proc/{process.pid}/clear_refs").write_text("5")
            start = cpu_s(process.pid)
            answer = caption(url, image)
            cpu = cpu_s(process.pid) - start
            peak = status_mb(process.pid, "VmHWM") - idle
            print(f"warm idle RSS {idle:.0f} MB; 7990x7990 16-bit PNG: peak {peak:.0f} MB above idle, "
                  f"{cpu:.2f} s of CPU for the whole request; answer {answer!r}")
            with ThreadPoolExecutor(args.burst) as pool:
                list(pool.map(lambda _: caption(url, image), range(args.burst)))
            time.sleep(1)
            print(f"after a burst of {args.burst} at once: RSS {status_mb(process.pid, 'VmRSS') - idle:.0f} MB "
                  f"above warm idle (peak {status_mb(process.pid, 'VmHWM') - idle:.0f} MB above)")
        finally:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
