"""A zoo of bad and odd photo files, generated with Pillow (small, except one sparse 21 MiB file).

Each :class:`ZooPhoto` says what a correct decoder must make of it: the upright RGB picture a
person would see (``upright``), or the reason it must be rejected with (``reason``, the start of
``ImageDecodeError.reason``). Used by ``tests/test_photo_zoo.py`` and ``benchmarks/photo_zoo.py``.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fashion_tagging.images import MAX_PHOTO_BYTES, to_model_size

RED, BLUE, GREEN, YELLOW = (220, 30, 30), (30, 30, 220), (30, 200, 30), (230, 220, 40)
# EXIF orientation -> how the stored pixels relate to the upright picture (EXIF 2.3, tag 0x0112),
# written from the spec's "where row 0 / column 0 are", not from Pillow's table.
EXIF_STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                      # row 0 top, column 0 right
    3: lambda a: a[::-1, ::-1],                   # row 0 bottom, column 0 right
    4: lambda a: a[::-1, :],                      # row 0 bottom, column 0 left
    5: lambda a: a.transpose(1, 0, 2),            # row 0 left, column 0 top
    6: lambda a: np.rot90(a, 1),                  # row 0 right, column 0 top (phone held upright)
    7: lambda a: np.rot90(a, 1)[:, ::-1],         # row 0 right, column 0 bottom
    8: lambda a: np.rot90(a, -1),                 # row 0 left, column 0 bottom
}


@dataclasses.dataclass
class ZooPhoto:
    kind: str
    path: Path
    upright: np.ndarray | None = None  # what a correct decoder sees (HxWx3 uint8); None: must be rejected
    reason: str | None = None  # start of the rejection reason

    def expected(self, size: int) -> np.ndarray:
        return to_model_size(self.upright, size)


def quadrants(width: int = 96, height: int = 64) -> np.ndarray:
    """Landscape picture with four different corners: a rotation or mirror cannot go unnoticed."""
    image = np.empty((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:] = RED, BLUE, GREEN, YELLOW
    return image


def quadrant_colours(decoded: np.ndarray) -> list[tuple[int, ...]]:
    """Mean colour around the centre of each quadrant of a decoded landscape picture (TL, TR, BL, BR)."""
    rows = np.flatnonzero((decoded < 245).any(axis=(1, 2)))
    cols = np.flatnonzero((decoded < 245).any(axis=(0, 2)))
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys = (top + (bottom - top) // 4, top + 3 * (bottom - top) // 4)
    xs = (left + (right - left) // 4, left + 3 * (right - left) // 4)
    return [tuple(int(v) for v in decoded[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(axis=0))
            for y in ys for x in xs]


def encode(image: Image.Image | np.ndarray, fmt: str, **options) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` applied to look like ``upright``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = np.ascontiguousarray(EXIF_STORED[orientation](upright))
    return encode(stored, "JPEG", quality=95, subsampling=0, exif=exif)


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking 8-bit RGB PNG header claiming ``width`` x ``height``, a few rows of data: a few hundred bytes."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)

    rows = zlib.compress((b"\0" + b"\xff" * 3 * width) * 4, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_photo_zoo(directory: Path) -> list[ZooPhoto]:
    """Write every kind into ``directory``; returns them in a fixed order."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    upright = quadrants()
    zoo: list[ZooPhoto] = []

    def add(kind: str, filename: str, data: bytes, upright_view=None, reason=None) -> None:
        path = directory / filename
        path.write_bytes(data)
        zoo.append(ZooPhoto(kind, path, upright_view, reason))

    # Decodable: the picture a person sees, whatever the encoding.
    add("jpeg (baseline)", "baseline.jpg", encode(upright, "JPEG", quality=95, subsampling=0), upright)
    portrait = np.ascontiguousarray(np.rot90(upright, -1))
    add("jpeg portrait", "portrait.jpg", encode(portrait, "JPEG", quality=95, subsampling=0), portrait)
    add("exif-rotated jpeg (orientation 6)", "exif6.jpg", exif_jpeg(upright, 6), upright)
    add("exif-mirrored jpeg (orientation 7)", "exif7.jpg", exif_jpeg(upright, 7), upright)
    add("cmyk jpeg", "cmyk.jpg", encode(Image.fromarray(upright).convert("CMYK"), "JPEG", quality=95), upright)
    gray = np.repeat(np.repeat(np.array([[64, 192]], np.uint8), 32, axis=1), 48, axis=0)  # 64 wide, 48 tall
    add("grayscale jpeg", "gray.jpg", encode(gray, "JPEG", quality=95), np.stack([gray] * 3, axis=-1))
    add("16-bit grayscale png", "gray16.png", encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        np.stack([gray] * 3, axis=-1))
    # Palette PNG whose transparent entry is black: a decoder that ignores alpha shows a black half.
    indices = np.zeros((64, 96), np.uint8)
    indices[:, 48:] = 1
    palette = Image.frombytes("P", (96, 64), indices.tobytes())
    palette.putpalette([*RED, 0, 0, 0] + [0] * 762)
    white_right = upright.copy()
    white_right[:, :48], white_right[:, 48:] = RED, 255
    add("palette png with transparency", "palette_alpha.png", encode(palette, "PNG", transparency=1), white_right)
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[:, :48] = (*BLUE, 255)  # right half: fully transparent black
    white_left_blue = upright.copy()
    white_left_blue[:, :48], white_left_blue[:, 48:] = BLUE, 255
    add("rgba png", "rgba.png", encode(rgba, "PNG"), white_left_blue)
    frames = [Image.fromarray(upright), Image.fromarray(np.full_like(upright, 128))]
    add("animated gif (2 frames)", "animated.gif",
        encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0), upright)
    add("webp", "photo.webp", encode(upright, "WEBP", quality=95), upright)
    add("png", "photo.png", encode(upright, "PNG"), upright)

    # Rejected, each with its reason.
    add("zero bytes", "empty.jpg", b"", reason="empty file")
    jpeg = encode(noise(120, 160), "JPEG", quality=90)
    add("truncated jpeg", "truncated.jpg", jpeg[: len(jpeg) * 3 // 5], reason="truncated image")
    png = encode(noise(64, 64, 1), "PNG")
    add("truncated png", "truncated.png", png[: len(png) // 2], reason="truncated image")
    add("not an image (text)", "notes.jpg", b"id,title\n1,a csv file saved as .jpg\n", reason="not an image")
    add("jpeg signature, garbage after", "garbage.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg",
        reason="truncated image")
    add("unsupported format (ppm)", "photo.ppm", encode(upright, "PPM"), reason="unsupported image format (PPM)")
    add("pixel bomb: png header 8000x6000 (48 MP)", "bomb48mp.png", png_claiming(8000, 6000),
        reason="too many pixels (8000x6000")
    add("decompression bomb: png header 20000x20000", "bomb400mp.png", png_claiming(20000, 20000),
        reason="too many pixels")

    # A valid JPEG followed by 21 MiB of zeros (decoders ignore trailing bytes): only the byte cap
    # rejects it. Written sparse, so it takes no disk space.
    huge = directory / "huge.jpg"
    with open(huge, "wb") as handle:
        handle.write(encode(upright, "JPEG", quality=95))
        handle.truncate(MAX_PHOTO_BYTES + 2**20)
    zoo.append(ZooPhoto("huge object (21 MiB)", huge, None, "object larger than"))
    return zoo
