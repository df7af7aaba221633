"""Typed configuration: one dataclass per part, YAML presets, dotted ``key=value`` overrides, validation.

Every default below is the authors' released default for the 100-query COCO setting (spec sections
3.1, 8, 9 and 11) unless its comment says otherwise. Presets under ``configs/`` change fields
explicitly; no field ever changes another one behind the user's back.

Only :mod:`asag.build` reads these objects; modules receive plain, typed arguments.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from asag.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = REPO_ROOT / "configs"
PRESET_SUFFIXES = (".yaml", ".yml")  # a preset argument ending in these is a file path

BackboneName = Literal["resnet10", "resnet18", "resnet34", "resnet50", "resnet101"]
DecoderType = Literal["adamixer", "sparse_rcnn", "deformable"]
InferenceLevel = Literal["P3P6", "P4P6", "P5P6"]
DataFormat = Literal["coco", "synthetic"]


@dataclass
class BackboneConfig:
    # torchvision ResNets; resnet10 (one basic block per layer) is for small from-scratch models (the demo).
    name: BackboneName = "resnet50"
    # Path of a torchvision ImageNet checkpoint (e.g. resnet50-0676ba61.pth). Never downloaded.
    weights: str | None = None
    # frozen_bn: the release (ImageNet weights). batch_norm / group_norm: backbones trained from scratch.
    norm: Literal["frozen_bn", "batch_norm", "group_norm"] = "frozen_bn"
    # Stem and layer1 frozen (spec 2.1): layers whose name contains none of these stay trainable.
    trainable_layers: list[str] = field(default_factory=lambda: ["layer2", "layer3", "layer4"])
    # The release trains the FrozenBN affine terms of layer2-4 (spec 13.4); true freezes them.
    freeze_bn_affine: bool = False
    frozen_bn_eps: float = 1e-5
    dilation: bool = False  # rejected: strides are fixed at 4..32 (spec 13.26)


@dataclass
class NeckConfig:
    out_channels: int = 256  # FPN width = model width d


@dataclass
class AnchorGeneratorConfig:
    compress_dim: int = 8
    # Hidden width of the anchor MLPs; the release hard-codes 125 * compress_dim.
    mlp_hidden_dim: int = 1000
    num_anchors_coarse: int = 50  # num_pred_anchor1: per P6 patch / P5 crop
    num_anchors_patch: int = 20  # num_pred_anchor2: per P4/P3 patch
    interpolate_size: int = 30
    patch_size: int = 15
    threshold_low: float = 0.1  # threshold2
    threshold_high: float = 0.7  # threshold1
    patch_nms_threshold: float = 0.25
    score_threshold: float = 0.1  # use_anchor_threshold
    use_target_epoch: int = 1
    inference_level: InferenceLevel = "P3P6"
    min_anchors: int = 5
    max_anchors: int = 200
    min_anchor_size: float = 3.0
    min_training_patches: int = 4
    max_patches_per_image: int | None = None  # CrowdHuman preset: 60
    max_patches_per_level: int | None = None  # optional speed cap (the release's speed path used 15)
    # Static mode (model.static): patch slots per image and probed level; measured in docs/inference.md.
    static_patches_per_level: int = 15


@dataclass
class ProposalConfig:
    num_heads: int = 8
    ffn_dim: int = 2048
    roi_size: int = 7
    sampling_ratio: int = 2


@dataclass
class DecoderConfig:
    type: DecoderType = "adamixer"
    num_heads: int = 4  # parallel single-stage heads (num_decoder_layers)
    # Which head's detections are post-processed: "main" (the last) or "aux_k".
    used_head: str = "main"
    attention_heads: int = 8
    ffn_dim: int = 2048
    in_points: int = 32
    out_points: int = 128
    n_groups: int = 4
    dim_dynamic: int = 64  # Sparse R-CNN DynamicConv
    roi_size: int = 7
    sampling_ratio: int = 2
    # ASAG-D (spec 16)
    encoder_layers: int = 6
    encoder_ffn_dim: int = 1024
    deformable_points: int = 4
    dropout: float = 0.0


@dataclass
class PostprocessConfig:
    topk: int = 100
    nms: bool = False
    nms_threshold: float = 0.7


@dataclass
class ModelConfig:
    variant: str = "asag_a"
    num_classes: int = 80
    hidden_dim: int = 256
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    anchor_generator: AnchorGeneratorConfig = field(default_factory=AnchorGeneratorConfig)
    proposal: ProposalConfig = field(default_factory=ProposalConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    # RoIAlign of the proposal stage and Sparse R-CNN heads: torchvision's kernel, or the same sampling
    # as one weighted gather of channel vectors (equal up to float rounding; about 3x faster forward +
    # backward on CPU, where torchvision's backward runs on one core). auto: gather on CPU tensors,
    # torchvision's kernel on CUDA (chosen per call by the features' device; docs/training.md).
    roi_pooling: Literal["auto", "torchvision", "gather"] = "auto"
    # Static inference mode: every shape fixed by the input size, anchor_generator.max_anchors and
    # anchor_generator.static_patches_per_level; no host reads in the forward (docs/inference.md).
    # Inference only: training refuses it.
    static: bool = False


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


@dataclass
class LossConfig:
    ce: float = 2.0
    bbox: float = 5.0
    giou: float = 2.0
    other: float = 1.0  # multiplies the decoder / proposal terms
    anchor: float = 4.0  # anchor_loss_coef
    anchor_ce: float = 2.0
    anchor_bbox: float = 1.0
    anchor_giou: float = 0.5
    area_weight: float = 4.0
    gamma1: float = 0.4
    gamma2: float = 0.6
    fix_p6_flip_targets: bool = False


@dataclass
class DenoisingConfig:
    enabled: bool = False
    num_queries: int = 200
    noise_scale: float = 0.4
    # True: constant noise_scale (the README recipe); false: 0.8 - 0.04 * epoch.
    fix_noise_scale: bool = True


@dataclass
class DataConfig:
    # coco: the four file fields below name the files; synthetic: the fixed layout of asag.data.synthetic
    # under root. Setting a field the chosen format does not read is an error (DATA_FORMAT_FIELDS).
    format: DataFormat = "coco"
    root: str = "data/coco"
    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    augmentation: Literal["1x", "3x", "none"] = "1x"
    train_scales: list[int] = field(default_factory=lambda: [800])
    train_max_size: int = 1333
    crop_scales: list[int] = field(default_factory=lambda: [400, 500, 600])
    crop_size: list[int] = field(default_factory=lambda: [384, 600])
    crop_max_size: int = 1333
    val_size: int = 800
    val_max_size: int = 1333
    min_image_side: int = 32
    batch_size: int = 2
    val_batch_size: int = 1
    num_workers: int = 4
    # Synthetic data set (format == "synthetic"): generated into root by `asag demo` (or `asag data
    # synth`) only; other commands report a missing data set as an error naming the path.
    synthetic_train_images: int = 200
    synthetic_val_images: int = 50
    synthetic_seed: int = 0
    # Shape classes of the generated data set, names from the catalogue (`asag data synth --list-classes`),
    # in category-id order; null: the five default ones (rectangle, ellipse, triangle, cross, ring).
    # model.num_classes must equal their number.
    synthetic_classes: list[str] | None = None


@dataclass
class ScheduleConfig:
    epochs: int = 12
    lr: float = 2e-4
    backbone_lr: float = 2e-5
    weight_decay: float = 1e-4
    milestones: list[int] = field(default_factory=lambda: [8, 11])
    gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 1.0 / 3.0
    clip_max_norm: float = 0.1
    max_iters_per_epoch: int | None = None
    # AdamW implementation: fused (one kernel over all parameters), foreach (multi-tensor ops) or
    # for_loop (one parameter at a time, the release's). Same update up to float rounding.
    optimizer_kernel: Literal["fused", "foreach", "for_loop"] = "fused"

    # Gradient accumulation: batches per optimiser step, the loss normalised over all of them (the
    # matched-box count of the accumulated batch). Iterations, warm-up and max_iters_per_epoch count
    # optimiser steps. 4 GPUs x batch 4 = 16 images in the paper; one GPU with data.batch_size=4 and
    # accumulate_steps=4 sees the same 16 images per step (docs/training.md).
    accumulate_steps: int = 1
    # Exponential moving average of the weights (asag.engine.ema): 0 turns it off (the release has none);
    # e.g. 0.999. When on, evaluation, best.pth and prediction use the average.
    ema_decay: float = 0.0

@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 42
    amp: Literal["none", "fp16", "bf16", "auto"] = "auto"  # auto: fp16 on CUDA, none on CPU
    # What autocast covers: the backbone and FPN (the release), or the decoder heads too (changes the
    # numbers beyond the release's autocast; faster on CPUs with native bf16, docs/training.md).
    amp_scope: Literal["backbone", "heads"] = "backbone"
    output_dir: str = "runs/asag"
    eval_every: int = 1
    checkpoint_every: int = 5
    log_every: int = 20
    num_threads: int | None = None
    # Seeds every RNG (runtime.seed + rank) and asks torch for deterministic algorithms (warnings, not
    # errors, where an op has none; cuDNN autotuning off). false: seeds only, cuDNN autotuning on.
    deterministic: bool = True
    # Memory layout of the training images entering the backbone (the backbone and FPN follow; the same
    # numbers up to float rounding). auto: channels_last on CUDA; on the CPU channels_last for bf16 and
    # for fp32 on a CPU with AMX, else contiguous (a fixed rule, measured per CPU in docs/training.md);
    # probe: time both layouts at the start (CUDA: channels_last). A resumed run keeps its checkpoint's.
    memory_format: Literal["auto", "probe", "channels_last", "contiguous"] = "auto"
    # Large CPU blocks: reuse keeps freed memory in the process for the next tensor of that size instead
    # of handing it back to the kernel and faulting fresh pages in (glibc only; the same bits, faster
    # steps, the process keeps its peak memory); auto: reuse when the device is the CPU; system: leave
    # the C allocator alone (asag.engine.host_memory, docs/training.md).
    host_memory: Literal["auto", "reuse", "system"] = "auto"


@dataclass
class EvaluationConfig:
    metric: Literal["coco", "crowdhuman"] = "coco"
    per_class: bool = False
    # CrowdHuman mMR: how the miss rate is sampled at each FPPI reference point. "toolkit": the first
    # point of the curve with FPPI >= r (the CrowdHuman toolkit's rule, behind the published numbers);
    # "caltech": the last point with FPPI <= r (Dollar's toolbox). They differ only where the FPPI
    # equals r exactly (asag.engine.crowdhuman_eval, step 5).
    miss_rate_rule: Literal["toolkit", "caltech"] = "toolkit"
    # The COCOeval behind the COCO metric (asag.engine.coco_eval): "faster_coco_eval" (matching and
    # accumulation in C++, several times faster) or "pycocotools" (the reference); "auto": the first when
    # installed, else the second. The same AP/AR up to ~2e-16 (docs/evaluation.md); CrowdHuman ignores it.
    backend: Literal["auto", "faster_coco_eval", "pycocotools"] = "auto"


@dataclass
class FinetuneConfig:
    # Weights of a trained detector to start from (asag train / asag convert checkpoint, or an authors'
    # release file): matched by name and shape, classifier rows remapped by class name
    # (asag.engine.finetune). Not a resume: optimiser, schedule and epochs start afresh. None: random
    # initialisation (and the backbone's ImageNet weights).
    init: str | None = None
    # Load what fits and initialise the rest afresh, instead of refusing a checkpoint of another
    # architecture.
    allow_partial: bool = False
    # Parts that do not train: none, backbone, backbone_neck, or all_but_heads (backbone, neck and anchor
    # generator; the proposal stage and decoder heads train).
    freeze: Literal["none", "backbone", "backbone_neck", "all_but_heads"] = "none"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Free text naming the paper source of a preset.
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# ------------------------------------------------------------------------------------- conversion


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # X | None: say what X wants
            raise ConfigError(f"{errors[0]} (or null)")
        raise ConfigError(f"{key}: {value!r} does not match {_type_name(tp)}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """``cls`` from the fields in ``data`` (checked and converted; missing ones take their defaults)."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)  # YAML keys may be numbers or null
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]!s}; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict) -> Config:
    """Build and validate a :class:`Config` from plain data (missing keys take their defaults)."""
    cfg = _from_dict(Config, _merge(Config().to_dict(), data))
    validate(cfg)
    return cfg


