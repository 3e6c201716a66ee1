"""bench.kernels counts the kernels ONNX Runtime's profiler records per run, on a graph whose kernels are known."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from bench.kernels import kernel_times_per_run, kernels_per_run, profiled, step_times


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


def test_times_each_node_and_operator_of_each_run_and_sums_a_modules_layers(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    # Two "layers" of one module (the fused graph's numbering: a module's name, then _N) and one other node.
    nodes = [helper.make_node("MatMul", ["x", "x"], ["a"], name="mlp.up_proj_3"),
             helper.make_node("MatMul", ["a", "x"], ["b"], name="mlp.up_proj_17"),
             helper.make_node("Relu", ["b"], ["y"], name="act_4")]
    model = helper.make_model(helper.make_graph(nodes, "three", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = profiled(ort.SessionOptions(), tmp_path, "timed")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, {"x": np.ones((64, 64), np.float32)})
    runs = kernel_times_per_run(Path(session.end_profiling()))
    assert len(runs) == 3
    for run in runs:
        assert set(run) == {"mlp.up_proj_3", "mlp.up_proj_17", "act_4", "op:MatMul", "op:Relu"}
        assert run["op:MatMul"] == run["mlp.up_proj_3"] + run["mlp.up_proj_17"] and run["op:Relu"] == run["act_4"]
    times = step_times(runs)
    assert times["modules"]["mlp.up_proj"][1] == 2 and times["modules"]["act"][1] == 1
    assert set(times["ops"]) == {"MatMul", "Relu"}
