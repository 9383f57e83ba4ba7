"""A length x depth accuracy heatmap written as PNG with numpy and zlib only."""

import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

# 3x5 glyphs, rows top to bottom, bits left to right.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", "%": "101001010100101", "K": "101110100110101",
    "M": "101111111101101", ".": "000000000000010", " ": "000000000000000",
    "-": "000000111000000",
}
_SCALE = 3  # pixels per glyph dot
CELL_W, CELL_H, MARGIN = 90, 48, 80


def _text(img: np.ndarray, s: str, x: int, y: int, color=(0, 0, 0)):
    """Draw ``s`` with its top-left corner at (x, y); unknown characters are skipped."""
    for ch in s.upper():
        bits = _FONT.get(ch)
        if bits is not None:
            g = np.array([int(b) for b in bits], bool).reshape(5, 3)
            g = np.kron(g, np.ones((_SCALE, _SCALE), bool))
            h, w = g.shape
            img[y : y + h, x : x + w][g] = color
        x += 4 * _SCALE


def _color(acc: float):
    # Red (0%) through yellow to green (100%).
    r = 1.0 if acc < 0.5 else 2 * (1 - acc)
    g = 2 * acc if acc < 0.5 else 1.0
    return (int(255 * r), int(220 * g), 60)


def render(acc: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str]) -> np.ndarray:
    """RGB image (uint8) of ``acc`` (rows x cols, in [0, 1]) with labels."""
    R, C = acc.shape
    img = np.full((MARGIN + R * CELL_H + 10, MARGIN + C * CELL_W + 10, 3), 255, np.uint8)
    for j, lab in enumerate(col_labels):
        _text(img, lab, MARGIN + j * CELL_W + 8, MARGIN - 24)
    for i, lab in enumerate(row_labels):
        y = MARGIN + i * CELL_H
        _text(img, lab, 8, y + CELL_H // 2 - 8)
        for j in range(C):
            x = MARGIN + j * CELL_W
            img[y + 1 : y + CELL_H - 1, x + 1 : x + CELL_W - 1] = _color(float(acc[i, j]))
            _text(img, f"{100 * acc[i, j]:.0f}%", x + 12, y + CELL_H // 2 - 8)
    return img


def write_png(path, img: np.ndarray) -> None:
    """Write an 8-bit RGB image as a PNG file."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    Path(path).write_bytes(png)
