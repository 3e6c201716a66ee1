"""Serve the PaliGemma demo: `python app.py [--backend onnx|torch] [--model PATH_OR_ID] [--quantize int8|int4]
[--host H] [--port P] [--share] [--monitoring] [--upload-space MB]`."""

import logging
import os

from demo import create_app, launch, load_backend
from demo.limits import UPLOAD_FOLDER_BYTES
from export.variants import QUANTIZED
from paligemma import CheckpointError, OnnxExportError
from paligemma.cli import ArgumentParser


def build_parser() -> ArgumentParser:
    """The command line; defaults read from the environment when it is built."""
    parser = ArgumentParser(prog="app.py", description=__doc__)
    parser.add_argument("--backend", choices=["onnx", "torch"], default=os.environ.get("PALIGEMMA_BACKEND", "onnx"))
    parser.add_argument("--model", default=os.environ.get("PALIGEMMA_MODEL"),
                        help="checkpoint folder or Hub repo id (env PALIGEMMA_MODEL); default: the embedded demo model")
    parser.add_argument("--quantize", default=os.environ.get("PALIGEMMA_QUANTIZE") or None,
                        help="serve the model's int8 or int4 ONNX export (made into the cache on first use; env "
                             "PALIGEMMA_QUANTIZE); default: float32")
    parser.add_argument("--onnx-dir", default=os.environ.get("PALIGEMMA_ONNX_DIR"), help="serve this export as it is")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, help="port (default 7860, or GRADIO_SERVER_PORT)")
    parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op threads per request "
                             "(default: chosen for the machine and the model)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="requests generating at once: the rows of the continuous batch, max_batch (default: 8 on "
                             "a CPU, 64 on a GPU, fewer if memory is short); the rest wait in the queue")
    parser.add_argument("--monitoring", action="store_true",
                        help="serve Gradio's /monitoring routes (each event's name, count and latencies, to anyone)")
    parser.add_argument("--upload-space", type=int, default=UPLOAD_FOLDER_BYTES // 2**20,
                        help="MB that the uploads kept (for an hour) may take together; more are refused until old "
                             "ones are deleted (default %(default)s)")
    parser.add_argument("--torch-check", choices=["auto", "on", "off"],
                        default=os.environ.get("PALIGEMMA_TORCH_CHECK", "auto"),
                        help="let visitors check answers against eager torch, which loads a float32 copy of the model "
                             "(env PALIGEMMA_TORCH_CHECK; auto: only when that copy is under 1 GiB)")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Check the options, load the model and serve it; a bad option or model exits 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.onnx_dir and args.backend != "onnx":
        parser.error(f"--onnx-dir is served by --backend onnx only, and --backend is {args.backend}")
    if args.quantize not in (None, *QUANTIZED):
        parser.error(f"--quantize {args.quantize!r} is not one of {', '.join(QUANTIZED)} (or set nothing for float32)")
    if args.quantize is not None and args.backend != "onnx":
        parser.error(f"--quantize {args.quantize} is served by --backend onnx only, and --backend is {args.backend}")
    if args.threads is not None and args.backend != "onnx":
        parser.error("--threads sets ONNX Runtime's threads; with --backend torch, set OMP_NUM_THREADS")
    for name in ("threads", "concurrency", "upload_space"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        backend = load_backend(args.model, args.backend, onnx_dir=args.onnx_dir, threads=args.threads,
                               quantize=args.quantize, max_batch=args.concurrency)
    except (CheckpointError, OnnxExportError) as e:
        parser.exit(2, f"app.py: {e}\n")
    torch_check = {"auto": None, "on": True, "off": False}[args.torch_check]
    app = create_app(backend, concurrency_limit=args.concurrency, torch_check=torch_check)
    launch(app, host=args.host, port=args.port, share=args.share, monitoring=args.monitoring,
           upload_space=args.upload_space * 2**20)


if __name__ == "__main__":
    main()
