"""Where a conversion writes: a temporary directory beside DST, renamed into place when
complete, and removed on an error, on SIGTERM, or (by a later run) after SIGKILL."""

import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from .errors import ConversionError

_TAG = "convert-"  # .DST.convert-HOST-PID-RANDOM


def check_places(src: Path, dst: Path, force: bool, tokenizer: Optional[Path] = None) -> None:
    """Refuse a DST whose replacement or writing would touch SRC (or the tokenizer directory)."""
    s, d = src.resolve(), dst.resolve()
    if d == s:
        raise ConversionError("SRC and DST are the same directory")
    if d in s.parents:
        raise ConversionError(f"{dst} contains SRC {src}: refused (replacing it would delete the checkpoint)")
    if s in d.parents:
        raise ConversionError(f"{dst} is inside SRC {src}: refused (SRC is never written to)")
    if tokenizer is not None and (d == tokenizer.resolve() or d in tokenizer.resolve().parents):
        raise ConversionError(f"{dst} contains the tokenizer directory {tokenizer}: refused")
    if (dst.exists() or dst.is_symlink()) and not force:
        raise ConversionError(f"{dst} exists (use --force to replace it)")
    # --force replaces a model directory or an empty one, never any other folder or file.
    if dst.exists() and not (dst.is_dir() and (not any(dst.iterdir()) or (dst / "config.json").is_file())):
        raise ConversionError(f"{dst} is not a model directory: refused even with --force")


@contextmanager
def staging(dst: Path):
    """A new temporary directory beside ``dst``, removed if the body fails or SIGTERM arrives."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(dst)
    with _sigterm_unwinds():
        prefix = f".{dst.name}.{_TAG}{socket.gethostname()}-{os.getpid()}-"
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def remove_stale(dst: Path) -> None:
    """Remove what conversions to ``dst`` on this host left behind when they were killed."""
    mine = re.compile(rf"\.{re.escape(dst.name)}\.{_TAG}(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")
    for p in dst.parent.iterdir():
        m = mine.fullmatch(p.name)
        if m and m["host"] == socket.gethostname() and not _alive(int(m["pid"])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)


def replace(tmp: Path, dst: Path) -> None:
    """Move the finished directory into place; an old DST (force) goes only after."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{tmp.name}")
        dst.rename(old)
    try:
        tmp.rename(dst)
    except BaseException:
        if old is not None:
            old.rename(dst)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no pid of ours
        return True
    return True


class _Terminated(BaseException):
    """SIGTERM, raised where the conversion is so that it unwinds as from an error."""


@contextmanager
def _sigterm_unwinds():
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
    ):
        yield  # SIGTERM is not ours to handle here: the program's own handler decides
        return

    def unwind(signum, frame):
        raise _Terminated

    signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # cleaned up: now die of it, as without the handler
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
