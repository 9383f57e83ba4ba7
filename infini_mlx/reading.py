"""Text files in bounded pieces that tokenize the same wherever reading resumes."""

import hashlib
import io
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator, List, Sequence, Tuple, Union

CHUNK = 1 << 16  # bytes per piece: memory stays bounded by this, not the file
SNIFF = 8192  # bytes checked for NUL at the start, as git and grep do
HASHED = 1 << 16  # bytes a file's fingerprint covers, with its size


class InputError(ValueError):
    """An input that cannot be read as text: missing, a directory, empty or binary."""


def check_text_file(path: Union[str, Path]) -> int:
    """Check that ``path`` names a readable, non-empty text file; return its size."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a text file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF)
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    if not head:
        raise InputError(f"{path} is empty: there is nothing to read")
    if b"\x00" in head:
        raise InputError(f"{path} is a binary file, not text")
    return size


def fingerprint(path: Union[str, Path]) -> str:
    """A hash of a file's size and first piece: enough to tell a file from another."""
    with open(path, "rb") as f:
        head = f.read(HASHED)
    return hashlib.sha256(f"{Path(path).stat().st_size}:".encode() + head).hexdigest()[:32]


def _cut(block: bytes) -> int:
    """Where to end a full block: after a run of newlines, else after whitespace,
    else at a UTF-8 character boundary. Depends only on the block's bytes."""
    for i in range(len(block) - 1, 0, -1):
        if block[i - 1] == 0x0A and block[i] not in b"\r\n":
            return i
    for i in range(len(block) - 1, 0, -1):
        if block[i - 1] in b" \t\r" and block[i] not in b" \t\r\n":
            return i
    for i in range(len(block) - 1, 0, -1):
        if block[i] & 0xC0 != 0x80:
            return i
    return len(block)


def chunks(f: BinaryIO, start: int = 0, size: int = 0) -> Iterator[Tuple[int, bytes]]:
    """Yield ``(offset, bytes)`` pieces of ``f`` from byte ``start``.

    A piece's end depends only on the bytes from its offset on, so reading from
    any offset this yielded gives the same pieces as reading from the start.
    """
    size = size or CHUNK
    f.seek(start)
    pos, rest = start, b""
    while True:
        block = rest + f.read(size - len(rest))
        if not block:
            return
        n = len(block) if len(block) < size else _cut(block)
        yield pos, block[:n]
        pos, rest = pos + n, block[n:]


def decode(data: bytes, offset: int, name: str, warned: List[bool]) -> str:
    """UTF-8 text of one piece; bad bytes become U+FFFD with one warning per file."""
    if offset == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data:
        raise InputError(f"{name} is a binary file, not text (NUL byte after byte {offset})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not warned[0]:
            warned[0] = True
            warnings.warn(
                f"{name} is not valid UTF-8 (first bad byte at {offset + e.start}); "
                "undecodable bytes were replaced with U+FFFD",
                UnicodeWarning,
                stacklevel=2,
            )
        return data.decode("utf-8", errors="replace")


def pieces(
    tokenizer,
    source: Union[Path, str],
    start: int = 0,
    head: Sequence[int] = (),
    size: int = 0,
) -> Iterator[Tuple[int, List[int]]]:
    """Yield ``(offset, token ids)`` for each piece of a file (a Path) or a text (a str).

    ``head`` (e.g. a BOS token or a chat template's opening) goes before the
    piece at offset 0; ``size`` is the piece size (default ``CHUNK``).
    """
    is_file = isinstance(source, Path)
    name = str(source) if is_file else "the text"
    warned = [False]
    f = open(source, "rb") if is_file else io.BytesIO(source.encode("utf-8"))
    with f:
        for off, data in chunks(f, start, size):
            ids = tokenizer.encode(decode(data, off, name, warned), add_special_tokens=False)
            yield off, (list(head) + ids if off == 0 else ids)
