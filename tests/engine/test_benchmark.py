"""Benchmark engine and the ``asag benchmark`` command (tiny CPU model, small images)."""

import json
import mmap

import pytest
import torch

from asag.build import build_model
from asag.cli import main
from asag.config import load_config
from asag.data.synthetic import generate_synthetic
from asag.engine.benchmark import (
    STAGES,
    BenchmarkSettings,
    MemoryProbe,
    StageTimer,
    benchmark,
    count_patches,
    craft_probing_biases,
    fixed_anchors,
    random_inputs,
    run_stages,
    scan_dataset,
    timing_stats,
)
from asag.structures import AnchorOutput, PatchPredictions

SIZE = (128, 160)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_model(load_config("tiny_cpu")).eval()
    craft_probing_biases(model.anchor_generator)
    return model


def test_stages_reproduce_forward_and_postprocess(tiny):
    inputs = random_inputs(2, SIZE, seed=1)
    with torch.inference_mode():
        reference = tiny(inputs.images, inputs.image_sizes)
        detections = tiny.postprocess(reference, inputs.orig_sizes)
        staged = run_stages(tiny, inputs)
    assert sum(count_patches(reference.anchors, 2).values()) > 0  # the crafted biases make it probe
    torch.testing.assert_close(staged.output.anchors.boxes, reference.anchors.boxes, rtol=0, atol=0)
    for ours, ref in zip(staged.output.heads, reference.heads):
        torch.testing.assert_close(ours.logits, ref.logits, rtol=0, atol=0)
        torch.testing.assert_close(ours.boxes, ref.boxes, rtol=0, atol=0)
    for ours, ref in zip(staged.detections, detections):
        torch.testing.assert_close(ours.scores, ref.scores, rtol=0, atol=0)


def test_stage_timer_sees_every_stage_once_per_run(tiny):
    timer = StageTimer(torch.device("cpu"))
    with torch.inference_mode():
        run_stages(tiny, random_inputs(1, SIZE), probe=timer)
        run_stages(tiny, random_inputs(1, SIZE), probe=timer)
    assert tuple(timer.seconds) == STAGES
    assert all(len(v) == 2 and min(v) > 0 for v in timer.seconds.values())


def test_fixed_queries_replace_the_anchors(tiny):
    boxes, valid = fixed_anchors(torch.tensor([[100, 200], [60, 80]]), 7)
    assert boxes.shape == (2, 7, 4) and bool(valid.all())
    assert bool((boxes[0, :, 0] <= 200).all() and (boxes[1, :, 1] <= 60).all() and (boxes[..., 2:] > 0).all())
    with torch.inference_mode():
        run = run_stages(tiny, random_inputs(2, SIZE), num_queries=7)
    assert run.output.valid_mask.sum(dim=1).tolist() == [7, 7]
    assert run.output.heads[-1].logits.shape[1] == 7


def test_timing_stats_by_hand():
    stats = timing_stats([0.004, 0.001, 0.003, 0.002])
    assert stats.median == pytest.approx(2.5) and stats.min == pytest.approx(1.0)
    assert stats.max == pytest.approx(4.0) and stats.mean == pytest.approx(2.5) and stats.runs == 4
    assert stats.q1 <= stats.median <= stats.q3
    single = timing_stats([0.01])
    assert single.median == pytest.approx(10.0) and single.std == 0.0


def test_count_patches_skips_loss_only_and_coarse_levels():
    def level(name, images, loss_only=None):
        idx = torch.tensor(images)
        return PatchPredictions(name, torch.zeros(len(images), 2, 5), idx, loss_only=loss_only)

    anchors = AnchorOutput(
        [level("P6", [0, 1]), level("P5", [0, 1]), level("P4", [0, 0, 1], torch.tensor([False, True, False])),
         level("P3", [1])],
        torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool),
    )
    assert count_patches(anchors, 2) == {"P4": 2, "P3": 1}


