"""CUDA graphs of the static detector: one capture of :meth:`ASAG.detect` per batch size and input-size
bucket, replayed for every later batch of that shape (docs/inference.md, "CUDA graphs").

A replay launches the whole forward and post-processing at once, so the many small kernels of the
anchor generator, the proposal stage and the decoder cost one launch; this needs the static mode (fixed
shapes, no host reads). **Size buckets**: a padded batch ``[B, 3, h, w]`` runs in the graph of
``(B, ceil(h / bucket) * bucket, ceil(w / bucket) * bucket)``; its images are copied into the top-left
corner of that graph's zero-padded input. With the default ``bucket=32`` (the data pipeline's own
padding) a batch runs on exactly the input the eager model sees, so the detections are the static
model's; a coarser bucket (e.g. 128) needs fewer graphs but pads more, which changes the features near
the padded border as a larger batch padding does (docs/performance.md, evaluation batch size).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from asag.errors import ConfigError
from asag.modeling.detector import ASAG
from asag.structures import DetectionBatch, Detections

# Side multiple of the graphs' input sizes (the collate padding, SIZE_DIVISIBILITY of asag.data).
DEFAULT_BUCKET = 32
# Eager calls on a side stream before a capture (cuDNN / cuBLAS choose their kernels, allocations settle).
WARMUP_CALLS = 3
# Graphs kept at once; the least recently used one is dropped beyond this.
MAX_GRAPHS = 16


@dataclass
class _Captured:
    """One captured graph with its static input and output tensors."""

    graph: torch.cuda.CUDAGraph
    images: Tensor  # [B, 3, H, W]
    image_sizes: Tensor  # [B, 2] int64
    orig_sizes: Tensor  # [B, 2] int64
    output: DetectionBatch


def bucket_size(height: int, width: int, bucket: int = DEFAULT_BUCKET) -> tuple[int, int]:
    """The graph input size ``(H, W)`` of a padded ``height x width`` batch: each side rounded up to a
    multiple of ``bucket``."""
    return math.ceil(height / bucket) * bucket, math.ceil(width / bucket) * bucket


def check_cuda_graph_device(device: torch.device | str) -> None:
    if torch.device(device).type != "cuda":
        raise ConfigError(f"--cuda-graph needs a CUDA device (got device {str(device)!r}); CUDA graphs do "
                          "not exist on the CPU")
    if not torch.cuda.is_available():
        raise ConfigError("--cuda-graph needs a CUDA device, and CUDA is not available")


class CudaGraphDetector(nn.Module):
    """Replays CUDA graphs of ``model.detect`` (``model``: static, evaluation mode, on a CUDA device).

    ``detect(images, image_sizes, orig_sizes)`` and ``predict(...)`` take the same padded batch as the
    model (``[B, 3, h, w]`` normalised images, ``[B, 2]`` int64 sizes) and return its
    :class:`DetectionBatch` / per-image :class:`Detections` (copies: the graph's outputs are reused).
    """

    def __init__(self, model: ASAG, bucket: int = DEFAULT_BUCKET, max_graphs: int = MAX_GRAPHS) -> None:
        super().__init__()
        if not isinstance(model, ASAG) or model.training or not model.static:
            raise ConfigError("CUDA graphs need the static model in evaluation mode (static=True / --static)")
        if bucket < 1 or bucket % DEFAULT_BUCKET:
            raise ConfigError(f"CUDA graph bucket {bucket}: must be a positive multiple of {DEFAULT_BUCKET}")
        check_cuda_graph_device(next(model.parameters()).device)
        self.model = model
        self.bucket = bucket
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple[int, int, int], _Captured] = OrderedDict()
        self._pool = None  # one memory pool shared by all graphs (they never run at the same time)

    @property
    def static(self) -> bool:
        return True

    def train(self, mode: bool = True) -> CudaGraphDetector:
        if mode:
            raise ConfigError("a CUDA-graph detector is for inference only")
        return super().train(False)

    @property
    def captured_shapes(self) -> list[tuple[int, int, int]]:
        """``(B, H, W)`` of the graphs held now."""
        return list(self._graphs)

    def detect(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> DetectionBatch:
        # the graphs' buffers are ordinary tensors (no autograd), whether called in inference mode or not
        with torch.inference_mode(False), torch.no_grad():
            return self._replay(images, image_sizes, orig_sizes)

    def _replay(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> DetectionBatch:
        batch, _, height, width = images.shape
        key = (batch, *bucket_size(height, width, self.bucket))
        captured = self._graphs.get(key) or self._capture(*key)
        self._graphs.move_to_end(key)
        captured.images.zero_()
        captured.images[:, :, :height, :width].copy_(images)
        captured.image_sizes.copy_(image_sizes)
        captured.orig_sizes.copy_(orig_sizes)
        captured.graph.replay()
        out = captured.output
        return DetectionBatch(out.boxes.clone(), out.scores.clone(), out.labels.clone(), out.valid.clone())

    def predict(self, images: Tensor, image_sizes: Tensor, orig_sizes: Tensor) -> list[Detections]:
        return self.detect(images, image_sizes, orig_sizes).to_list()

    def _capture(self, batch: int, height: int, width: int) -> _Captured:
        """Warm up on a side stream, then capture ``model.detect`` on static inputs of this shape."""
        device = next(self.model.parameters()).device
        images = torch.zeros(batch, 3, height, width, device=device)
        sizes = torch.zeros(batch, 2, dtype=torch.int64, device=device)
        sizes[:, 0], sizes[:, 1] = height, width
        orig = sizes.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                self.model.detect(images, sizes, orig)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.model.detect(images, sizes, orig)
        self._pool = graph.pool()
        if len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        self._graphs[(batch, height, width)] = captured = _Captured(graph, images, sizes, orig, output)
        return captured
