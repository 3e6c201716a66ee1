"""The variants an export is made as, by the names the app, the benchmark and PALIGEMMA_QUANTIZE use (a light module:
app.py checks `--quantize` before onnxruntime is imported)."""

from __future__ import annotations

VARIANTS = {"float32": ("float32", None), "float16": ("float16", None), "int8": ("float32", "int8"),
            "int4": ("float32", "int4")}  # name -> (dtype, quantize)
QUANTIZED = tuple(name for name, (_, quantize) in VARIANTS.items() if quantize)  # what `--quantize` takes


def variant_name(dtype: str = "float32", quantize: str | None = None) -> str:
    return quantize or dtype


def exported_variant(manifest: dict) -> str:
    """The variant an export's manifest records (its quantize field is "none" when not quantized)."""
    quantize = manifest.get("quantize")
    return variant_name(manifest["dtype"], None if quantize in (None, "none") else quantize)
