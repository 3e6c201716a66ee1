"""Builds the in-browser demo into one static folder and (with --serve) serves it locally.

    python -m demo.web.build [--out demo/web/site] [--serve] [--host 127.0.0.1] [--port 8000] [--rebuild]

The folder holds the page (index.html, app.js, style.css: committed in demo/web/), the embedded model exported in
transformers.js' layout (model/: float32 and int8, and the mask decoder), transformers.js' browser build and
onnxruntime-web's WebAssembly files (the asyncify build WebGPU needs, and the plain one, smaller and faster to compile,
for WebAssembly) from the installed npm packages (vendor/; `npm ci --onnxruntime-node-install=skip` in demo/web first),
the example scenes (examples/) and a README.md whose front matter makes the folder a static Hugging Face Space. All of
it is built; nothing is fetched from a CDN or the Hub when the page runs. The server sends the cross-origin isolation
headers that let onnxruntime-web run on several threads.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import logging
import shutil
import sys
import urllib.parse
from pathlib import Path

from export.transformers_js.runtime import export_transformers_js_checked
from export.transformers_js.writer import find_variant, graph_file
from export.writer.mask_decoder import GRAPH_FILE as MASK_DECODER_FILE
from paligemma import DEMO_CHECKPOINT
from paligemma.checkpoint import MASK_DECODER_NAME

logger = logging.getLogger(__name__)

WEB = Path(__file__).resolve().parent
EXAMPLES = WEB.parent / "examples"
NODE_MODULES = WEB / "node_modules"
PAGE_FILES = ("index.html", "app.js", "segmentation.js", "style.css")
# transformers.js' browser build bundles onnxruntime-web and loads its asyncify WebAssembly build at run time.
RUNTIME_FILES = {
    NODE_MODULES / "@huggingface/transformers/dist/transformers.min.js": "transformers.min.js",
    NODE_MODULES / "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.mjs": "ort-wasm-simd-threaded.asyncify.mjs",
    NODE_MODULES / "onnxruntime-web/dist/ort-wasm-simd-threaded.asyncify.wasm": "ort-wasm-simd-threaded.asyncify.wasm",
    NODE_MODULES / "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "ort-wasm-simd-threaded.mjs",
    NODE_MODULES / "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm",
}
# float32 (the page's default: torch's answers) and int8 (`?dtype=q8`: faster in WebAssembly, docs/web.md)
MODEL_QUANTIZATIONS = (None, "int8")
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
SPACE_README = """---
title: PaliGemma in the browser
emoji: 🔷
colorFrom: blue
colorTo: gray
sdk: static
app_file: index.html
custom_headers:
  cross-origin-embedder-policy: require-corp
  cross-origin-opener-policy: same-origin
---

The embedded PaliGemma demo model running entirely in the browser with transformers.js (onnxruntime-web,
WebAssembly; WebGPU where present). Built by `python -m demo.web.build` in the PaliGemma project (demo/web/).
"""


class BuildError(RuntimeError):
    pass


def build(out: Path, rebuild: bool = False, validate: bool = True, log=print) -> Path:
    """Writes the static site into `out` (the model export only when missing, or with `rebuild`; `validate` compares
    it with torch, as `python -m export` does)."""
    missing = [str(p) for p in RUNTIME_FILES if not p.exists()]
    if missing:
        raise BuildError(f"{missing[0]} is missing: install the npm packages first "
                         "(cd demo/web && npm ci --onnxruntime-node-install=skip)")
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    variants = [find_variant(quantize=quantize) for quantize in MODEL_QUANTIZATIONS]
    needed = [graph_file("decoder_model_merged", v) for v in variants]
    if (DEMO_CHECKPOINT / MASK_DECODER_NAME).exists():
        needed.append(MASK_DECODER_FILE)  # the export writes it (the page draws masks with it); older sites lack it
    if rebuild or not all((model / "onnx" / name).exists() for name in needed):
        shutil.rmtree(model, ignore_errors=True)
        for quantize in MODEL_QUANTIZATIONS:
            export_transformers_js_checked(DEMO_CHECKPOINT, model, quantize=quantize, validate=validate,
                                           progress=False, log=log)
    for name in PAGE_FILES:
        shutil.copy(WEB / name, out / name)
    vendor = out / "vendor"
    vendor.mkdir(exist_ok=True)
    for source, name in RUNTIME_FILES.items():
        shutil.copy(source, vendor / name)
    examples = out / "examples"
    examples.mkdir(exist_ok=True)
    for path in [EXAMPLES / "examples.json", *sorted(EXAMPLES.glob("*.png"))]:
        shutil.copy(path, examples / path.name)
    (out / "README.md").write_text(SPACE_README)
    log(f"built the page into {out}")
    return out


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the regular files under its folder, resolved (a link out of the folder is not followed) and nothing
    else: no folder listings (a folder's index.html stands for it), no dotfiles or dot-folders (a Space's folder is a
    git clone: .git/config), a 404 for anything else, a NUL byte included. A connection that sends nothing for
    `timeout` seconds is closed, so a half-open one does not hold its thread."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}
    timeout = 10  # seconds; socketserver sets it on each connection

    def translate_path(self, path: str) -> str:
        """The file to send for the URL `path`, or "" (which the server answers with 404)."""
        parts = [part for part in urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/") if part]
        if any(part.startswith(".") or "\0" in part for part in parts):
            return ""
        root = Path(self.directory).resolve()
        target = root.joinpath(*parts)
        try:
            if target.is_dir():
                target = target / "index.html"
            resolved = target.resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a loop of links, a name the system refuses
            return ""
        return str(resolved) if resolved.is_relative_to(root) and resolved.is_file() else ""

    def list_directory(self, path):
        self.send_error(http.server.HTTPStatus.NOT_FOUND, "File not found")
        return None

    def end_headers(self):
        for key, value in ISOLATION_HEADERS.items():
            self.send_header(key, value)
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        logger.debug(format, *args)


def server(folder: Path, port: int = 0, host: str = "127.0.0.1", timeout: float = Handler.timeout):
    """A local static server for the built folder (port 0: a free one; see `.server_address`); a connection idle
    for `timeout` seconds is closed."""
    handler = type("FolderHandler", (Handler,), {"timeout": timeout})
    return http.server.ThreadingHTTPServer((host, port), functools.partial(handler, directory=str(folder)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.web.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=WEB / "site", help="folder to build into (default demo/web/site)")
    parser.add_argument("--serve", action="store_true", help="serve the folder on localhost after building")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 for every network)")
    parser.add_argument("--rebuild", action="store_true", help="export the model again")
    args = parser.parse_args(argv)
    try:
        build(args.out, args.rebuild)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.serve:
        httpd = server(args.out, args.port, args.host)
        print(f"serving {args.out} at http://{args.host}:{httpd.server_address[1]}/ (Ctrl+C stops)")
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
