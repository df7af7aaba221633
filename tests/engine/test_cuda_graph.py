"""CUDA graphs of the static model: refused on the CPU with a clear message; on CUDA (skipped here) the
replayed graphs give the eager static model's detections, one graph per batch size and size bucket."""

import pytest
import torch

from asag.api import Detector
from asag.build import build_model
from asag.cli import main
from asag.config import load_config
from asag.engine.benchmark import craft_probing_biases
from asag.engine.cuda_graph import CudaGraphDetector, bucket_size, check_cuda_graph_device
from asag.errors import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_buckets_round_each_side_up():
    assert bucket_size(160, 224) == (160, 224)
    assert bucket_size(161, 200) == (192, 224)
    assert bucket_size(800, 1216, bucket=128) == (896, 1280)


def test_cuda_graphs_are_refused_on_the_cpu(tiny_checkpoint, capsys, tmp_path):
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA device"):
        check_cuda_graph_device("cpu")
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA device"):
        Detector.from_checkpoint(tiny_checkpoint / "ckpt.pth", device="cpu", cuda_graph=True)
    image = sorted(p for p in (tiny_checkpoint / "data").rglob("*") if p.suffix in (".png", ".jpg"))[0]
    code = main(["predict", str(tiny_checkpoint / "ckpt.pth"), str(image), "--device", "cpu", "--cuda-graph",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "--cuda-graph needs a CUDA device" in capsys.readouterr().err


def test_cuda_graphs_need_the_static_model():
    model = build_model(load_config("tiny_cpu")).eval()
    with pytest.raises(ConfigError, match="static model"):
        CudaGraphDetector(model)


def static_cuda_model(decoder: str = "adamixer"):
    torch.manual_seed(0)
    cfg = load_config("tiny_cpu", [f"model.decoder.type={decoder}"])
    cfg.model.backbone.weights = None
    model = build_model(cfg)
    craft_probing_biases(model.anchor_generator)
    return model.cuda().eval().set_static(True)


@needs_cuda
@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
def test_replayed_graphs_equal_the_eager_static_model(decoder):
    model = static_cuda_model(decoder)
    graphs = CudaGraphDetector(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, sizes in [((2, 160, 224), [[160, 224], [128, 200]]), ((1, 128, 160), [[120, 150]]),
                         ((2, 160, 224), [[150, 210], [160, 224]])]:
        batch, h, w = shape
        images = torch.randn(batch, 3, h, w, device="cuda", generator=g)
        sizes = torch.tensor(sizes, device="cuda")
        with torch.no_grad():
            expected = model.detect(images, sizes, sizes * 2)
        got = graphs.detect(images, sizes, sizes * 2)
        assert torch.equal(got.valid, expected.valid) and torch.equal(got.labels, expected.labels)
        assert torch.allclose(got.scores, expected.scores, atol=1e-5)
        assert torch.allclose(got.boxes, expected.boxes, atol=1e-2)
    assert graphs.captured_shapes == [(1, 128, 160), (2, 160, 224)]  # the third call replayed the first graph


@needs_cuda
def test_a_coarser_bucket_pads_into_one_graph():
    graphs = CudaGraphDetector(static_cuda_model(), bucket=128)
    for h, w in [(160, 224), (192, 256)]:
        images = torch.randn(1, 3, h, w, device="cuda")
        sizes = torch.tensor([[h, w]], device="cuda")
        assert graphs.detect(images, sizes, sizes).valid.shape[0] == 1
    assert graphs.captured_shapes == [(1, 256, 256)]
