"""The ONNX Runtime generation loop behind the pipeline interface (pipeline) and the fused prefill and decode graphs
it builds at load (fused).

`load_onnx_pipeline`, `export_and_validate` and `cached_export` are named here, their documented path:
`paligemma.load(backend="onnx")` imports `export.runtime.load_onnx_pipeline` on use."""

from .pipeline import cached_export, export_and_validate, load_onnx_pipeline

__all__ = ["cached_export", "export_and_validate", "load_onnx_pipeline"]