def test_cpu_memory_probe_sees_an_allocation():
    size = 64 * 2**20
    probe = MemoryProbe(torch.device("cpu"))
    probe.start()
    # fresh anonymous pages, every one touched (freed heap memory could be reused without growing the RSS)
    with mmap.mmap(-1, size) as block:
        block[:: mmap.PAGESIZE] = b"x" * (size // mmap.PAGESIZE)
        grown = probe.stop()
    assert grown >= 0
    if probe.kind == "cpu_peak_rss_growth":
        assert grown >= 48 * 2**20


def test_benchmark_result_is_complete(tiny):
    settings = BenchmarkSettings(size=SIZE, warmup=0, repeats=2, num_queries=11)
    result = benchmark(tiny, settings, device=torch.device("cpu"), name="tiny", crafted=True)
    assert result.queries_per_image == 11 and result.fixed_queries == 11
    assert result.latency_ms.runs == 2 and result.fps > 0
    assert set(result.stage_ms) == set(STAGES)
    assert sum(result.stage_share.values()) == pytest.approx(1.0)
    assert result.flops.total.flops == sum(c.flops for c in result.flops.stages.values()) > 0
    assert result.parameters["total"] == sum(p.numel() for p in tiny.parameters())
    assert result.parameters["total"] == sum(result.parameters[s] for s in STAGES[:-1])
    json.dumps(result.to_dict())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, 2, seed=5, val_images=3)
    return root


def test_scan_counts_queries_per_image(tiny, data_root):
    from asag.build import build_dataset, build_loader

    cfg = load_config("tiny_cpu", [f"data.root={data_root}", "data.val_batch_size=1"])
    loader = build_loader(build_dataset(cfg.data, "val"), cfg.data, train=False)
    scan = scan_dataset(tiny, loader, torch.device("cpu"), max_images=2, recall=True)
    expected = []
    with torch.inference_mode():
        for i, batch in enumerate(loader):
            if i == 2:
                break
            expected.append(int(tiny(batch.images, batch.image_sizes).valid_mask.sum()))
    assert scan.num_images == 2 and scan.mean_queries == pytest.approx(sum(expected) / 2)
    assert scan.min_queries == min(expected) and scan.max_queries == max(expected)
    assert set(scan.recall) == {"anchors", "proposals"}


def test_command_writes_json_with_positive_numbers(data_root, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["benchmark", "tiny_cpu", "--size", "96x128", "--warmup", "0", "--repeats", "2",
            "--json", str(out), "--data", str(data_root), "--max-images", "2", "--recall"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    expected_keys = {"latency_ms", "fps", "stage_ms", "stage_share", "flops", "parameters", "peak_memory_mib",
                     "queries_per_image", "patches_per_image", "dataset", "image_size", "padded_size"}
    assert expected_keys <= set(result)
    assert result["image_size"] == [96, 128] and result["padded_size"] == [96, 128]
    assert result["latency_ms"]["median"] > 0 and result["fps"] > 0
    assert all(result["stage_ms"][s]["median"] > 0 for s in STAGES)
    assert result["flops"]["total"]["gmacs"] > 0 and result["flops"]["total"]["gflops"] > 0
    assert result["flops"]["total"]["flops"] == 2 * result["flops"]["total"]["macs"]
    assert result["parameters"]["total"] > 0 and result["queries_per_image"] > 0 and result["crafted"]
    assert result["dataset"]["num_images"] == 2
    recall = result["dataset"]["recall"]["anchors"]["ar"]["all"]
    assert set(recall) == {"100", "300", "1000"} and all(0 <= v <= 1 for v in recall.values())
    printed = capsys.readouterr().out
    assert "latency median" in printed and "AR@100" in printed


@pytest.mark.parametrize(("argv", "message"), [
    (["benchmark", "tiny_cpu", "--size", "800"], "HEIGHTxWIDTH"),
    (["benchmark", "tiny_cpu", "--recall"], "--data"),
    (["benchmark", "tiny_cpu", "--repeats", "0"], "--repeats"),
    (["benchmark", "no_such_preset"], "unknown preset"),
])
def test_command_errors_are_messages_with_exit_code_2(argv, message, capsys):
    # Range errors of numeric options come from argparse (SystemExit 2), the others from the command.
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_benchmark_on_cuda_reports_allocated_memory(tiny):
    settings = BenchmarkSettings(size=SIZE, warmup=1, repeats=2, count_flops=False)
    result = benchmark(tiny, settings, device=torch.device("cuda"), name="tiny")
    assert result.memory_kind == "cuda_max_allocated" and result.peak_memory_mib > 0
    assert result.latency_ms.median > 0
    tiny.cpu()
