"""Perturbations of product photos and texts: training-time augmentation and the robustness families.

A shop's real inputs are not this catalog's clean ones: titles carry typos, photos come rotated,
cropped, recompressed or in grayscale. Training sees such inputs through the same functions the
robustness benchmark (``benchmarks/robustness.py``) scores the model with, at its own seeds.

Photo perturbations act on the decoded photo at its own resolution (``images.open_photo``),
before the resize to the model's input, as a shop's upload would differ. Every function is
deterministic given its ``numpy.random.Generator``.
"""

from __future__ import annotations

import dataclasses
import io
import re
import string
import zlib

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

WHITE = (255, 255, 255)
# Names the augmented views' pixels (training caches their activations under this name);
# change it whenever ``augmented_view`` changes.
AUGMENTATION_RECIPE = "views-1"
_WORD_RE = re.compile(r"[A-Za-z]{2,}")


# --- photos -----------------------------------------------------------------------------------------


def rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotated about its centre, same size, the uncovered corners white (the catalog's background)."""
    return image.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=WHITE)


def crop(image: Image.Image, keep: float, rng: np.random.Generator | None = None) -> Image.Image:
    """``keep`` of each side (0 < keep <= 1), centred, or at a random offset when ``rng`` is given."""
    width, height = image.size
    new_width, new_height = max(1, round(width * keep)), max(1, round(height * keep))
    if rng is None:
        left, top = (width - new_width) // 2, (height - new_height) // 2
    else:
        left = int(rng.integers(0, width - new_width + 1))
        top = int(rng.integers(0, height - new_height + 1))
    return image.crop((left, top, left + new_width, top + new_height))


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    """Re-encoded as JPEG at ``quality`` (1-95): the blocks and ringing of a recompressed upload."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        return reloaded.convert("RGB")


def grayscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def low_resolution(image: Image.Image, factor: float) -> Image.Image:
    """Down-sampled by ``factor`` (> 1) and back to its size: a thumbnail blown up."""
    width, height = image.size
    small = image.resize((max(1, round(width / factor)), max(1, round(height / factor))), Image.Resampling.BILINEAR)
    return small.resize((width, height), Image.Resampling.BILINEAR)


def colour_jitter(image: Image.Image, rng: np.random.Generator, strength: float = 0.25) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor in [1 - strength, 1 + strength]."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return image


def augmented_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random training view of a photo (``AUGMENTATION_RECIPE``).

    Each step applies with its own probability, so a view mixes a few: a mirror, a rotation
    within 12 degrees, a crop keeping 80-100 % of each side, a colour jitter, and now and then
    grayscale, heavy JPEG or a low-resolution copy.
    """
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.7:
        image = rotate(image, float(rng.uniform(-12, 12)))
    if rng.random() < 0.6:
        image = crop(image, float(rng.uniform(0.8, 1.0)), rng)
    if rng.random() < 0.6:
        image = colour_jitter(image, rng)
    if rng.random() < 0.15:
        image = grayscale(image)
    if rng.random() < 0.3:
        image = jpeg(image, int(rng.integers(8, 50)))
    if rng.random() < 0.15:
        image = low_resolution(image, float(rng.uniform(1.5, 3.0)))
    return image


def view_seed(key: str, view: int, seed: int = 0) -> int:
    """A stable per-photo seed (``key``: the photo's path or id) so a cached view can be recomputed."""
    return zlib.crc32(f"{AUGMENTATION_RECIPE}:{seed}:{view}:{key}".encode())


@dataclasses.dataclass(frozen=True)
class AugmentedView:
    """The ``index``-th augmented view of every photo: an ``images.PhotoAugmentation`` with a name.

    The same (recipe, seed, index) always gives the same pixels for a photo, so its backbone
    activations can be cached under ``name`` like the clean ones.
    """

    index: int
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{AUGMENTATION_RECIPE}-seed{self.seed}-view{self.index}"

    def __call__(self, image: Image.Image, key: str) -> Image.Image:
        return augmented_view(image, np.random.default_rng(view_seed(key, self.index, self.seed)))


# --- texts ------------------------------------------------------------------------------------------


def misspell_word(word: str, rng: np.random.Generator) -> str:
    """One typo: two neighbouring letters swapped, a letter dropped, doubled or replaced."""
    if len(word) < 2:
        return word
    i = int(rng.integers(0, len(word) - 1))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i + 1] + word[i] + word[i + 1:]
    letter = string.ascii_lowercase[int(rng.integers(0, 26))]
    return word[:i] + letter + word[i + 1:]


def misspell(text: str, fraction: float, rng: np.random.Generator) -> str:
    """A typo in each word of 2+ letters with probability ``fraction``; the rest of the text unchanged."""
    if not isinstance(text, str) or not fraction:
        return text if isinstance(text, str) else ""
    return _WORD_RE.sub(lambda m: misspell_word(m.group(0), rng) if rng.random() < fraction else m.group(0), text)


def drop_words(text: str, fraction: float, rng: np.random.Generator) -> str:
    """Each word removed with probability ``fraction``."""
    words = text.split() if isinstance(text, str) else []
    return " ".join(w for w in words if rng.random() >= fraction)


def shuffle_words(text: str, rng: np.random.Generator) -> str:
    """The same words in a random order (a title template unlike this catalog's)."""
    words = text.split() if isinstance(text, str) else []
    return " ".join(words[i] for i in rng.permutation(len(words)))