# -------------------------------------------------------------------------------------- overrides


def yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: ``line L, column C: problem`` where the parser knows the place."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(err).split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.decoder.num_heads=1"`` -> (["model", "decoder", "num_heads"], 1) (values parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({yaml_problem(err)})") from None
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``data`` (a configuration as plain data) with ``overrides`` applied in order, as a new dict.

    A mapping value is merged into the section it names (``data={root: x}`` keeps the other data fields).
    Unknown keys, and data fields that the resulting ``data.format`` does not read
    (:func:`check_data_fields`), raise :class:`ConfigError`. ``data`` itself is left unchanged."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"unknown key {'.'.join(path[: i + 1])} in override {text!r}")
            node = child
        if path[-1] not in node:
            raise ConfigError(f"unknown key {'.'.join(path)} in override {text!r}")
        old = node[path[-1]]
        node[path[-1]] = _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    check_data_fields([("", override_keys(overrides))], _data_format(data))
    return data


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys of every field that ``overrides`` set (a mapping value sets each of its keys)."""
    keys: set[str] = set()
    for text in overrides:
        path, value = parse_override(text)
        key = ".".join(path)
        keys |= dotted_keys(value, f"{key}.") if isinstance(value, dict) and value else {key}
    return keys


def dotted_keys(data: dict, prefix: str = "") -> set[str]:
    """The dotted keys of the leaves of nested mappings: ``{"a": {"b": 1}, "c": 2}`` -> {"a.b", "c"}."""
    keys: set[str] = set()
    for key, value in data.items():
        name = f"{prefix}{key}"
        keys |= dotted_keys(value, f"{name}.") if isinstance(value, dict) and value else {name}
    return keys


# ------------------------------------------------------------------------------------ data formats

# The data fields that only some formats read, and those formats; every other data field is read by all.
DATA_FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    **{f"data.{name}": ("coco",)
       for name in ("train_images", "train_annotations", "val_images", "val_annotations")},
    **{f"data.{name}": ("synthetic",)
       for name in ("synthetic_train_images", "synthetic_val_images", "synthetic_seed")},
}
# Why a format does not read the fields of the others (asag.data.synthetic has the synthetic layout).
_FORMAT_NOTES: dict[str, str] = {
    "synthetic": "its files are fixed: train.json, val.json, images/train and images/val under data.root",
    "coco": "data.synthetic_* describe the synthetic data set that asag demo and asag data synth generate",
}


def _data_format(data: dict) -> Any:
    section = data.get("data")
    return section.get("format") if isinstance(section, dict) else None


def check_data_fields(layers: list[tuple[str, set[str]]], data_format: Any) -> None:
    """Refuse a data field that ``data_format`` does not read: it would be silently ignored (e.g.
    ``data.val_annotations`` with the synthetic format, whose file names are fixed).

    ``layers``: ``(source, dotted keys set there)`` in the order they apply: the preset files from the
    last ``_base_`` up (``source``: the file), then the overrides (``source``: ""). Fields set before the
    last layer that sets ``data.format`` are not checked: that layer chose the format over them (e.g. the
    synthetic ``tiny_cpu`` preset with the override ``data.format=coco``). The error names the field, the
    format, the file (if any) and the format that reads the field. An unknown format is left to
    :func:`validate`."""
    if data_format not in get_args(DataFormat):
        return
    start = max((i for i, (_, keys) in enumerate(layers) if "data.format" in keys), default=0)
    for source, keys in layers[start:]:
        for key in sorted(keys):
            readers = DATA_FORMAT_FIELDS.get(key, (data_format,))
            if data_format not in readers:
                where = f"{source}: " if source else ""
                raise ConfigError(
                    f"{where}{key}: not read when data.format={data_format} ({_FORMAT_NOTES[data_format]}); "
                    f"set data.format={readers[0]} to use it")


# ---------------------------------------------------------------------------------------- presets


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The file of a preset: ``name`` itself when it ends in .yaml / .yml (ConfigError when that is not a
    file), else ``configs/NAME.yaml`` (ConfigError listing the presets when there is none)."""
    path = Path(name)
    if path.suffix in PRESET_SUFFIXES:
        if path.is_file():
            return path
        raise ConfigError(f"{name}: {'not a file' if path.exists() else 'preset file not found'}")
    candidate = PRESET_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets())}")


