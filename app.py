"""Serve the PaliGemma demo: `python app.py [--backend onnx|torch] [--model PATH_OR_ID] [--host H] [--port P] [--share]`."""

import argparse
import logging
import os

from demo import create_app, launch, load_backend
from paligemma import CheckpointError

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--backend", choices=["onnx", "torch"], default=os.environ.get("PALIGEMMA_BACKEND", "onnx"))
parser.add_argument("--model", default=os.environ.get("PALIGEMMA_MODEL"),
                    help="checkpoint folder or Hub repo id (env PALIGEMMA_MODEL); default: the embedded demo model")
parser.add_argument("--onnx-dir", default=os.environ.get("PALIGEMMA_ONNX_DIR"), help="serve this export as it is")
parser.add_argument("--host", help="address to listen on (default 127.0.0.1, or GRADIO_SERVER_NAME)")
parser.add_argument("--port", type=int, help="port (default 7860, or GRADIO_SERVER_PORT)")
parser.add_argument("--share", action="store_true", help="also serve through a temporary public gradio.live link")

if __name__ == "__main__":
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        backend = load_backend(args.model, args.backend, onnx_dir=args.onnx_dir)
    except CheckpointError as e:
        parser.exit(2, f"app.py: {e}\n")
    launch(create_app(backend), host=args.host, port=args.port, share=args.share)
