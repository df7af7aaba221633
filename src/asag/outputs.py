"""Output folders: checked before the work starts, never replaced without being asked.

Every command that writes files calls :func:`check_output_dir` first, so a path under a file or an
unwritable folder is reported in one line before minutes of training or evaluation, and
:func:`unique_stems` gives every input image its own output name. Single result files are checked with
:func:`check_output_file` and written with :func:`atomic_write_text` (or the checkpoint writer), through a
temporary file beside them (:func:`temporary_file`), so an interrupted write never leaves half a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from asag.errors import OutputError

# What ``asag train`` writes into its run folder (engine.trainer, engine.logger, commands.train): checkpoints
# (a run that can be resumed) and logs.
LAST_FILE, BEST_FILE, NUMBERED_FILES = "last.pth", "best.pth", "checkpoint_[0-9]*.pth"
CHECKPOINT_PATTERNS = (LAST_FILE, BEST_FILE, NUMBERED_FILES)
RUN_FILE_PATTERNS = (*CHECKPOINT_PATTERNS, "metrics.jsonl", "val_results.json", "tensorboard",
                     "init_report.txt", "curves.png")
# Atomic writes go to ``.<name>.<random>.tmp`` beside the file (see :func:`temporary_file`).
TEMPORARY_SUFFIX = ".tmp"
MEGABYTE = 1e6


def describe_os_error(err: OSError) -> str:
    """``"path: reason"`` for a file-system error (``"reason"`` when it names no file)."""
    reason = err.strerror or str(err) or type(err).__name__
    return f"{err.filename}: {reason}" if err.filename else reason


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` (errno and reason kept) naming ``path``, for a file-system error raised without a file name
    (a failed ``write``) or naming a temporary file instead of the one the user knows."""
    return OSError(err.errno, err.strerror or str(err), str(path))


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


def check_output_file(path: str | os.PathLike, option: str, *, overwrite: bool = True) -> Path:
    """Check that file ``path`` can be written (its folder is created); OutputError naming ``option``.

    ``overwrite=False`` also refuses an existing file (the command's ``--overwrite`` replaces it).
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder; give a file name")
    if not overwrite and path.exists():
        raise OutputError(f"{option} {path} already exists; pass --overwrite to replace it or choose "
                          f"another {option}")
    check_output_dir(path.parent, option)
    return path


def temporary_file(path: Path) -> tuple[int, str]:
    """``(fd, name)`` of a new temporary file ``.<name>.<random>.tmp`` beside ``path`` (same file system, so
    that ``os.replace`` onto ``path`` is atomic); :func:`stale_temporaries` finds the ones a killed
    process left behind."""
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write file ``path`` through ``write(handle)`` without ever leaving it half-written; return ``path``.

    ``write`` fills a temporary file beside ``path`` (:func:`temporary_file`, in the same folder, which is
    created), which is flushed, synced and then renamed over ``path`` (``os.replace``). After any failure
    (an error of ``write``, a full disk, KeyboardInterrupt) ``path`` holds its previous contents (or does
    not exist) and the temporary file is removed. Ctrl-C during the write is held back until the write
    has finished or failed and then raised as KeyboardInterrupt. A full disk or an unwritable folder
    raises OSError with ``filename`` = ``path``. The file gets the permissions of the file it replaces,
    else those ``open()`` would give (``0o666`` less the umask).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = temporary_file(path)
    except OSError as err:
        raise naming(err, path) from None
    try:
        with interrupt_held_back(), os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _new_file_mode(path))
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(tmp_name, path)
    except BaseException as err:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise naming(err, path) from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def _new_file_mode(path: Path) -> int:
    """Permission bits for a new version of ``path``: those of the existing file, else ``0o666`` less the
    umask (what ``open(path, "w")`` gives; ``mkstemp`` would give ``0o600``)."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def interrupt_held_back() -> Iterator[None]:
    """SIGINT (Ctrl-C) inside the block is raised as KeyboardInterrupt when the block ends (main thread
    only; elsewhere a no-op). An error inside the block takes precedence and is raised instead. A process
    that ignores SIGINT (e.g. started in the background by a non-interactive shell) goes on ignoring it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def stale_temporaries(folder: Path, patterns: Sequence[str] = RUN_FILE_PATTERNS) -> list[Path]:
    """Temporary files of interrupted atomic writes of ``patterns`` in ``folder`` (a process killed while
    writing ``last.pth`` leaves ``.last.pth.<random>.tmp``), sorted."""
    if not folder.is_dir():
        return []
    return sorted({p for pattern in patterns for p in folder.glob(f".{pattern}.*{TEMPORARY_SUFFIX}")
                   if p.is_file()})


def remove_stale_temporaries(folder: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``folder`` and say so in one line; returns the removed files."""
    stale = stale_temporaries(folder)
    if stale:
        megabytes = sum(p.stat().st_size for p in stale) / MEGABYTE
        for path in stale:
            path.unlink(missing_ok=True)
        log(f"removed the unfinished writes of an interrupted run in {folder} ({megabytes:.1f} MB): "
            f"{', '.join(p.name for p in stale)}")
    return stale


