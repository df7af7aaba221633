"""Portable ONNX graphs: :func:`asag.portable.portability_problems` names every use of an operator that the
ONNX specification leaves undefined (on small hand-written graphs), and the sorts and top-k that
``asag export`` writes give the same order in ONNX Runtime and OpenVINO when keys are equal (OpenVINO's
``TopK`` does not order equal keys by index). The exported detectors themselves are checked in
tests/test_export.py."""

import re

import numpy as np
import pytest
import torch
from torch import nn

from asag.errors import ConfigError
from asag.export import ONNX_OPSET, ONNX_TRANSLATIONS
from asag.portable import check_portable, portability_problems

onnx = pytest.importorskip("onnx")
helper, FLOAT, INT64 = onnx.helper, onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def model(nodes, inputs, outputs, initializers=(), opsets=(("", ONNX_OPSET),)):
    """A model of ``nodes`` with ``inputs`` / ``outputs`` given as ``(name, type, shape)``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(*o) for o in opsets])


def constant(name, values):
    return helper.make_tensor(name, INT64, [len(values)], values)


def gather_elements(indices_shape):
    node = helper.make_node("GatherElements", ["x", "i"], ["y"], name="gather", axis=1)
    return model([node], [("x", FLOAT, [2, 7]), ("i", INT64, indices_shape)], [("y", FLOAT, indices_shape)])


def top_k(**attributes):
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=1, **attributes)
    return model([node], [("x", FLOAT, [2, 7])], [("v", FLOAT, [2, 3]), ("i", INT64, [2, 3])],
                 [constant("k", [3])])


def scatter_nd(indices, data_len=2):
    node = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="scatter")
    return model([node], [("x", FLOAT, [data_len]), ("u", FLOAT, [len(indices)])], [("y", FLOAT, [data_len])],
                 [helper.make_tensor("i", INT64, [len(indices), 1], indices)])


def scatter_elements(updates_len, **attributes):
    node = helper.make_node("ScatterElements", ["x", "i", "u"], ["y"], name="scatter", axis=1, **attributes)
    entries = [2, updates_len]
    return model([node], [("x", FLOAT, [2, 3]), ("i", INT64, entries), ("u", FLOAT, entries)],
                 [("y", FLOAT, [2, 3])])


def float_mod(**attributes):
    node = helper.make_node("Mod", ["a", "b"], ["y"], name="mod", **attributes)
    return model([node], [("a", FLOAT, [3]), ("b", FLOAT, [3])], [("y", FLOAT, [3])])


def sequence_concat():
    nodes = [helper.make_node("SequenceConstruct", ["x", "x"], ["s"], name="seq"),
             helper.make_node("ConcatFromSequence", ["s"], ["y"], name="cat", axis=0)]
    return model(nodes, [("x", FLOAT, [3])], [("y", FLOAT, [6])])


PROBLEMS = {
    "gather_smaller_indices": (gather_elements([1, 3]), r"gather \(GatherElements\): indices \[1, 3\] differ "
                               r"from data \[2, 7\] off axis 1"),
    "topk_unsorted": (top_k(sorted=0), r"topk \(TopK\): sorted=0"),
    "topk_default_sorted": (top_k(), r"topk \(TopK\): sorted not written out"),
    "scatter_nd_more_updates": (scatter_nd([0, 1, 1]), r"3 updates into 2 slots without a reduction"),
    "scatter_nd_duplicates": (scatter_nd([1, -1], data_len=2), "constant indices with duplicates"),
    "scatter_elements_more_entries": (scatter_elements(4), "4 entries scattered into 3 along axis 1"),
    "float_mod": (float_mod(), "floating-point Mod without fmod=1"),
    "tensor_sequence": (sequence_concat(), r"seq \(SequenceConstruct\): a tensor sequence operator"),
    "custom_domain": (model([helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
                            [("x", FLOAT, [3])], [("y", FLOAT, [3])],
                            opsets=(("", ONNX_OPSET), ("com.microsoft", 1))), "domain 'com.microsoft'"),
}
PORTABLE = {
    "gather_same_shape": gather_elements([2, 3]),
    "topk_sorted": top_k(sorted=1),
    "scatter_nd_distinct": scatter_nd([1, 0]),
    "scatter_elements_fit": scatter_elements(2),
    "scatter_elements_add": scatter_elements(4, reduction="add"),
    "float_fmod": float_mod(fmod=1),
}


@pytest.mark.parametrize("case", list(PROBLEMS))
def test_the_checker_names_each_non_portable_use(case):
    graph, pattern = PROBLEMS[case]
    problems = portability_problems(graph)
    assert len(problems) >= 1 and any(re.search(pattern, p) for p in problems), problems
    with pytest.raises(ConfigError, match=r"^m\.onnx: the ONNX graph is not portable: .*an asag bug") as err:
        check_portable(graph, "m.onnx")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(PORTABLE))
def test_the_checker_accepts_what_the_specification_defines(case):
    assert portability_problems(PORTABLE[case]) == []


def test_a_graph_shape_inference_rejects_is_not_portable():
    node = helper.make_node("Add", ["a", "b"], ["y"])
    graph = model([node], [("a", FLOAT, [3]), ("b", FLOAT, [4])], [("y", FLOAT, [3])])
    assert portability_problems(graph)[0].startswith("shape inference fails")


# --------------------------------------------------------------------- sorts with equal keys


class Sorts(nn.Module):
    """The sorts of the detector (stable ascending / descending, of floats and of a bool mask), an
    unstable sort of distinct keys, and a top-k, as one graph."""

    def forward(self, x, mask):
        return (torch.argsort(x, dim=1, stable=True), torch.sort(x, dim=1, descending=True, stable=True)[1],
                torch.argsort((~mask).to(torch.uint8), dim=1, stable=True),
                torch.argsort(torch.arange(x.shape[1], 0, -1).expand_as(x) * 1.0, dim=1),
                x.topk(5, dim=1)[1])


def tied_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 40]`` keys from {0, 1, 2, -inf} (many ties) and a ``[2, 40]`` bool mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (2, 40), generator=g).float()
    x[0, 5], x[1, 7:12] = float("-inf"), float("-inf")
    return x, torch.rand(2, 40, generator=g) > 0.5


@pytest.fixture(scope="module")
def sorts_onnx() -> bytes:
    program = torch.onnx.export(Sorts().eval(), tied_inputs(), dynamo=True, opset_version=ONNX_OPSET,
                                verbose=False, custom_translation_table=ONNX_TRANSLATIONS)
    assert portability_problems(program.model_proto) == []
    return program.model_proto.SerializeToString()


def run_onnxruntime(data: bytes, feeds: dict) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def run_openvino(data: bytes, feeds: dict) -> list[np.ndarray]:
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(data), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    results = compiled(feeds)
    return [results[output] for output in compiled.outputs]


def test_sorts_order_equal_keys_by_index_in_every_runtime(sorts_onnx):
    x, mask = tied_inputs()
    feeds = {"x": x.numpy(), "mask": mask.numpy()}
    eager = [t.numpy() for t in Sorts()(x, mask)]
    reference_topk = np.argsort(-x.numpy(), axis=1, kind="stable")[:, :5]  # the lower index first
    for runtime in (run_onnxruntime, run_openvino):
        got = runtime(sorts_onnx, feeds)
        for k in range(4):
            np.testing.assert_array_equal(got[k], eager[k], err_msg=f"{runtime.__name__}, output {k}")
        np.testing.assert_array_equal(got[4], reference_topk, err_msg=runtime.__name__)


BOOL = onnx.TensorProto.BOOL


def loop_with_gather(indices_shape):
    """A ``Loop`` (two iterations) whose body gathers ``x`` (outer scope) with ``indices_shape``."""
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("GatherElements", ["x", "i"], ["y"], name="inner_gather", axis=1),
    ]
    body = helper.make_graph(
        body_nodes, "body",
        [helper.make_tensor_value_info("iter", INT64, []),
         helper.make_tensor_value_info("cond_in", BOOL, [])],
        [helper.make_tensor_value_info("cond_out", BOOL, []),
         helper.make_tensor_value_info("y", FLOAT, indices_shape)])
    loop = helper.make_node("Loop", ["n", ""], ["ys"], name="loop", body=body)
    return model([loop], [("x", FLOAT, [2, 7]), ("i", INT64, indices_shape)],
                 [("ys", FLOAT, [2, *indices_shape])], [helper.make_tensor("n", INT64, [], [2])])


def test_control_flow_bodies_are_checked_like_the_main_graph():
    assert portability_problems(loop_with_gather([2, 3])) == []
    problems = portability_problems(loop_with_gather([1, 3]))
    assert len(problems) == 1 and problems[0].startswith("inner_gather (GatherElements): indices [1, 3]")


def test_a_subgraph_outside_control_flow_is_refused():
    body = helper.make_graph([], "b", [], [])
    node = helper.make_node("Identity", ["x"], ["y"], name="odd", extra=body)
    problems = [p for p in portability_problems(model([node], [("x", FLOAT, [2])], [("y", FLOAT, [2])]))
                if "subgraph" in p]
    assert problems == ["odd (Identity): holds a subgraph outside a control-flow operator"]


def test_an_export_traced_by_the_exporter_s_fallback_is_refused(monkeypatch):
    """``torch.onnx.export`` falls back to TorchDynamo when non-strict ``torch.export`` fails, and that
    graph differs (the RoI pooling's ``embedding_bag`` became a tensor-sequence loop): refused."""
    from asag import export

    class Fallback:
        _capture_strategy = "TorchExportStrictStrategy"

    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: Fallback())
    with pytest.raises(ConfigError, match=r"non-strict failed.*TorchExportStrictStrategy.*asag bug") as err:
        export._onnx_bytes(nn.Identity(), (torch.zeros(1),), {})
    assert "\n" not in str(err.value)
