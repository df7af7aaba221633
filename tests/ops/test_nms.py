"""Fixed-shape greedy NMS against torchvision's ``nms`` / ``batched_nms`` (random boxes, ties included),
and its exported graphs (one loop whatever the budget) in ONNX Runtime and OpenVINO."""

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms, nms

from asag.engine.syncs import SyncAudit
from asag.ops.nms import DATA_ROUND, fixed_budget_nms, sorted_nms_keep


def grid_boxes(draw, rows: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes on a coarse integer grid (exact IoU ties, duplicates, empty boxes) and scores from a few
    values (score ties)."""
    coords = draw(st.lists(st.integers(0, 12), min_size=rows * num * 4, max_size=rows * num * 4))
    xy = torch.tensor(coords, dtype=torch.float32).view(rows, num, 2, 2) * 2.5
    boxes = torch.cat([xy.min(dim=2).values, xy.max(dim=2).values], dim=-1)  # [B, M, 4] xyxy
    levels = draw(st.lists(st.integers(0, 4), min_size=rows * num, max_size=rows * num))
    return boxes, torch.tensor(levels, dtype=torch.float32).view(rows, num) / 4


@st.composite
def nms_problems(draw):
    rows, num = draw(st.integers(1, 3)), draw(st.integers(1, 24))
    boxes, scores = grid_boxes(draw, rows, num)
    candidates = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * num, max_size=rows * num)))
    threshold = draw(st.sampled_from([0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.8, 1.0]))
    return boxes, scores, candidates.view(rows, num), threshold


def reference(boxes, scores, candidates, threshold):
    """Per row: torchvision's kept columns in its (descending score) order."""
    out = []
    for b in range(boxes.shape[0]):
        columns = candidates[b].nonzero()[:, 0]
        out.append(columns[nms(boxes[b, columns], scores[b, columns], threshold)].tolist())
    return out


@settings(max_examples=150, deadline=None)
@given(nms_problems(), st.integers(0, 30))
def test_fixed_budget_nms_is_torchvision_nms_truncated(problem, budget):
    boxes, scores, candidates, threshold = problem
    result = fixed_budget_nms(boxes, scores, candidates, threshold, budget)
    assert result.index.shape == result.kept.shape == (boxes.shape[0], budget)
    for b, expected in enumerate(reference(boxes, scores, candidates, threshold)):
        kept = result.kept[b]
        assert kept.tolist() == [t < len(expected) for t in range(budget)]  # a prefix
        assert result.index[b][kept].tolist() == expected[:budget]
        assert bool(result.overflow[b]) == (len(expected) > budget)


@settings(max_examples=150, deadline=None)
@given(nms_problems(), st.integers(1, 3))
def test_sorted_nms_keep_is_batched_nms(problem, num_groups):
    boxes, scores, candidates, threshold = problem
    scores, order = scores.sort(dim=1, descending=True, stable=True)  # rows sorted as after a top-k
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    groups = torch.arange(boxes.shape[1]).expand(boxes.shape[0], -1) % num_groups
    keep = sorted_nms_keep(boxes, groups, candidates, threshold)
    for b in range(boxes.shape[0]):
        columns = candidates[b].nonzero()[:, 0]
        kept = batched_nms(boxes[b, columns], scores[b, columns], groups[b, columns], threshold)
        assert sorted(columns[kept].tolist()) == keep[b].nonzero()[:, 0].tolist()


@settings(max_examples=100, deadline=None)
@given(nms_problems(), st.sampled_from([None, 1, 3]))
def test_data_sized_nms_is_torchvision_nms(problem, limit):
    """``max_kept=None``: the data sizes the budget, so nothing binds (below ``limit``): every row's kept
    columns are torchvision's, the slots are as many as the longest row needs, the counts are read once."""
    boxes, scores, candidates, threshold = problem
    with SyncAudit() as audit:
        result = fixed_budget_nms(boxes, scores, candidates, threshold, None, limit=limit)
    expected = [e if limit is None else e[:limit] for e in reference(boxes, scores, candidates, threshold)]
    assert result.counts == [len(e) for e in expected]
    assert result.index.shape[1] == max(len(e) for e in expected)
    for b, columns in enumerate(expected):
        assert result.index[b][result.kept[b]].tolist() == columns
    assert audit.ops.get("tolist", 0) <= 2  # 24 columns at most: rounds of 16, then 32 steps


def test_data_sized_nms_runs_rounds_until_no_candidate_is_left():
    """More kept boxes than one round: a second round, one more host read."""
    num = DATA_ROUND + 4
    boxes = torch.stack([torch.tensor([3.0 * i, 0, 3.0 * i + 1, 1]) for i in range(num)])[None]  # disjoint
    scores = torch.linspace(1.0, 0.1, num)[None]
    everything = torch.ones(1, num, dtype=torch.bool)
    with SyncAudit() as audit:
        result = fixed_budget_nms(boxes, scores, everything, 0.5, None)
    assert result.counts == [num] and result.index[0].tolist() == list(range(num))
    assert audit.ops == {"tolist": 2} and not result.overflow.any()
    assert fixed_budget_nms(boxes, scores, everything, 0.5, None, limit=5).overflow.tolist() == [True]


def test_fixed_budget_nms_hand_computed():
    # 0 and 1 overlap with IoU 2 / 6, 2 is apart; the scores of 1 and 2 tie
    boxes = torch.tensor([[[0.0, 0, 2, 2], [1, 0, 3, 2], [10, 10, 12, 12]]])
    scores = torch.tensor([[0.5, 0.9, 0.9]])
    everything = torch.ones(1, 3, dtype=torch.bool)
    result = fixed_budget_nms(boxes, scores, everything, 0.3, 3)
    # 1 first (tie with 2 broken by column), then 2; 0 is suppressed by 1 (IoU 2/6 > 0.3)
    assert result.index[0, :2].tolist() == [1, 2] and result.kept.tolist() == [[True, True, False]]
    assert not bool(result.overflow[0])
    assert fixed_budget_nms(boxes, scores, everything, 0.5, 3).kept.tolist() == [[True, True, True]]
    bound = fixed_budget_nms(boxes, scores, everything, 0.5, 2)  # IoU 1/3 is not > 0.5: all three survive
    assert bound.index.tolist() == [[1, 2]] and bool(bound.overflow[0])


def test_threshold_comparison_is_torchvision_s_float64_one():
    # IoU 1 / 10 rounds up in float32 (0.100000001 > 0.1): torchvision, comparing in float64, suppresses
    boxes = torch.tensor([[[0.0, 0, 10, 1], [0, 0, 1, 1]]])
    scores = torch.tensor([[0.9, 0.8]])
    everything = torch.ones(1, 2, dtype=torch.bool)
    assert nms(boxes[0], scores[0], 0.1).tolist() == [0]
    assert fixed_budget_nms(boxes, scores, everything, 0.1, 2).kept.tolist() == [[True, False]]
    one_group = torch.zeros(1, 2, dtype=torch.long)
    assert sorted_nms_keep(boxes, one_group, everything, 0.1).tolist() == [[True, False]]


# ------------------------------------------------------------------------------------------ export

EXPORT_ROWS, EXPORT_COLUMNS = 2, 24  # the fixed [B, M] of the exported NMS
EXPORT_THRESHOLD = 0.5
SMALL_BUDGET, LARGE_BUDGET = 4, 40  # the large one exceeds M: rows run out of candidates


class BudgetNMS(torch.nn.Module):
    """``fixed_budget_nms`` with a fixed budget as a module of tensors (for the exporters)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def forward(self, boxes, scores, candidates):
        result = fixed_budget_nms(boxes, scores, candidates, EXPORT_THRESHOLD, self.budget)
        return result.index, result.kept, result.overflow


def export_problems(count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Seeded ``[B, M]`` problems on a coarse grid (overlap chains, exact ties of IoU and score)."""
    problems = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        xy = torch.randint(0, 13, (EXPORT_ROWS, EXPORT_COLUMNS, 2, 2), generator=g).float() * 2.5
        boxes = torch.cat([xy.min(dim=2).values, xy.max(dim=2).values], dim=-1)
        scores = torch.randint(0, 5, (EXPORT_ROWS, EXPORT_COLUMNS), generator=g).float() / 4
        problems.append((boxes, scores, torch.rand(EXPORT_ROWS, EXPORT_COLUMNS, generator=g) > 0.2))
    return problems


def node_count(graph) -> int:
    """Nodes of an ONNX graph, those of its subgraphs (a Loop's body) included."""
    onnx = pytest.importorskip("onnx")
    return sum(1 + sum(node_count(a.g) for a in node.attribute if a.type == onnx.AttributeProto.GRAPH)
               for node in graph.node)


def onnx_nms(budget: int, folder) -> bytes:
    """ONNX bytes of :class:`BudgetNMS` written by the project's exporter."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from asag.export import write_exported

    out = folder / f"nms{budget}.onnx"
    return write_exported(BudgetNMS(budget).eval(), export_problems(1)[0], out, {}, "onnx").read_bytes()


@pytest.fixture(scope="module")
def exported_nms(tmp_path_factory) -> bytes:
    """ONNX bytes of :class:`BudgetNMS` at the large budget (once per module)."""
    return onnx_nms(LARGE_BUDGET, tmp_path_factory.mktemp("nms_export"))


def test_exported_nms_graph_does_not_grow_with_the_budget(exported_nms):
    """The greedy steps are one loop whatever the budget (not unrolled once per step): one ONNX Loop, and
    torch.export's graph (the .pt2 format) has as many nodes at a budget of 4 as at 40."""
    onnx = pytest.importorskip("onnx")
    assert [node.op_type for node in onnx.load_from_string(exported_nms).graph.node].count("Loop") == 1
    graphs = [torch.export.export(BudgetNMS(budget).eval(), export_problems(1)[0], strict=False).graph
              for budget in (SMALL_BUDGET, LARGE_BUDGET)]
    assert len(graphs[0].nodes) == len(graphs[1].nodes)
    assert [node.target for node in graphs[1].nodes].count(torch.ops.higher_order.while_loop) == 1


@pytest.mark.slow  # two ONNX exports, about 10 s
def test_exported_onnx_nms_has_as_many_nodes_at_any_budget(exported_nms, tmp_path):
    onnx = pytest.importorskip("onnx")
    small = onnx.load_from_string(onnx_nms(SMALL_BUDGET, tmp_path)).graph
    assert node_count(small) == node_count(onnx.load_from_string(exported_nms).graph)


def runtime_outputs(run, problems) -> None:
    """``run(inputs) -> outputs`` equals the eager module on every problem, at the large budget."""
    eager = BudgetNMS(LARGE_BUDGET)
    for problem in problems:
        expected = eager(*problem)
        got = run([t.numpy() for t in problem])
        for out, ref in zip(got, expected):
            assert torch.equal(torch.from_numpy(np.asarray(out)), ref)


def test_exported_nms_runs_in_onnx_runtime_as_eager(exported_nms):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(exported_nms, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    runtime_outputs(lambda inputs: session.run(None, dict(zip(names, inputs))), export_problems(10))


def test_exported_nms_runs_in_openvino_as_eager(exported_nms):
    """Also with empty boxes: their NaN IoU must not suppress (OpenVINO's ``Greater(NaN, t)`` is True)."""
    ov = pytest.importorskip("openvino")
    core = ov.Core()
    compiled = core.compile_model(core.read_model(exported_nms, b""), "CPU")
    runtime_outputs(lambda inputs: [compiled(inputs)[out] for out in compiled.outputs], export_problems(10))


class SortedNMS(torch.nn.Module):
    """``sorted_nms_keep`` (two groups) as a module of tensors: rows already sorted by descending score."""

    def forward(self, boxes, groups, candidates):
        return sorted_nms_keep(boxes, groups, candidates, EXPORT_THRESHOLD)


def sorted_problem(problem, columns: int = EXPORT_COLUMNS) -> tuple[torch.Tensor, ...]:
    """A problem of :func:`export_problems` (its first ``columns``) sorted by score, in two groups."""
    boxes, scores, candidates = (t[:, :columns] for t in problem)
    order = scores.sort(dim=1, descending=True, stable=True).indices
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    return boxes, torch.arange(columns).expand(EXPORT_ROWS, -1) % 2, candidates


def test_exported_sorted_nms_is_one_loop_that_runtimes_run_as_eager(tmp_path):
    """The post-processing NMS loops over the top-k columns: one ONNX Loop / while_loop, as many graph
    nodes for 8 columns as for 24; ONNX Runtime and OpenVINO (when installed) give the eager masks."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from asag.export import write_exported

    first = export_problems(1)[0]
    graphs = [torch.export.export(SortedNMS(), sorted_problem(first, columns), strict=False).graph
              for columns in (8, EXPORT_COLUMNS)]
    assert len(graphs[0].nodes) == len(graphs[1].nodes)
    problems = [sorted_problem(problem) for problem in export_problems(10)]
    data = write_exported(SortedNMS(), problems[0], tmp_path / "sorted.onnx", {}, "onnx").read_bytes()
    assert [node.op_type for node in onnx.load_from_string(data).graph.node].count("Loop") == 1
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    names = [node.name for node in session.get_inputs()]
    runtimes = [lambda inputs: session.run(None, dict(zip(names, inputs)))[0]]
    with contextlib.suppress(ImportError):
        import openvino

        compiled = openvino.Core().compile_model(openvino.Core().read_model(data, b""), "CPU")
        runtimes.append(lambda inputs: compiled(inputs)[compiled.outputs[0]])
    for problem in problems:
        expected = SortedNMS()(*problem)
        for run in runtimes:
            assert torch.equal(torch.from_numpy(np.asarray(run([t.numpy() for t in problem]))), expected)
