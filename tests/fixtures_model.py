"""Fixtures: a tiny but real trained model artifact (real backbone, real data slice).

Trained once per test session at a small image size so every test that needs a Tagger (tagging,
DAGs, UI) gets a real one in seconds.
"""

from __future__ import annotations

import pytest

from fashion_tagging.settings import get_settings

TINY_IMAGE_SIZE = 64
TINY_EPOCHS = 3


def tiny_settings(home, data_dir, **overrides):
    """Settings for quick real training on a slice: small images, few epochs, small batches."""
    values = dict(home=home, data_dir=data_dir, image_size=TINY_IMAGE_SIZE, epochs=TINY_EPOCHS,
                  batch_size=32, inference_batch_size=64, vocabulary_size=5000)
    values.update(overrides)
    return get_settings(**values)


@pytest.fixture(scope="session")
def tiny_settings_factory(ft_home, kaggle_slice_dir):
    return lambda **overrides: tiny_settings(ft_home, kaggle_slice_dir, **overrides)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_settings_factory):
    """Path of a trained + evaluated artifact directory (``Tagger.load(tiny_artifact)``)."""
    from fashion_tagging.evaluate import evaluate
    from fashion_tagging.train import train

    settings = tiny_settings_factory()
    result = train(settings, progress=False)
    evaluate(result.artifact_dir, settings, progress=False)
    return result.artifact_dir
