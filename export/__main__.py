"""python -m export --model PATH_OR_ID --output DIR [--format three-graphs|transformers.js] [--dtype float32|float16]
[--quantize int8|int4] [--opset N]"""

from __future__ import annotations

import sys

from paligemma.cli import ArgumentParser
from paligemma.errors import CheckpointError, OnnxExportError

from .quantize import QUANTIZATIONS
from .runtime.pipeline import export_and_validate
from .transformers_js.runtime import export_transformers_js_checked
from .writer.onnx_export import DEFAULT_OPSET, DTYPES, export_model


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m export", description="Export PaliGemma to ONNX (three graphs).")
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to write the graphs into")
    parser.add_argument("--format", default="three-graphs", choices=["three-graphs", "transformers.js"],
                        help="three-graphs: this project's runtime (default); transformers.js: its PaliGemma layout")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="float16 is for GPUs; with --quantize int4 and --format transformers.js: its q4f16")
    parser.add_argument("--quantize", choices=list(QUANTIZATIONS),
                        help="for CPUs: int8 or int4, MatMulNBits blocks of 32 (int4: 128 in products at least 1024 "
                             "wide; activations quantized per block in the kernel); every weight matrix, the output "
                             "projection included")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--no-validate", action="store_true", help="skip the comparison with torch")
    args = parser.parse_args(argv)
    try:
        if args.format == "transformers.js":
            export_transformers_js_checked(args.model, args.output, dtype=args.dtype, quantize=args.quantize,
                                           opset=args.opset, validate=not args.no_validate)
            return 0
        export = export_model if args.no_validate else export_and_validate
        export(args.model, args.output, dtype=args.dtype, quantize=args.quantize, opset=args.opset)
    except (OnnxExportError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
