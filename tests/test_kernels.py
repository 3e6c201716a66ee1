"""bench.kernels counts the kernels ONNX Runtime's profiler records per run, on a graph whose kernels are known."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.kernels import kernels_per_run, profiled


def test_counts_the_kernels_of_each_run_of_a_known_graph(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("Add", ["x", "x"], ["a"]), helper.make_node("Mul", ["a", "x"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]), helper.make_node("Add", ["r", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "four", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = profiled(ort.SessionOptions(), tmp_path, "known")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the four nodes
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"x": np.ones((2, 3), np.float32)})
    runs = kernels_per_run(Path(session.end_profiling()))
    assert [dict(c) for c in runs] == [{"Add": 2, "Mul": 1, "Relu": 1}] * 3
