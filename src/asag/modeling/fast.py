"""Inference-optimised ASAG: folded batch norm, channels-last features, optional compile and precision.

:func:`optimize_for_inference` turns a trained (or converted) detector into a deployment copy:

* **batch-norm folding**: every frozen or eval-mode batch norm that directly follows a convolution of
  the backbone (torchvision ResNet layout) is folded into that convolution's weight and bias
  (``W' = W * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``);
* **channels-last** memory format for the backbone and FPN convolutions and their input (oneDNN's and
  cuDNN's preferred layout); the FPN levels stay channels-last for the anchor generator and for RoI
  pooling, which becomes one weighted gather of channel vectors
  (:class:`~asag.modeling.roi_pooling.RoIPooling` of kind ``gather``, equal to torchvision's RoIAlign
  up to rounding); an AdaMixer decoder (``grid_sample``) gets the levels in the default layout;
* **no autograd state**: parameters stop requiring gradients and every forward runs under
  :func:`torch.inference_mode`;
* optional **torch.compile** of the static parts (backbone + FPN, decoder heads); the data-dependent
  anchor generator, query preparation, proposal stage and post-processing stay eager;
* optional **reduced precision** (``float16`` on CUDA, ``bfloat16`` on CUDA or on CPUs with native
  bf16): the backbone and FPN weights are cast and the features are cast back to float32 before the
  anchor generator, as the release's autocast does on GPU (spec section 1); everything after the FPN
  runs in float32.

With the default settings (fold + channels-last, float32) the outputs equal the plain model's up to
float rounding (tested against the official fixtures). Measurements and usage: ``docs/inference.md``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d as TorchvisionFrozenBN

from asag.engine.host_memory import HOST_MEMORY_CHOICES
from asag.errors import ConfigError
from asag.modeling.backbone import FrozenBatchNorm2d
from asag.modeling.detector import ASAG, FeatureFormat
from asag.modeling.roi_pooling import RoIPooling

# ``--precision`` names -> dtype of the backbone and FPN (None = float32, no cast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Convolution / batch-norm attribute pairs of torchvision's residual blocks (conv_i feeds bn_i directly).
BLOCK_CONV_BN_PAIRS: dict[type, tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}
# Containers that run their children in registration order (a conv child followed by a norm child is
# a conv -> norm chain): ``nn.Sequential`` (ResNet ``downsample``) and torchvision's
# ``IntermediateLayerGetter`` (the ResNet stem ``conv1 -> bn1``).
ORDERED_CONTAINERS = (nn.Sequential, IntermediateLayerGetter)


# ------------------------------------------------------------------------------------- precision


def resolve_precision(precision: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32" | "fp16" | "bf16"`` (or a dtype, or None) -> the feature dtype (None for float32)."""
    if precision is None or precision == torch.float32:
        return None
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise ConfigError(f"precision {precision} is not supported; use one of {sorted(PRECISIONS)}")
        return precision
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bfloat16 kernels on this processor (e.g. AVX512-BF16, AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx() -> bool:
    """True when the processor has AMX tiles (Intel Sapphire Rapids and later)."""
    is_supported = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, but the only query torch has
    return bool(is_supported is not None and is_supported())


def check_precision(dtype: torch.dtype | None, device: torch.device | str) -> None:
    """Reject a precision the device cannot run fast (:class:`ConfigError` naming the option)."""
    device = torch.device(device)
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("precision fp16 needs a CUDA device; use bf16 (or fp32) on the CPU")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_supports_bf16():
        raise ConfigError("precision bf16: this CPU has no native bfloat16 support (AVX512-BF16/AMX); "
                          "use fp32")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision bf16: this GPU does not support bfloat16; use fp16")


def add_inference_arguments(parser) -> None:
    """The ``--fast``, ``--compile``, ``--static``, ``--precision`` and ``--host-memory`` options of ``asag
    predict | eval | benchmark`` (the last is applied by :func:`asag.engine.host_memory.configure_host_memory`
    once the device is known)."""
    parser.add_argument("--fast", action="store_true",
                        help="fold batch norms, channels-last backbone/FPN, RoIAlign as a gather "
                             "(same outputs up to rounding)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile backbone, FPN and decoder heads (slow first call)")
    parser.add_argument("--static", action="store_true",
                        help="static mode: fixed shapes and budgets, no host reads in the forward (same "
                             "detections where no budget binds; docs/inference.md)")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="backbone/FPN precision: fp16 (CUDA) or bf16 (CUDA, CPUs with bf16); see "
                             "docs/inference.md for the AP effect")
    parser.add_argument("--host-memory", choices=HOST_MEMORY_CHOICES, default="auto",
                        help="auto: on the CPU keep freed memory in the process for the next tensors "
                             "instead of faulting in fresh pages (glibc; same outputs); system: leave the "
                             "C allocator alone (runtime.host_memory, docs/inference.md)")


# ------------------------------------------------------------------------------------ BN folding


def _norm_statistics(norm: nn.Module) -> tuple[Tensor, Tensor, float, Tensor | None, Tensor | None] | None:
    """``(mean, var, eps, gamma, beta)`` of a batch norm that applies fixed statistics, else None."""
    if isinstance(norm, FrozenBatchNorm2d | TorchvisionFrozenBN):
        return norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    if isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_mean is not None:
        return norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
    return None


