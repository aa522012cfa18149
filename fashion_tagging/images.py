"""Photo decoding: one rule for tagging (bytes from a store) and training (files through tf.data).

Product photos are portrait shots on white: they are resized keeping their aspect ratio and
padded with white to a square, so a shoe is not stretched into a different shape.

Both sides go through :func:`decode_image` (Pillow): tagging calls it on fetched bytes, training
calls it inside tf.data through ``tf.numpy_function`` (:func:`photo_tensors`), so a photo gives
the same pixels, or is rejected with the same reason, whichever side reads it. The rule:

* at most :data:`MAX_PHOTO_BYTES` are read and at most :data:`MAX_PHOTO_PIXELS` decoded;
* the EXIF orientation is applied (a phone photo saved sideways is tagged upright);
* CMYK, 16-bit, palette and grayscale photos become 8-bit RGB; transparency is flattened onto
  white (the catalog's background), not black;
* an animated GIF/WebP/PNG gives its first frame;
* empty, truncated, corrupt and non-image bytes raise :class:`ImageDecodeError` with a short reason.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PAD_VALUE = 255.0
# A catalog photo is a few KB (60x80 JPEG) to a few MB (a 24 MP camera JPEG). 20 MiB is above any
# sane product photo, and bounds what one object can cost a worker: the tagging fetch and the
# training file read stop at this many bytes + 1, so a mistaken 5 GB upload is never read whole.
MAX_PHOTO_BYTES = 20 * 1024 * 1024
# 40 MP decodes to 120 MB of RGB; refused from the header alone, before decoding, so a
# decompression bomb (a few KB of PNG claiming 100,000 x 100,000 pixels) costs nothing.
# (Pillow's own guard, Image.MAX_IMAGE_PIXELS, only warns up to ~179 MP.)
MAX_PHOTO_PIXELS = 40_000_000
# Names the pixels decode_image gives; change it whenever they change: embedding caches made under
# another rule are then rebuilt (training must see the pixels tagging sees). "pillow-1" replaced
# tf.io.decode_image + tf.image.resize, whose embeddings differ by cosine down to 0.95 (decode_parity).
DECODE_RULE = "pillow-1"
# Formats a photo may be in; anything else (EPS, PDF, PSD, ICO...) is refused before decoding.
PHOTO_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # JPEG includes multi-picture (MPO)
# (decoded photo, its path) -> the photo to use instead: training's augmented views (augment.py).
PhotoAugmentation = Callable[[Image.Image, str], Image.Image]


class ImageDecodeError(ValueError):
    """The bytes are not a usable photo; ``reason`` says why ("empty file", "truncated image"...)."""

    def __init__(self, reason: str):
        super().__init__(f"cannot decode image: {reason}")
        self.reason = reason


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Photo bytes -> size x size x 3 uint8, upright, aspect kept, white padding.

    Raises :class:`ImageDecodeError` for bytes that are not a usable photo. Pillow, not eager
    TensorFlow: one image at a time, TF op dispatch costs ~16 ms where Pillow takes ~0.5 ms.
    """
    return _fit(open_photo(data), size)


def open_photo(data: bytes) -> Image.Image:
    """Photo bytes -> an upright 8-bit RGB Pillow image at full resolution (the caps applied).

    Raises :class:`ImageDecodeError`. (No JPEG draft mode: DCT-scaled decoding of big photos
    would be faster but would no longer match :func:`to_model_size` on a full decode.)
    """
    if len(data) > MAX_PHOTO_BYTES:
        raise ImageDecodeError(f"object larger than {MAX_PHOTO_BYTES // 2**20} MiB ({MAX_PHOTO_BYTES:,} bytes)")
    if not data:
        raise ImageDecodeError("empty file")
    try:
        source = Image.open(io.BytesIO(data), formats=PHOTO_FORMATS)
    except UnidentifiedImageError:
        raise ImageDecodeError(_unidentified(data)) from None
    except Image.DecompressionBombError as error:  # Pillow's own guard, above ~179 MP
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        raise ImageDecodeError(f"too many pixels ({int(pixels[1]):,} > {MAX_PHOTO_PIXELS:,})" if pixels
                               else f"too many pixels (over {MAX_PHOTO_PIXELS:,})") from None
    except MemoryError:
        raise
    except Exception as error:
        raise ImageDecodeError(_failure(error)) from None
    with source:
        width, height = source.size
        if width * height > MAX_PHOTO_PIXELS:
            raise ImageDecodeError(f"too many pixels ({width}x{height} = {width * height:,} > {MAX_PHOTO_PIXELS:,})")
        if not width or not height:
            raise ImageDecodeError("image has zero width or height")
        try:
            source.load()
            return _to_rgb(_upright(source))
        except MemoryError:
            raise
        except Exception as error:
            raise ImageDecodeError(_failure(error)) from None


