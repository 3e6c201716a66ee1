"""PaliGemma as ONNX: three graphs (vision_encoder, prefill, decode) and an ONNX Runtime generation loop behind the
same pipeline interface as torch. See export/README.md for the graphs' contract."""

from paligemma.errors import OnnxExportError

from .manifest import EXPORTER_VERSION

__all__ = ["EXPORTER_VERSION", "OnnxExportError", "export_model", "load_onnx_pipeline"]


def __getattr__(name):
    # Imported on use: `import export` stays light, and onnxruntime loads only when a pipeline is made.
    if name == "export_model":
        from .onnx_export import export_model

        return export_model
    if name == "load_onnx_pipeline":
        from .runtime import load_onnx_pipeline

        return load_onnx_pipeline
    raise AttributeError(name)
