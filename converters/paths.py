"""The files a conversion reads: regular files inside their directory, wherever links point."""

from pathlib import Path
from typing import Optional, Union

from .errors import ConversionError


def _roots(root: Path):
    yield root.resolve()
    snapshots = root.absolute().parent
    if snapshots.name == "snapshots":  # a Hugging Face cache: its files link to ../../blobs
        yield (snapshots.parent / "blobs").resolve()


def file_in(root: Path, name: Union[str, Path]) -> Optional[Path]:
    """``root / name`` if it exists (None if not), refused unless, links followed, it is a
    regular file inside ``root``: an absolute or ``..`` name, or a link to a file
    elsewhere, never makes a conversion read (or copy) a file of the host."""
    path = root / name
    if not (path.exists() or path.is_symlink()):
        return None
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _roots(root)):
        raise ConversionError(f"{path}: leads outside {root} (only files inside it are read)")
    if not real.is_file():
        raise ConversionError(f"{path}: not a regular file")
    return path