def _read_preset_file(path: Path) -> dict:
    """One preset file as a mapping (``_base_`` still in it); ConfigError naming the file otherwise."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read preset ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(err)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of config sections, got a "
                          f"{type(data).__name__}")
    return data


def preset_layers(path: Path) -> list[tuple[Path, dict]]:
    """``path`` and the files of its ``_base_`` chain, ``(file, its settings without _base_)``, the last
    base first (each file overrides the ones before it).

    ``_base_`` names a file relative to the preset's folder, or a preset (:func:`preset_path`). The chain
    is followed iteratively (any depth); a file that comes back is an error naming the loop."""
    layers: list[tuple[Path, dict]] = []
    seen: dict[Path, None] = {}  # the resolved files so far, in order
    while True:
        if path.resolve() in seen:
            loop = " -> ".join(str(p) for p in (*seen, path.resolve()))
            raise ConfigError(f"{path}: the _base_ chain loops ({loop})")
        seen[path.resolve()] = None
        data = _read_preset_file(path)
        base = data.pop("_base_", None)
        layers.append((path, data))
        if base is None:
            return layers[::-1]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(f"{path}: _base_ must name a preset or a YAML file, got {base!r}")
        local = path.parent / base
        if local.is_file():
            path = local
        elif Path(base).suffix in PRESET_SUFFIXES and not Path(base).exists():
            raise ConfigError(f"{path}: _base_ file {local} not found")
        else:
            path = preset_path(base)  # a preset name, or a path as on the command line


def load_config(preset: str, overrides: list[str] | None = None) -> Config:
    """Resolve a preset name (or YAML path) plus ``key=value`` overrides into a validated config.

    A data field that the resulting ``data.format`` does not read, set in a preset file or an override,
    is refused (:func:`check_data_fields`)."""
    overrides = list(overrides or [])
    layers = preset_layers(preset_path(preset))
    data = Config().to_dict()
    for path, layer in layers:
        try:  # keys and types of each file on their own, so that the error names the file
            _from_dict(Config, layer)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        data = _merge(data, layer)
    cfg = config_from_dict(apply_overrides(data, overrides))
    file_keys = [(str(path), dotted_keys(layer)) for path, layer in layers]
    check_data_fields([*file_keys, ("", override_keys(overrides))], cfg.data.format)
    return cfg


# ------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Range:
    """An allowed numeric interval: ``low``/``high`` (None: unbounded), ends included unless ``*_open``."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def describe(self) -> str:
        if self.low is None and self.high is None:
            return "a number"
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE, NON_NEGATIVE = Range(1), Range(0)  # integers: >= 1, >= 0
POSITIVE_REAL = Range(0, low_open=True)
FRACTION = Range(0, 1)
# The allowed range of every numeric field (list fields: of each item), checked by `validate`; every
# float must also be finite. Consistency between fields is checked after these, in `validate`.
FIELD_RANGES: dict[str, Range] = {
    "model.num_classes": POSITIVE,
    "model.hidden_dim": POSITIVE,
    "model.backbone.frozen_bn_eps": POSITIVE_REAL,
    "model.neck.out_channels": POSITIVE,
    **{f"model.anchor_generator.{k}": POSITIVE for k in (
        "compress_dim", "mlp_hidden_dim", "num_anchors_coarse", "num_anchors_patch", "interpolate_size",
        "patch_size", "min_anchors", "max_anchors", "max_patches_per_image", "max_patches_per_level",
        "static_patches_per_level")},
    "model.anchor_generator.threshold_low": FRACTION,
    "model.anchor_generator.threshold_high": FRACTION,
    "model.anchor_generator.patch_nms_threshold": Range(0, 1, low_open=True),
    "model.anchor_generator.score_threshold": Range(0, 1, high_open=True),
    "model.anchor_generator.use_target_epoch": NON_NEGATIVE,
    "model.anchor_generator.min_anchor_size": NON_NEGATIVE,
    "model.anchor_generator.min_training_patches": NON_NEGATIVE,
    **{f"model.proposal.{k}": POSITIVE for k in ("num_heads", "ffn_dim", "roi_size", "sampling_ratio")},
    **{f"model.decoder.{k}": POSITIVE for k in (
        "num_heads", "attention_heads", "ffn_dim", "in_points", "out_points", "n_groups", "dim_dynamic",
        "roi_size", "sampling_ratio", "encoder_layers", "encoder_ffn_dim", "deformable_points")},
    "model.decoder.dropout": Range(0, 1, high_open=True),
    "model.postprocess.topk": POSITIVE,
    "model.postprocess.nms_threshold": Range(0, 1, low_open=True),
    **{f"matcher.{k}": NON_NEGATIVE for k in ("cost_class", "cost_bbox", "cost_giou", "focal_gamma")},
    "matcher.focal_alpha": FRACTION,
    **{f"loss.{k}": NON_NEGATIVE for k in (
        "ce", "bbox", "giou", "other", "anchor", "anchor_ce", "anchor_bbox", "anchor_giou", "area_weight",
        "gamma1", "gamma2")},
    "denoising.num_queries": NON_NEGATIVE,
    "denoising.noise_scale": NON_NEGATIVE,
    **{f"data.{k}": POSITIVE for k in (
        "train_scales", "train_max_size", "crop_scales", "crop_size", "crop_max_size", "val_size",
        "val_max_size", "batch_size", "val_batch_size", "synthetic_train_images", "synthetic_val_images")},
    "data.min_image_side": NON_NEGATIVE,
    "data.num_workers": NON_NEGATIVE,
    "data.synthetic_seed": NON_NEGATIVE,
    "schedule.epochs": POSITIVE,
    "schedule.lr": POSITIVE_REAL,
    "schedule.backbone_lr": Range(0),
    "schedule.weight_decay": Range(0),
    "schedule.milestones": NON_NEGATIVE,
    "schedule.gamma": POSITIVE_REAL,
    "schedule.warmup_iters": NON_NEGATIVE,
    "schedule.warmup_factor": Range(0, 1, low_open=True),
    "schedule.clip_max_norm": Range(),  # <= 0: no clipping
    "schedule.max_iters_per_epoch": POSITIVE,
    "schedule.accumulate_steps": POSITIVE,
    "schedule.ema_decay": Range(0, 1, high_open=True),
    "runtime.seed": NON_NEGATIVE,
    "runtime.eval_every": NON_NEGATIVE,  # 0: no evaluation
    "runtime.checkpoint_every": POSITIVE,
    "runtime.log_every": NON_NEGATIVE,  # 0: no per-iteration records
    "runtime.num_threads": POSITIVE,
}


