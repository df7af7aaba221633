"""Fixtures of the data tests."""

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from coco_files import write_coco


@pytest.fixture
def coco_writer(tmp_path: Path) -> Callable:
    """``write(images=[(id, file_name, w, h)], annotations, ...)`` -> (json, image folder).

    See ``coco_files.write_coco``.
    """
    return partial(write_coco, tmp_path)
