"""ONNX Runtime against torch: the torch side recorded in a process of its own (torch_reference), then compared graph
by graph with the tolerances of each variant (validate)."""