def previous_run_files(folder: Path) -> list[Path]:
    """The files of an earlier ``asag train`` run in ``folder`` (checkpoints, logs), sorted."""
    if not folder.is_dir():
        return []
    return sorted({p for pattern in RUN_FILE_PATTERNS for p in folder.glob(pattern)})


def resumable_checkpoint(folder: Path) -> Path | None:
    """The checkpoint that continues the run in ``folder``: ``last.pth``, else the latest
    ``checkpoint_EEEE.pth``, else ``best.pth``; None when it holds none."""
    numbered = sorted(folder.glob(NUMBERED_FILES), reverse=True)
    return next((p for p in (folder / LAST_FILE, *numbered, folder / BEST_FILE) if p.is_file()), None)


def prepare_run_dir(folder: str | os.PathLike, *, resume: str | os.PathLike | None, overwrite: bool,
                    remove: bool = True, log: Callable[[str], None] = print) -> Path:
    """Check the run folder of ``asag train``; with ``overwrite`` remove the earlier run's files.

    The run continues in ``folder`` when ``resume`` is a checkpoint in it. Otherwise a folder holding
    checkpoints or logs of a run is refused (one line: what it holds and the choices) unless
    ``overwrite`` asks to replace them; other files (e.g. a data set) are left alone. In an accepted
    folder, temporary files of a checkpoint write that was killed are removed (one line through
    ``log``). ``remove=False`` only checks (the other ranks of a distributed run).
    """
    folder = check_output_dir(folder, "output folder")
    own_folder = resume is not None and Path(resume).resolve().parent == folder.resolve()
    found = [] if own_folder else previous_run_files(folder)
    if found and not overwrite:
        raise OutputError(_holds_a_run(folder, found, resume))
    if remove:  # only once the folder is this run's (a refused second start touches nothing)
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        remove_stale_temporaries(folder, log)
    return folder


def _holds_a_run(folder: Path, found: Sequence[Path], resume: str | os.PathLike | None) -> str:
    """Why ``asag train`` refuses ``folder`` (holding ``found``), and the user's choices."""
    names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
    checkpoint = resumable_checkpoint(folder)
    if resume is not None:
        return (f"output folder {folder} already holds another run ({names}) than the one --resume {resume} "
                f"continues; pass --output-dir {Path(resume).parent} to continue it in its own folder, "
                f"--overwrite to replace the run in {folder}, or another --output-dir")
    if checkpoint is None:
        return (f"output folder {folder} holds the logs of a run that stopped before its first checkpoint "
                f"({names}; nothing to resume); pass --overwrite to replace them or another --output-dir")
    return (f"output folder {folder} already holds a run ({names}); pass --resume {checkpoint} to continue "
            f"it, --overwrite to replace it, or another --output-dir")


def remove_unfinished_run(folder: Path, created: bool) -> list[Path]:
    """After a failed ``asag train`` start: when ``folder`` holds no checkpoint, remove the run's logs
    (nothing can resume them, and a retry would be refused as a run), and ``folder`` itself when this
    run ``created`` it and it is empty now. Returns the removed logs."""
    if not folder.is_dir() or resumable_checkpoint(folder) is not None:
        return []
    found = previous_run_files(folder)
    for path in found:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    if created and not any(folder.iterdir()):
        folder.rmdir()
    return found


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
