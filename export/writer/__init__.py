"""torch -> ONNX files: the three graphs traced on a hollow model (streaming), each weight copied from the checkpoint
(checkpoint_stream) into page-aligned external data (external_data), the mask decoder's graph beside them
(mask_decoder), and what identifies the export and checks it at load (manifest, integrity). `export_model` in
onnx_export is the entry point."""
