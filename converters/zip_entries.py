"""Zip entries read with their sizes and CRCs checked, so a central directory that lies is refused."""

import struct
import zipfile
import zlib
from pathlib import Path
from typing import Optional

from .errors import ConversionError

_CHUNK = 1 << 24


class ZipEntries:
    """The entries of an open zip file; stored ones are read in place, by byte range.

    An entry must end before the next one (or the central directory) begins, and
    its bytes must match its CRC, checked the first time any of it is read.
    """

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self.zip, self.path = zf, path
        infos = sorted(zf.infolist(), key=lambda i: i.header_offset)
        if len({i.filename for i in infos}) != len(infos):
            raise ConversionError(f"{path}: corrupt zip file (an entry name appears twice)")
        ends = [i.header_offset for i in infos[1:]] + [zf.start_dir]
        self._end = {i.filename: e for i, e in zip(infos, ends)}
        self._crc_ok = set()

    def info(self, name: str) -> Optional[zipfile.ZipInfo]:
        try:
            return self.zip.getinfo(name)
        except KeyError:
            return None

    def read(self, info: zipfile.ZipInfo, offset: int = 0, length: Optional[int] = None) -> bytes:
        """``length`` bytes of the entry from ``offset`` (by default all of it)."""
        length = info.file_size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > info.file_size:
            raise ConversionError(f"{self.path}: read past the end of zip entry {info.filename}")
        if info.compress_type != zipfile.ZIP_STORED:
            return self._inflate(info)[offset : offset + length]
        start = self._start(info)
        buf = self._pread(start + offset, length)
        if info.filename not in self._crc_ok:
            whole = length == info.file_size
            self._check_crc(info, zlib.crc32(buf) if whole else self._crc(start, info.file_size))
        return buf

    def _start(self, info: zipfile.ZipInfo) -> int:
        # The local header's name/extra lengths can differ from the central directory's.
        head = self._pread(info.header_offset, 30, what=info.filename)
        if head[:4] != b"PK\x03\x04":
            raise ConversionError(f"{self.path}: corrupt zip entry {info.filename}")
        name_len, extra_len = struct.unpack("<HH", head[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        room = self._end[info.filename] - start
        if info.compress_size != info.file_size or info.file_size > room:
            raise ConversionError(
                f"{self.path}: zip entry {info.filename} claims {info.file_size} bytes "
                f"but holds at most {max(room, 0)} (corrupt file)"
            )
        return start

    def _pread(self, start: int, n: int, what: Optional[str] = None) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            buf = f.read(n)
        if len(buf) != n:
            raise ConversionError(f"{self.path}: truncated zip entry {what or ''}".rstrip())
        return buf

    def _crc(self, start: int, n: int) -> int:
        crc = 0
        with open(self.path, "rb") as f:
            f.seek(start)
            while n > 0:
                chunk = f.read(min(n, _CHUNK))
                if not chunk:
                    raise ConversionError(f"{self.path}: truncated zip file")
                crc, n = zlib.crc32(chunk, crc), n - len(chunk)
        return crc

    def _check_crc(self, info: zipfile.ZipInfo, crc: int) -> None:
        if crc != info.CRC:
            raise ConversionError(f"{self.path}: zip entry {info.filename} fails its CRC check (corrupt file)")
        self._crc_ok.add(info.filename)

    def _inflate(self, info: zipfile.ZipInfo) -> bytes:
        if info.compress_type != zipfile.ZIP_DEFLATED:
            raise ConversionError(f"{self.path}: zip entry {info.filename} uses an unsupported compression")
        try:
            return self.zip.read(info)  # zipfile checks the size and the CRC
        except Exception as e:  # zlib.error, EOFError, BadZipFile: all mean a damaged entry
            raise ConversionError(f"{self.path}: corrupt zip entry {info.filename} ({type(e).__name__})") from None
