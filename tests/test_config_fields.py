"""Every configuration field is read by the library (or listed here with the reason it is not)."""

import ast
import dataclasses
from pathlib import Path

import pytest

from asag.build import build_model
from asag.config import Config, load_config

SRC = Path(__file__).resolve().parents[1] / "src" / "asag"
# Fields that no code reads, with the reason. Keep this empty unless a field is data for people.
NOT_READ: dict[str, str] = {}


def leaf_fields(cls: type, prefix: str = "") -> list[str]:
    """Dotted names of every non-dataclass field below ``cls`` (``model.backbone.name``, ...)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def names_read() -> set[str]:
    """Attribute names read in the package's code (``x.name``, ``getattr(x, "name")``)."""
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                names.add(node.value)  # getattr(cfg, "name") and loops over field names
    return names


def test_every_config_field_is_read_somewhere():
    read = names_read()
    unread = [f for f in leaf_fields(Config) if f.split(".")[-1] not in read and f not in NOT_READ]
    assert not unread, f"configuration fields that no code reads: {unread}"
    assert set(NOT_READ) <= set(leaf_fields(Config)), "NOT_READ names a field that does not exist"


def test_build_model_takes_denoising_from_the_configuration():
    cfg = load_config("tiny_cpu", ["denoising.enabled=true", "denoising.num_queries=12"])
    assert build_model(cfg).num_dn == 12
    assert build_model(load_config("tiny_cpu")).num_dn == 0
    with pytest.raises(TypeError, match="whole Config"):
        build_model(cfg.model)
