"""One training step through the public step API: the fast default equals the release's exact path."""

import functools
from collections.abc import Callable

import pytest
import torch
from tests.targets import random_targets

from asag.build import build_trainer
from asag.config import load_config
from asag.engine.benchmark import StageTimer
from asag.engine.optim import build_optimizer
from asag.engine.trainer import STEP_PARTS, StepResult, Trainer, set_amp_scope, use_channels_last
from asag.errors import ConfigError
from asag.modeling.fast import cpu_has_amx
from asag.modeling.roi_pooling import RoIPooling

# The release's exact path: torchvision's RoIAlign, default memory layout, one AdamW update per tensor.
RELEASE_PATH = ["model.roi_pooling=torchvision", "runtime.memory_format=contiguous",
                "schedule.optimizer_kernel=for_loop"]
SIZES = torch.tensor([[96, 128], [64, 96]])
# Gradients, as ||difference|| / ||reference|| per tensor. The default CPU path (gather RoIAlign, fused
# AdamW) changes the order of a few float sums: measured at most 2.5e-6. Channels-last convolutions change
# the order of every backbone sum; the trainable batch norms of tiny_cpu (trained from scratch) then have
# bias gradients that are sums of nearly cancelling terms: measured at most 1e-2 there, 5e-7 on the terms.
DEFAULT_GRAD_RTOL = 1e-4
CHANNELS_LAST_GRAD_RTOL = 3e-2
# bf16 autocast against fp32, one step of tiny_cpu (random weights): the total loss within 5e-3 and the
# gradient norm within 6e-2 relative (measured at most 1.8e-3 and 2.7e-2 over the three decoders and both
# scopes). Single terms move more (up to 12 %: reduced precision can change a Hungarian assignment).
BF16_TOTAL_RTOL, BF16_GRAD_NORM_RTOL = 5e-3, 6e-2
LR = 1e-3  # tiny_cpu's schedule.lr (and backbone_lr); the first warm-up step uses a third of it


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` over a whole tensor (0 for two zero tensors)."""
    return float((value - reference).norm() / reference.norm().clamp(min=1e-12))


def perturb_zero_parameters(model: torch.nn.Module) -> None:
    """Zero-initialised regression layers block gradients at step 0; perturb them (seeded)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def one_step(decoder: str, overrides: list[str], epoch: int = 0, amp: str | None = None,
             before: Callable[[Trainer], None] | None = None):
    cfg = load_config("tiny_cpu", [f"model.decoder.type={decoder}", "denoising.enabled=true",
                                   "denoising.num_queries=12", *overrides])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, amp=amp)
    perturb_zero_parameters(trainer.model)
    if before is not None:
        before(trainer)
    images = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    targets = random_targets(SIZES, [4, 2], seed=2)
    torch.manual_seed(3)  # denoising noise
    timer = StageTimer(torch.device("cpu"))
    result = trainer.train_step(images, SIZES, targets, epoch=epoch, wrap=timer)
    return trainer, result, timer


@pytest.mark.parametrize("decoder", ["adamixer", "sparse_rcnn"])
@pytest.mark.parametrize(("fast", "grad_rtol"), [
    # the default layout is channels-last in fp32 on a CPU with AMX (runtime.memory_format=auto)
    ([], CHANNELS_LAST_GRAD_RTOL if use_channels_last("auto", "cpu") else DEFAULT_GRAD_RTOL),
    pytest.param(["runtime.memory_format=channels_last", "schedule.optimizer_kernel=foreach",
                  "model.roi_pooling=gather"], CHANNELS_LAST_GRAD_RTOL, marks=pytest.mark.slow),
], ids=["default", "channels_last+foreach"])
def test_fast_step_equals_the_release_path(decoder, fast, grad_rtol):
    """Every loss term, every gradient and every updated weight agree within float rounding."""
    ref, ref_result, _ = one_step(decoder, RELEASE_PATH)
    new, new_result, timer = one_step(decoder, fast)
    assert set(timer.seconds) == set(STEP_PARTS)
    assert new.scheduler.warmup_done == 1  # the Trainer steps its warm-up schedule
    assert isinstance(new_result, StepResult)
    assert ref_result.terms.keys() == new_result.terms.keys()
    assert any(k.startswith("dn_") for k in new_result.terms)
    for key, value in ref_result.terms.items():
        assert torch.allclose(value, new_result.terms[key], rtol=1e-5, atol=1e-6), key
    assert torch.allclose(ref_result.total, new_result.total, rtol=1e-5)
    assert relative_error(new_result.grad_norm, ref_result.grad_norm) < grad_rtol
    params = dict(new.model.named_parameters())
    for name, a in ref.model.named_parameters():
        b = params[name]
        if a.grad is not None:
            assert relative_error(b.grad, a.grad) < grad_rtol, name
        # After the update: Adam's first step moves a weight by lr * g / (|g| + eps), so a gradient within
        # rounding of zero may move either way; the step is at most lr (identical gradients give equal
        # updates: test_optimizer_kernels_give_the_same_update).
        assert torch.allclose(a, b, rtol=0, atol=1.01 * LR), name


def build(decoder: str, overrides: list[str]):
    return build_trainer(load_config("tiny_cpu", [f"model.decoder.type={decoder}", *overrides]))


def test_roi_pooling_kind_follows_the_configuration():
    trainer = build("sparse_rcnn", [])
    pools = [m for m in trainer.model.modules() if isinstance(m, RoIPooling)]
    assert len(pools) == 1 + 2  # proposal stage + two Sparse R-CNN heads
    assert {p.kind for p in pools} == {"auto"} and not pools[0].uses_torchvision(torch.device("cpu"))
    exact = build("sparse_rcnn", RELEASE_PATH)
    assert {m.kind for m in exact.model.modules() if isinstance(m, RoIPooling)} == {"torchvision"}


def test_optimizer_kernel_and_memory_format_follow_the_configuration():
    trainer = build("adamixer", [])
    assert trainer.optimizer.defaults["fused"] is True
    assert trainer.channels_last is cpu_has_amx()  # auto on the CPU in fp32: channels-last with AMX
    assert use_channels_last("auto", "cuda") and use_channels_last("channels_last", "cpu")
    assert use_channels_last("auto", "cpu", "bf16")
    assert not use_channels_last("contiguous", "cuda")
    release = build("adamixer", RELEASE_PATH)
    assert release.optimizer.defaults["foreach"] is False and not release.optimizer.defaults["fused"]


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
def test_optimizer_kernels_give_the_same_update(kernel):
    """Fed the same gradients, fused / foreach AdamW update like the per-tensor loop (three steps)."""
    models = []
    for name in ("for_loop", kernel):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 4))
        models.append((model, build_optimizer(model, lr=1e-3, backbone_lr=1e-4, kernel=name)))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in models[0][0].parameters()]
        for model, opt in models:
            for p, grad in zip(model.parameters(), grads, strict=True):
                p.grad = grad.clone()
            opt.step()
    for a, b in zip(models[0][0].parameters(), models[1][0].parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="optimizer kernel"):
        build_optimizer(models[0][0], kernel="turbo")


@functools.cache
def fp32_step(decoder: str):
    return one_step(decoder, [])[1]


def record_linear_dtypes(trainer: Trainer, dtypes: dict[str, set]) -> None:
    """Collect the output dtypes of the decoder's and the proposal stage's linear layers."""
    for part in ("decoder", "proposal"):
        for module in getattr(trainer.model, part).modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, a, out, part=part: dtypes[part].add(out.dtype))


@pytest.mark.parametrize(("decoder", "scope"), [
    ("adamixer", "backbone"), ("adamixer", "heads"),
    pytest.param("sparse_rcnn", "heads", marks=pytest.mark.slow),
    pytest.param("deformable", "heads", marks=pytest.mark.slow),
])
def test_bf16_step_runs_close_to_fp32_and_autocasts_its_scope(decoder, scope):
    """runtime.amp_scope=backbone keeps everything after the FPN in fp32 (the release); heads autocasts the
    decoder heads too (not the proposal stage). Either way the loss is close to the fp32 step's."""
    dtypes: dict[str, set] = {"decoder": set(), "proposal": set()}
    before = functools.partial(record_linear_dtypes, dtypes=dtypes)
    _, result, _ = one_step(decoder, [f"runtime.amp_scope={scope}"], amp="bf16", before=before)
    assert dtypes["proposal"] == {torch.float32}
    assert dtypes["decoder"] == {torch.bfloat16 if scope == "heads" else torch.float32}
    reference = fp32_step(decoder)
    assert result.terms.keys() == reference.terms.keys()
    assert all(value.dtype == torch.float32 for value in result.terms.values())
    assert relative_error(result.total, reference.total) < BF16_TOTAL_RTOL
    assert relative_error(result.grad_norm, reference.grad_norm) < BF16_GRAD_NORM_RTOL


def test_amp_scope_heads_needs_decoder_heads():
    with pytest.raises(ConfigError, match="runtime.amp_scope=heads: Linear has no decoder heads"):
        set_amp_scope(torch.nn.Linear(2, 2), "heads")
    set_amp_scope(torch.nn.Linear(2, 2), "backbone")  # nothing to do
    with pytest.raises(ConfigError, match="amp_scope must be one of"):
        set_amp_scope(torch.nn.Linear(2, 2), "everything")
