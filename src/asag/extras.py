"""Optional dependencies (the extras of ``pyproject.toml``): imported where they are first needed; when
one is missing, one line names the package and the extra that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from asag.errors import ConfigError


def install_hint(extra: str) -> str:
    """The command that installs the dependencies of ``extra``, e.g. ``pip install "asag[video]"``."""
    return f'pip install "asag[{extra}]"'


def require(module: str, purpose: str, extra: str) -> ModuleType:
    """Import ``module``, or raise a one-line :class:`ConfigError`: ``"{purpose} needs the '{module}'
    package: pip install "asag[{extra}]""``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{purpose} needs the '{module}' package: {install_hint(extra)}") from None