def to_model_size(image: np.ndarray, size: int) -> np.ndarray:
    """An already decoded image of any size -> size x size x 3 uint8 (no-op when it already fits).

    The same resize and padding as :func:`decode_image`; gray (HxW), RGBA and float (0..255)
    arrays are accepted too.
    """
    image = np.asarray(image)
    if image.shape == (size, size, 3):
        return image.astype(np.uint8, copy=False)
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    return _fit(_to_rgb(Image.fromarray(image)), size)


# --- training side: the same rule inside tf.data --------------------------------------------------


def read_photo_file(path: str | os.PathLike) -> bytes:
    """At most ``MAX_PHOTO_BYTES + 1`` bytes of a photo file: one more than the cap, so an
    oversized file is seen as such by :func:`decode_image` without reading it whole."""
    try:
        with open(path, "rb") as handle:
            return handle.read(MAX_PHOTO_BYTES + 1)
    except OSError as error:
        raise ImageDecodeError(f"cannot read file ({error.strerror or type(error).__name__})") from None


def load_photo_file(path: str | os.PathLike, size: int, augment: PhotoAugmentation | None = None,
                    ) -> tuple[np.ndarray, str]:
    """(size x size x 3 uint8, "") for a usable photo file, else (white image, the error message).

    The message is ``str(ImageDecodeError)``: what tagging records for the same bytes.
    ``augment`` (training's augmented views) changes the decoded photo before the resize.
    """
    try:
        if not path:
            raise ImageDecodeError("no photo file")
        if augment is not None:
            return _fit(augment(open_photo(read_photo_file(path)), os.fsdecode(path)), size), ""
        return decode_image(read_photo_file(path), size), ""
    except ImageDecodeError as error:
        return np.full((size, size, 3), int(PAD_VALUE), np.uint8), str(error)


def photo_tensors(path, size: int, augment: PhotoAugmentation | None = None):
    """tf.data op: a scalar path tensor -> (size x size x 3 float32 pixels 0..255, reason string).

    :func:`load_photo_file` through ``tf.numpy_function``; the reason is "" for a usable photo,
    else the decode error (and the pixels are white). Pillow releases the GIL while decoding and
    resizing, so parallel ``map`` calls do overlap.
    """
    import tensorflow as tf

    def load(encoded_path):
        image, reason = load_photo_file(os.fsdecode(encoded_path), size, augment)
        return image, np.array(reason.encode("utf-8"), dtype=object)

    image, reason = tf.numpy_function(load, [path], (tf.uint8, tf.string), stateful=False, name="decode_photo")
    image.set_shape([size, size, 3])
    reason.set_shape([])
    return tf.cast(image, tf.float32), reason


def file_image_dataset(paths: list[str], size: int, batch_size: int, augment: PhotoAugmentation | None = None):
    """Parallel, prefetching tf.data pipeline of (row index, float32 image, reason) over image files.

    A photo that cannot be used comes out white with its reason (b"" when fine), so callers
    record why. ``ignore_errors`` stays as a backstop for anything unexpected (a row that never
    comes out is still reported, with a generic reason).
    """
    import tensorflow as tf

    indices = tf.data.Dataset.from_tensor_slices((np.arange(len(paths), dtype=np.int64), list(paths)))

    def load(index, path):
        pixels, reason = photo_tensors(path, size, augment)
        return index, pixels, reason

    return (
        indices.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )


# --- the rule's parts -----------------------------------------------------------------------------


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (phones store sideways and tag the rotation); broken EXIF: as stored."""
    try:
        return ImageOps.exif_transpose(image)  # a new image: the caller closes the source
    except Exception:
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: 16/32-bit gray scaled (not clipped), transparency onto white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":  # 16-bit samples (PNG, TIFF): 0..65535 -> 0..255
            values = values / 257.0
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (int(PAD_VALUE),) * 3 + (255,))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """RGB image -> size x size x 3 uint8: bilinear resize keeping the aspect ratio, white padding."""
    width, height = image.size
    scale = min(size / height, size / width)
    new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(image.resize((new_width, new_height), Image.Resampling.BILINEAR), dtype=np.uint8)
    # Padded in numpy: the same pixels as pasting onto a white Pillow canvas, one copy fewer.
    fitted = np.full((size, size, 3), int(PAD_VALUE), dtype=np.uint8)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    fitted[top:top + new_height, left:left + new_width] = resized
    return fitted


def _unidentified(data: bytes) -> str:
    """Why Pillow found no photo: an image in a format photos are not accepted in, or no image at all."""
    try:
        with Image.open(io.BytesIO(data)) as other:  # header only: nothing is decoded
            return f"unsupported image format ({other.format})"
    except Exception:
        return "not an image"


def _failure(error: Exception) -> str:
    """Short reason for a failed decode: truncated data, or some other corruption."""
    message = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    if isinstance(error, EOFError) or "truncated" in message.lower():
        return "truncated image"
    return f"corrupt image ({message})"
