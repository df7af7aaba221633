"""ResNet backbone with frozen batch-norm statistics (spec 2.1)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter

from asag.errors import CheckpointError

# Output channels of layer1..layer4 per ResNet depth.
RESNET_CHANNELS = {
    "resnet10": [64, 128, 256, 512],
    "resnet18": [64, 128, 256, 512],
    "resnet34": [64, 128, 256, 512],
    "resnet50": [256, 512, 1024, 2048],
    "resnet101": [256, 512, 1024, 2048],
}
RESNET_STRIDES = [4, 8, 16, 32]
# Depths torchvision has no constructor for: (block, blocks per layer). ResNet-10, one basic block per
# layer (half of ResNet-18's blocks), is for small from-scratch models such as the CPU demo.
EXTRA_RESNETS = {"resnet10": (resnet.BasicBlock, [1, 1, 1, 1])}
FEATURE_NAMES = ["C2", "C3", "C4", "C5"]


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics: ``y = x * s + t``, ``s = weight / sqrt(var + eps)``,
    ``t = bias - mean * s``.

    Unlike torchvision's class, ``weight`` and ``bias`` are parameters, as in the authors' release
    (spec 2.1 and 13.4); whether they train is decided by ``requires_grad``. ``num_batches_tracked``
    entries of loaded state dicts are ignored.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


# Group count of the group-norm option (Wu & He, 2018).
GROUP_NORM_GROUPS = 32
NORM_LAYERS = {
    "frozen_bn": FrozenBatchNorm2d,
    "batch_norm": lambda c, eps: nn.BatchNorm2d(c, eps=eps),
    "group_norm": lambda c, eps: nn.GroupNorm(min(GROUP_NORM_GROUPS, c), c, eps=eps),
}


class Backbone(nn.Module):
    """torchvision ResNet returning ``C2..C5`` (strides 4, 8, 16, 32).

    Args:
        name: ``resnet18 | resnet34 | resnet50 | resnet101``, or ``resnet10`` (torchvision's ``ResNet``
            with one basic block per layer).
        norm: ``frozen_bn`` (the release; for ImageNet-initialised backbones), or ``batch_norm`` /
            ``group_norm`` for backbones trained from scratch (e.g. the CPU demo), where fixed identity
            statistics would leave the deep network unnormalised.
        trainable_layers: a parameter trains only if its name contains one of these (the release
            freezes the stem and ``layer1``).
        freeze_bn_affine: also freeze the FrozenBN affine terms (the release trains them).
        eps: FrozenBN epsilon.

    Input ``[B, 3, H, W]`` normalised images; output ``OrderedDict`` ``C2..C5`` of ``[B, c_l, H/s, W/s]``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        norm: str = "frozen_bn",
        trainable_layers: tuple[str, ...] | list[str] = ("layer2", "layer3", "layer4"),
        freeze_bn_affine: bool = False,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if name not in RESNET_CHANNELS:
            raise ValueError(f"unsupported backbone {name!r}; choose one of {sorted(RESNET_CHANNELS)}")
        if norm not in NORM_LAYERS:
            raise ValueError(f"unsupported backbone norm {norm!r}; choose one of {sorted(NORM_LAYERS)}")
        def norm_layer(channels: int) -> nn.Module:
            return NORM_LAYERS[norm](channels, eps)

        if name in EXTRA_RESNETS:
            net = resnet.ResNet(*EXTRA_RESNETS[name], norm_layer=norm_layer)
        else:
            net = getattr(resnet, name)(weights=None, norm_layer=norm_layer)
        self.body = IntermediateLayerGetter(
            net, return_layers={f"layer{i + 1}": n for i, n in enumerate(FEATURE_NAMES)}
        )
        self.out_channels = RESNET_CHANNELS[name]
        self.strides = RESNET_STRIDES
        for pname, param in self.body.named_parameters():
            trainable = any(layer in pname for layer in trainable_layers)
            is_bn_affine = ".bn" in pname or "downsample.1" in pname
            param.requires_grad_(trainable and not (freeze_bn_affine and is_bn_affine))

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.body(images)

    def load_pretrained(self, path: str | Path) -> None:
        """Load a torchvision ImageNet checkpoint (``resnet50-0676ba61.pth`` etc.) from a local file."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: backbone weights file not found (weights are never downloaded)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file is a user error here
            raise CheckpointError(f"{path}: cannot read backbone weights ({err})") from None
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = self.body.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: does not fit the backbone ({len(missing)} missing keys, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
