"""Atomic file writes and checked reads, for everything a long job leaves on disk.

A benchmark or a training run can be stopped at any instant: Ctrl-C, a scheduler's SIGTERM, a
worker killed by ``torchrun``, a full disk. Whatever it was writing at that moment must then be
either the old file or the new one, never a truncated mix, because the next run trusts what it
finds (a cached bench cell, a ``last.pt`` to resume from). Every writer here therefore writes a
temporary file in the target's folder (same file system, so the final rename is atomic), flushes
and fsyncs it, ``os.replace``-s it over the target and fsyncs the folder. On any exception,
``KeyboardInterrupt`` included, the temporary file is removed and the old target is untouched.
Only a SIGKILL or a power cut can leave a temporary behind; it is hidden (a leading dot), never
read as a result, and :func:`remove_stale_temporaries` deletes those of dead writers.

The readers turn a damaged file into :class:`CorruptFileError`, one exception that names the
path, instead of whatever ``json`` or ``torch.load`` happened to raise.

Kept free of mmelkit imports so that any module can use it without import cycles.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import secrets
import socket
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CorruptFileError",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_tree",
    "load_torch",
    "read_json",
    "remove_stale_temporaries",
    "temporary_name",
]

# .<target name>.<host>+<pid>+<random>.tmp: hidden, and says who wrote it (see remove_stale_temporaries)
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]*)\+(?P<pid>\d+)\+[0-9a-f]+\.tmp$")


class CorruptFileError(ValueError):
    """A file exists but cannot be read back (truncated, not the expected format).

    A ``ValueError`` so that code which reports bad inputs cleanly also reports this cleanly."""

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "_", socket.gethostname())


def temporary_name(target: str | Path) -> str:
    """A fresh temporary file name for ``target`` (in the same folder)."""
    return f".{Path(target).name}.{_host()}+{os.getpid()}+{secrets.token_hex(4)}.tmp"


def _fsync_folder(folder: Path) -> None:
    # makes the rename itself durable; not possible everywhere (Windows), and then not needed
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary binary file beside ``path``, then swap it in.

    The folder is created if needed. The new file gets the usual permissions (the umask applies,
    unlike files made by ``tempfile.mkstemp``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        temporary = path.parent / temporary_name(path)
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # a random clash: draw another name
            continue
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """``text`` as written, encoded: no newline translation (``\\r\\n`` from the csv module stays)."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, value: Any, **dumps: Any) -> Path:
    """``json.dumps(value, **dumps)``, serialised before anything is created (a value that cannot
    be serialised leaves no trace)."""
    return atomic_write_text(path, json.dumps(value, **dumps))


def atomic_torch_save(path: str | Path, value: Any) -> Path:
    """``torch.save`` made atomic: an interrupted save leaves the previous file intact."""
    import torch

    return atomic_write(path, lambda file: torch.save(value, file))


def read_json(path: str | Path) -> Any:
    """Parsed JSON; :class:`CorruptFileError` if the file is not valid UTF-8 JSON (e.g. cut short)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(path, f"{path} is not valid JSON (truncated or damaged: {error})") from error


def load_torch(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` (full unpickling: for files this package wrote itself) that reports a
    truncated or damaged file as :class:`CorruptFileError`. A missing file still raises
    ``FileNotFoundError``."""
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    # a truncated zip archive surfaces as OSError (EINVAL) or RuntimeError, an empty file as EOFError
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        if not path.is_file():
            raise
        raise CorruptFileError(path, f"{path} cannot be loaded (truncated or damaged: {error})") from error


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder`` and the folders themselves: a tree written in place
    (``save_pretrained``) is on disk before it is renamed into its final place."""
    folder = Path(folder)
    for root, _, files in os.walk(folder):
        for name in files:
            handle = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(handle)
            finally:
                os.close(handle)
        _fsync_folder(Path(root))


def remove_stale_temporaries(folder: str | Path, names: Callable[[str], bool] | None = None) -> list[Path]:
    """Delete the temporaries that killed writers left in ``folder`` (not recursive).

    Only files in this module's temporary pattern whose writer ran on this host and is no longer
    alive: another live process's write in progress is never touched. ``names`` filters by the
    target's name. Returns the removed paths."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    host = _host()
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match is None or match["host"] != host or (names is not None and not names(match["name"])):
            continue
        if _alive(int(match["pid"])):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:  # no way to ask (e.g. Windows semantics): assume alive, keep the file
        return True
    return True


def read_cached_record(path: Path, key: str, fields: Iterable[str], what: str) -> dict[str, Any] | None:
    """A cached JSON record written under the name ``key``; None when there is none or it cannot be
    used (unreadable, truncated, another record's content, missing ``fields``), which is then
    reported with a RuntimeWarning naming the file, so that the caller computes it again."""
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except (OSError, CorruptFileError) as error:
        problem = str(error)
    else:
        if isinstance(record, dict) and record.get("key") == key and set(fields) <= set(record):
            return record
        problem = f"{path} is not the {what} {key} (wrong content for its name)"
    warnings.warn(f"ignoring {what}: {problem}; computing it again", RuntimeWarning, stacklevel=3)
    return None
