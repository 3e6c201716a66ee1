"""transformers.js' PaliGemma layout (`python -m export --format transformers.js`): its graphs (graphs), the folder
and its variants (writer), weights in chunks under 2 GB (data, split), and this project's ONNX Runtime loop over it
(runtime)."""