def check_number(name: str, value: Any, allowed: Range) -> None:
    """Raise :class:`ConfigError` naming ``name`` unless ``value`` is a finite number in ``allowed``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    if value not in allowed:
        raise ConfigError(f"{name} must be {allowed.describe()}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def numeric_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> value of every int or float field (lists: the list) below the dataclass ``obj``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(numeric_fields(value, f"{name}."))
        elif _is_number(value) or (isinstance(value, list) and all(_is_number(v) for v in value)):
            out[name] = value
    return out


def _check_numbers(cfg: Config) -> None:
    for name, value in numeric_fields(cfg).items():
        allowed = FIELD_RANGES.get(name, Range())
        for i, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
            check_number(name if i is None else f"{name}[{i}]", item, allowed)


def option_type(kind: type, allowed: Range = Range()):
    """An ``argparse`` ``type=`` for a numeric command-line option: ``kind`` (int or float) in ``allowed``,
    finite; the error names the option (argparse adds it) and says what is allowed."""
    import argparse

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        try:
            check_number("the value", value, allowed)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix("the value ")) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def field_option(name: str, kind: type = int):
    """The ``argparse`` ``type=`` of an option that sets (or mirrors) the config field ``name``."""
    return option_type(kind, FIELD_RANGES[name])


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and consistency checks with messages naming the key: first every numeric field against
    :data:`FIELD_RANGES` (and finiteness), then the relations between fields."""
    _check_numbers(cfg)
    m, ag, dec = cfg.model, cfg.model.anchor_generator, cfg.model.decoder
    _check(m.hidden_dim % dec.attention_heads == 0,
           "model.hidden_dim must be divisible by model.decoder.attention_heads")
    _check(m.hidden_dim % (4 * dec.n_groups) == 0 or dec.type != "adamixer",
           "model.hidden_dim must be divisible by 4 * model.decoder.n_groups for AdaMixer")
    _check(not m.backbone.dilation,
           "model.backbone.dilation is not supported: the anchor generator and decoders assume strides 4-32")
    _check(ag.patch_size * 2 == ag.interpolate_size,
           "model.anchor_generator.interpolate_size must be 2 * patch_size (four crops tile the map)")
    _check(0.0 <= ag.threshold_low < ag.threshold_high <= 1.0,
           "model.anchor_generator: need 0 <= threshold_low < threshold_high <= 1")
    _check(ag.min_anchors <= ag.max_anchors, "model.anchor_generator: need min_anchors <= max_anchors")
    _check(ag.min_anchors <= 5 * ag.num_anchors_coarse,
           "model.anchor_generator.min_anchors exceeds the number of P5/P6 anchors")
    _check(dec.used_head == "main" or (dec.used_head.startswith("aux_")
           and dec.used_head[4:].isdigit() and int(dec.used_head[4:]) < dec.num_heads - 1),
           f"model.decoder.used_head {dec.used_head!r} must be 'main' or aux_k with k < num_heads - 1")
    _check(cfg.denoising.num_queries >= 1 or not cfg.denoising.enabled,
           "denoising.num_queries must be >= 1 when denoising is enabled")
    _check(all(e <= cfg.schedule.epochs for e in cfg.schedule.milestones),
           "schedule.milestones must lie within [0, schedule.epochs]")
    _check(len(cfg.data.crop_size) == 2 and cfg.data.crop_size[0] <= cfg.data.crop_size[1],
           "data.crop_size must be [min, max]")
    _check(len(cfg.data.train_scales) >= 1, "data.train_scales must not be empty")
    if cfg.data.synthetic_classes is not None:
        from asag.data.synthetic import check_classes  # numpy and PIL: only when classes are chosen

        check_classes(cfg.data.synthetic_classes, "data.synthetic_classes")
