"""Portability of an exported ONNX graph: every operator used as the strictest reading of the ONNX
operator specification allows, so that any conforming runtime (ONNX Runtime, OpenVINO, TensorRT, ...)
computes the same thing.

PyTorch and ONNX Runtime accept some uses that the specification leaves undefined or forbids, and other
runtimes then differ (docs/deployment.md, "Portable graphs"). :func:`portability_problems` walks the
graph after ONNX shape inference and names each such use; :func:`check_portable` raises on the first
ones. ``asag export`` runs it on every ONNX file it writes. What it checks:

* the graph: shape inference (strict mode) succeeds; only operators of the default ONNX domain, no
  model-local functions; subgraphs only as the bodies of the control-flow operators (:data:`CONTROL_FLOW`,
  e.g. the ``Loop`` of the exported patch NMS), whose nodes are checked like the main graph's, with the
  outer graph's names in scope;
* ``GatherElements``: ``data`` and ``indices`` of known shapes and the same rank, equal in every
  dimension but ``axis`` (PyTorch's ``gather`` allows smaller ``indices``; the specification does not,
  and OpenVINO fails on it);
* ``ScatterElements``: ``indices`` and ``updates`` of the same shape, within ``data`` off the axis;
  without a reduction, not more entries along the axis than ``data`` has (duplicates, whose result the
  specification leaves undefined, are then certain);
* ``ScatterND`` without a reduction: not more updates than addressed slots, and constant indices
  distinct;
* ``TopK``: ``sorted=1`` written out (with ``sorted=0`` the order is undefined), a constant ``k``
  within the axis;
* ``Mod`` of floating-point tensors: ``fmod=1`` (required for them by the specification);
* no tensor sequences (``SequenceEmpty``, ``SequenceInsert``, ``ConcatFromSequence``, ...): PyTorch's
  exporter writes them for operators it can only express as a loop over rows (a weighted
  ``embedding_bag``), and OpenVINO 2026.4 cannot type the values they feed inside a ``Loop``.

What a static check cannot see: whether data-dependent scatter indices are distinct, and whether a
result depends on how equal keys are ordered. ``TopK`` orders equal keys by index in the specification
but not in every runtime (OpenVINO 2026.4 does not), so ``asag export`` writes sorts and top-k whose
keys are made distinct first (:func:`asag.export._stable_order_onnx`); the tests compare runtimes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from asag.errors import ConfigError
from asag.extras import require

DEFAULT_DOMAINS = ("", "ai.onnx")
# Operators whose graph attributes are bodies that every runtime runs (checked node by node).
CONTROL_FLOW = ("Loop", "If", "Scan")
FLOAT_TYPES = ("FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16")
SEQUENCE_OPERATORS = ("SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceAt", "SequenceErase",
                      "SequenceLength", "SequenceMap", "ConcatFromSequence", "SplitToSequence")
# Problems listed in the one-line error of check_portable (the rest are counted).
SHOWN_PROBLEMS = 3

Shape = tuple[int | None, ...] | None  # known rank with possibly unknown dims, or unknown rank


def portability_problems(model: Any) -> list[str]:
    """Every non-portable use in ``model`` (an ``onnx.ModelProto``), one phrase each naming the node, e.g.
    ``"node_gather_3 (GatherElements): indices [2, 5] differ from data [2, 7] off axis 1"``; empty when
    the graph is portable."""
    onnx = require("onnx", "checking an ONNX graph", "export")
    problems = [f"operator set of domain {entry.domain!r} (only the default ONNX domain is portable)"
                for entry in model.opset_import if entry.domain not in DEFAULT_DOMAINS]
    problems += [f"model-local function {function.name!r}" for function in model.functions]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as err:  # onnx.shape_inference.InferenceError and the checker's errors
        return [*problems, f"shape inference fails: {' '.join(str(err).split())[:300]}"]
    return problems + _graph_problems(onnx, inferred.graph, None)


def _graph_problems(onnx: Any, graph: Any, outer: _Graph | None) -> list[str]:
    """The problems of ``graph``'s nodes and, recursively, of the bodies of its control-flow nodes."""
    checked = _Graph(onnx, graph, outer)
    problems = []
    for node in graph.node:
        name = f"{node.name or '(unnamed)'} ({node.op_type})"
        problems += [f"{name}: {problem}" for problem in checked.check(node)]
        if node.op_type in CONTROL_FLOW:
            for attr in node.attribute:
                bodies = [attr.g] if attr.type == attr.GRAPH else list(attr.graphs)
                for body in bodies:
                    problems += _graph_problems(onnx, body, checked)
    return problems


def check_portable(model: Any, name: str) -> None:
    """Raise one ConfigError naming ``name`` and the first problems of :func:`portability_problems`."""
    problems = portability_problems(model)
    if problems:
        more = f" and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise ConfigError(f"{name}: the ONNX graph is not portable: {'; '.join(problems[:SHOWN_PROBLEMS])}"
                          f"{more} (an asag bug: please report it; a .pt2 export is not affected)")


