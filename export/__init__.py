"""PaliGemma as ONNX: three graphs (vision_encoder, prefill, decode) and an ONNX Runtime generation loop behind the
same pipeline interface as torch. See docs/export.md for the graphs' contract."""

from paligemma.errors import OnnxExportError

from .writer.manifest import EXPORTER_VERSION

__all__ = ["EXPORTER_VERSION", "OnnxExportError", "export_model", "export_and_validate", "load_onnx_pipeline"]


def __getattr__(name):
    # Imported on use: `import export` stays light, and onnxruntime loads only when a pipeline is made.
    if name == "export_model":
        from .writer.onnx_export import export_model

        return export_model
    if name == "export_and_validate":
        from .runtime.pipeline import export_and_validate

        return export_and_validate
    if name == "load_onnx_pipeline":
        from .runtime.pipeline import load_onnx_pipeline

        return load_onnx_pipeline
    raise AttributeError(name)