def fold_conv_bn(conv: nn.Conv2d, norm: nn.Module) -> nn.Conv2d | None:
    """A new convolution computing ``norm(conv(x))``, or None when ``norm`` cannot be folded.

    Folding (``norm`` with fixed statistics): ``W' = W * s``, ``b' = (b - mean) * s + beta``,
    ``s = gamma / sqrt(var + eps)`` per output channel (torch's ``fuse_conv_bn_weights``).
    """
    stats = _norm_statistics(norm)
    if stats is None or not isinstance(conv, nn.Conv2d):
        return None
    mean, var, eps, gamma, beta = stats
    fused = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(conv.weight.detach(), _detached(conv.bias), mean, var, eps,
                                        _detached(gamma), _detached(beta))
    fused.weight, fused.bias = weight, bias
    return fused


def _detached(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach()


def _fold_pair(parent: nn.Module, conv_name: str, norm_name: str) -> bool:
    """Fold ``parent.norm_name`` into ``parent.conv_name``; the norm becomes ``nn.Identity``."""
    fused = fold_conv_bn(getattr(parent, conv_name), getattr(parent, norm_name))
    if fused is None:
        return False
    setattr(parent, conv_name, fused)
    setattr(parent, norm_name, nn.Identity())
    return True


def _fold_pairs_of(module: nn.Module) -> int:
    """Fold the known conv -> norm pairs among ``module``'s direct children."""
    if isinstance(module, ORDERED_CONTAINERS):
        names = [name for name, _ in module.named_children()]
        return sum(_fold_pair(module, a, b) for a, b in zip(names, names[1:]))
    pairs = next((p for cls, p in BLOCK_CONV_BN_PAIRS.items() if isinstance(module, cls)), ())
    return sum(_fold_pair(module, conv, norm) for conv, norm in pairs)


def fold_batch_norms(module: nn.Module) -> int:
    """Fold, in place, every batch norm with fixed statistics into the convolution feeding it.

    Recognised chains: consecutive children of ``nn.Sequential`` / ``IntermediateLayerGetter`` and the
    ``conv_i -> bn_i`` pairs of torchvision's ``BasicBlock`` / ``Bottleneck``, i.e. every norm of a
    torchvision ResNet. Norms that cannot be folded (group norm, batch norm in training mode) are left
    in place. Returns the number of folded norms.
    """
    folded = 0
    for child in list(module.children()):
        folded += fold_batch_norms(child)
    return folded + _fold_pairs_of(module)


# ------------------------------------------------------------------------------------ fast model


def _compile_options(device_type: str) -> dict:
    """Inductor options: on the CPU, freeze the weights (constant folding and oneDNN weight prepacking)."""
    return {"freezing": True} if device_type == "cpu" else {}


def _prepare_features(model: ASAG, fold_bn: bool, memory_format: torch.memory_format,
                      dtype: torch.dtype | None) -> None:
    """Fold, cast and re-layout backbone and FPN in place; the model's :class:`FeatureFormat` converts the
    images to match (the levels leave :meth:`ASAG.extract_features` as float32)."""
    if fold_bn:
        fold_batch_norms(model.backbone)
    for part in (model.backbone, model.neck):
        part.to(dtype=dtype, memory_format=memory_format)
    model.feature_format = FeatureFormat(dtype, memory_format)


def _gather_from_channels_last(model: ASAG) -> None:
    """RoI pooling gathers channel vectors straight from the channels-last levels (kind ``gather``); heads
    without RoI pooling get the levels in the default layout from :class:`ParallelHeads` itself."""
    for pooling in model.modules():
        if isinstance(pooling, RoIPooling):
            pooling.kind = "gather"


def optimize_for_inference(
    model: ASAG,
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> ASAG:
    """An inference-optimised copy of ``model`` (the original is left untouched).

    Args:
        model: a plain detector (trained, converted or freshly built).
        fold_bn: fold frozen / eval-mode batch norms into the backbone convolutions.
        channels_last: run backbone and FPN in the channels-last memory format; the levels stay
            channels-last for the anchor generator and the RoI pooling, which becomes a gather
            (:class:`RoIPooling` kind ``gather``); an AdaMixer decoder gets them in the default layout.
        compile: ``torch.compile`` the backbone, the FPN and the decoder heads (the first calls compile,
            and every new input shape may recompile; on the CPU inductor needs a C++ compiler). The
            anchor generator, proposal stage and post-processing stay eager.
        dtype: backbone / FPN precision: None or ``"fp32"``, ``"fp16"`` (CUDA), ``"bf16"``; checked
            against ``device`` (default: the model's device) by :func:`check_precision`.
    Returns:
        a transformed deep copy (the same :class:`~asag.modeling.detector.ASAG` class, every setting kept)
        in evaluation mode whose parameters do not require gradients; its ``inference_settings`` record
        what was applied (``fold_bn``, ``channels_last``, ``compile``, ``dtype``): every forward runs under
        ``torch.inference_mode`` and it cannot be put back into training mode.
    """
    feature_dtype = resolve_precision(dtype)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    check_precision(feature_dtype, device)
    fast = copy.deepcopy(model).eval().requires_grad_(False)  # transformed in place below
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    _prepare_features(fast, fold_bn, memory_format, feature_dtype)
    if channels_last:
        _gather_from_channels_last(fast)
    fast.inference_settings = {"fold_bn": fold_bn, "channels_last": channels_last, "compile": compile,
                               "dtype": str(feature_dtype or torch.float32).removeprefix("torch.")}
    if compile:
        options = _compile_options(device.type)
        for part in (fast.backbone, fast.neck):
            part.compile(options=options)
        fast.decoder.compile(dynamic=True, options=options)
    return fast
