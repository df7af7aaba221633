"""Output folders: checked before the work starts, never replaced without being asked.

Every command that writes files calls :func:`check_output_dir` first, so a path under a file or an
unwritable folder is reported in one line before minutes of training or evaluation, and
:func:`unique_stems` gives every input image its own output name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from asag.errors import OutputError

# What ``asag train`` writes into its run folder (engine.trainer, engine.logger, commands.train).
RUN_FILE_PATTERNS = ("last.pth", "best.pth", "checkpoint_[0-9]*.pth", "metrics.jsonl", "val_results.json",
                     "tensorboard", "init_report.txt", "curves.png")


def describe_os_error(err: OSError) -> str:
    """``"path: reason"`` for a file-system error (``"reason"`` when it names no file)."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{err.filename}: {reason}" if err.filename else reason


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Create folder ``path`` (with its parents) and check that a file can be written into it.

    Raises :class:`OutputError` naming ``option`` (e.g. ``"--out"``) and the path when a part of the
    path is a file, the folder cannot be created, or it is not writable.
    """
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise OutputError(f"{option} {path}: {part} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    return path


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Check that file ``path`` can be written (its folder is created); OutputError naming ``option``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give a file name")
    check_output_dir(path.parent, option)
    return path


def previous_run_files(folder: Path) -> list[Path]:
    """The files of an earlier ``asag train`` run in ``folder`` (checkpoints, logs), sorted."""
    if not folder.is_dir():
        return []
    return sorted({p for pattern in RUN_FILE_PATTERNS for p in folder.glob(pattern)})


def prepare_run_dir(folder: str | os.PathLike, *, resume: bool, overwrite: bool,
                    remove: bool = True) -> Path:
    """Check the run folder of ``asag train``; with ``overwrite`` remove the earlier run's files.

    A folder holding checkpoints or logs of an earlier run is refused unless the run continues
    (``resume``) or ``overwrite`` asks to replace it; other files (e.g. a data set) are left alone.
    ``remove=False`` only checks (the other ranks of a distributed run).
    """
    folder = check_output_dir(folder, "output folder")
    found = previous_run_files(folder)
    if not found or resume:
        return folder
    if not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise OutputError(
            f"output folder {folder} already holds a run ({names}); pass --resume {folder / 'last.pth'} "
            f"to continue it, --overwrite to replace it, or another --output-dir"
        )
    if remove:
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return folder


def check_new_files(folder: Path, names: Sequence[str], *, overwrite: bool, option: str) -> None:
    """Refuse to replace existing ``folder/name`` files unless ``overwrite`` (error names ``option``)."""
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise OutputError(f"{option} {folder} already holds {', '.join(existing)}; pass --overwrite to "
                          f"replace them or choose another {option}")


def results_dir(out: str | os.PathLike | None, default_name: str, files: Sequence[str], *, overwrite: bool,
                option: str = "--out") -> tuple[Path, bool]:
    """The output folder of a command that writes ``files`` into it (``asag predict``, ``asag visualize``).

    ``out`` None: a new folder ``default_name`` in the current folder (``_2``, ``_3``, ... when it
    exists and is not empty, see :func:`fresh_dir`). A given ``out`` that already holds one of ``files``
    is refused unless ``overwrite``. The folder is created and checked (:func:`check_output_dir`).
    Returns ``(folder, created)``: ``created`` tells :func:`removed_if_unused` whether it is this run's.
    """
    if out is None:
        folder = fresh_dir(Path.cwd(), default_name)
    else:
        folder = Path(out)
        check_new_files(folder, files, overwrite=overwrite, option=option)
    created = not folder.exists()
    return check_output_dir(folder, option), created


@contextlib.contextmanager
def removed_if_unused(folder: Path, created: bool) -> Iterator[None]:
    """Remove ``folder`` again when the block fails while it is still empty and this run created it (a
    command that stops before writing anything leaves no folder behind)."""
    try:
        yield
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def fresh_dir(parent: Path, name: str) -> Path:
    """``parent/name``, or ``parent/name_2``, ``_3`` ... : the first that does not exist yet or is an empty
    folder (one that a run which failed before writing anything left behind)."""
    candidate, n = parent / name, 1
    while candidate.exists() and not (candidate.is_dir() and not any(candidate.iterdir())):
        n += 1
        candidate = parent / f"{name}_{n}"
    return candidate


def unique_stems(paths: Sequence[Path]) -> list[str]:
    """An output name per input file, distinct even for equal stems in different folders or with
    different extensions: the stem alone when it is unique, else the stem plus the extension, plus
    as many parent folder names as needed (``a/x.png`` -> ``x_png``, then ``a_x_png``). Order follows
    ``paths``."""
    names = [_name_with_parents(p, 0, with_suffix=False) for p in paths]
    depth = 0
    while len(set(names)) < len(names):
        clashing = {n for n in names if names.count(n) > 1}
        names = [_name_with_parents(p, depth, with_suffix=True) if n in clashing else n
                 for p, n in zip(paths, names)]
        depth += 1
        if depth > max(len(Path(p).resolve().parts) for p in paths):
            names = [f"{n}_{i}" for i, n in enumerate(names)]  # same file given twice
    return names


def _name_with_parents(path: Path, depth: int, *, with_suffix: bool) -> str:
    path = Path(path).resolve()
    base = f"{path.stem}_{path.suffix[1:]}" if with_suffix and path.suffix else path.stem
    parents = [p.name for p in list(path.parents)[:depth] if p.name][::-1]
    return "_".join([*parents, base])