class _Graph:
    """Shapes and constants of an inferred graph, and the checks of one node."""

    def __init__(self, onnx: Any, graph: Any, outer: _Graph | None = None) -> None:
        self.onnx = onnx
        self.shapes: dict[str, Shape] = dict(outer.shapes) if outer else {}
        self.types: dict[str, str] = dict(outer.types) if outer else {}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            tensor = info.type.tensor_type
            self.types[info.name] = onnx.TensorProto.DataType.Name(tensor.elem_type)
            if tensor.HasField("shape"):
                self.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                               for d in tensor.shape.dim)
        self.constants: dict[str, Any] = dict(outer.constants) if outer else {}
        for tensor in graph.initializer:
            self._add_constant(tensor.name, tensor)
        for node in graph.node:
            value = _attributes(onnx, node).get("value")
            if node.op_type == "Constant" and value is not None:
                self._add_constant(node.output[0], value)

    def _add_constant(self, name: str, tensor: Any) -> None:
        self.constants[name] = tensor
        self.shapes[name] = tuple(tensor.dims)
        self.types[name] = self.onnx.TensorProto.DataType.Name(tensor.data_type)

    def constant(self, name: str):
        """The numpy value of a constant input (None when it is computed)."""
        tensor = self.constants.get(name)
        return None if tensor is None else self.onnx.numpy_helper.to_array(tensor)

    def check(self, node: Any) -> Iterator[str]:
        if node.domain not in DEFAULT_DOMAINS:
            yield f"operator of domain {node.domain!r}"
        attributes = _attributes(self.onnx, node)
        if node.op_type not in CONTROL_FLOW and any(attr.type in (attr.GRAPH, attr.GRAPHS)
                                                    for attr in node.attribute):
            yield "holds a subgraph outside a control-flow operator"
        if node.op_type in SEQUENCE_OPERATORS:
            yield "a tensor sequence operator (a loop over rows, which OpenVINO cannot type inside a Loop)"
        check = getattr(self, f"_check_{node.op_type}", None)
        if check is not None:
            yield from check(node, attributes)

    def _known(self, name: str, what: str) -> tuple[tuple[int, ...] | None, str | None]:
        shape = self.shapes.get(name)
        if shape is None or None in shape:
            return None, f"the shape of {what} is unknown after shape inference"
        return shape, None

    def _data_indices_axis(self, node: Any, attributes: dict) -> tuple[Any, Any, int, str | None]:
        """Shapes of inputs 0 (data) and 1 (indices) and the ``axis`` of a gather / scatter of elements,
        or the problem that leaves them unknown."""
        data, problem = self._known(node.input[0], "data")
        indices, problem = (None, problem) if problem else self._known(node.input[1], "indices")
        if problem:
            return None, None, 0, problem
        return data, indices, attributes.get("axis", 0) % len(data), None

    def _check_GatherElements(self, node: Any, attributes: dict) -> Iterator[str]:
        data, indices, axis, problem = self._data_indices_axis(node, attributes)
        if problem:
            yield problem
            return
        if len(indices) != len(data) or any(i != d for i, d in _off_axis(indices, data, axis)):
            yield f"indices {list(indices)} differ from data {list(data)} off axis {axis}"

    def _check_ScatterElements(self, node: Any, attributes: dict) -> Iterator[str]:
        data, indices, axis, problem = self._data_indices_axis(node, attributes)
        if problem:
            yield problem
            return
        if self.shapes.get(node.input[2]) != indices:
            yield f"updates {self.shapes.get(node.input[2])} and indices {list(indices)} differ in shape"
        if len(indices) != len(data) or any(i > d for i, d in _off_axis(indices, data, axis)):
            yield f"indices {list(indices)} exceed data {list(data)} off axis {axis}"
        if _reduction(attributes) == "none" and indices[axis] > data[axis]:
            yield (f"{indices[axis]} entries scattered into {data[axis]} along axis {axis} without a "
                   "reduction (duplicate indices: undefined result)")

    def _check_ScatterND(self, node: Any, attributes: dict) -> Iterator[str]:
        if _reduction(attributes) != "none":
            return
        data, problem = self._known(node.input[0], "data")
        indices, problem = (None, problem) if problem else self._known(node.input[1], "indices")
        if problem:
            yield problem
            return
        updates, slots = math.prod(indices[:-1]), math.prod(data[:indices[-1]])
        if updates > slots:
            yield (f"{updates} updates into {slots} slots without a reduction (duplicate indices: undefined "
                   "result)")
            return
        value = self.constant(node.input[1])
        if value is not None:
            rows = value.reshape(-1, indices[-1]) % data[:indices[-1]] if value.size else value
            if len({tuple(row) for row in rows.tolist()}) < updates:
                yield "constant indices with duplicates, without a reduction (undefined result)"

    def _check_TopK(self, node: Any, attributes: dict) -> Iterator[str]:
        if "sorted" not in attributes:
            yield "sorted not written out (order matters: write sorted=1)"
        elif attributes["sorted"] != 1:
            yield "sorted=0: the order of the results is undefined"
        shape = self.shapes.get(node.input[0])
        k = self.constant(node.input[1])
        if k is None:
            yield "k is not a constant"
        elif shape is not None and shape[attributes.get("axis", -1) % len(shape)] is not None:
            length = shape[attributes.get("axis", -1) % len(shape)]
            if not 0 <= int(k.reshape(-1)[0]) <= length:
                yield f"k={int(k.reshape(-1)[0])} outside the axis of length {length}"

    def _check_Mod(self, node: Any, attributes: dict) -> Iterator[str]:
        if self.types.get(node.input[0]) in FLOAT_TYPES and attributes.get("fmod", 0) != 1:
            yield "floating-point Mod without fmod=1"


def _attributes(onnx: Any, node: Any) -> dict:
    return {attr.name: onnx.helper.get_attribute_value(attr) for attr in node.attribute}


def _off_axis(first: tuple[int, ...], second: tuple[int, ...], axis: int) -> list[tuple[int, int]]:
    """The pairs of sizes of two shapes of the same rank in every dimension but ``axis``."""
    return [pair for k, pair in enumerate(zip(first, second)) if k != axis]


def _reduction(attributes: dict) -> str:
    value = attributes.get("reduction", b"none")
    return value.decode() if isinstance(value, bytes) else value
