"""The feature store: keyed by each photo's content, append-only shards, read on demand."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import fashion_tagging.features as features
from fashion_tagging.features import FeatureStore, StoredRows, catalog_image_embeddings, photo_digest
from fashion_tagging.settings import IMAGE_EMBEDDING_DIM, PROJECT_ROOT

SIZE = 32


def solid_jpeg(path, colour) -> str:
    Image.new("RGB", (60, 80), colour).save(path, "JPEG", quality=95)
    return str(path)


@pytest.fixture(scope="module")
def mean_colour_backbone():
    """A stand-in backbone (pooled pixels -> 1280-d): photos of other colours get other vectors."""
    import keras

    pixels = keras.Input((SIZE, SIZE, 3))
    return keras.Model(pixels, keras.layers.Dense(IMAGE_EMBEDDING_DIM)(keras.layers.GlobalAveragePooling2D()(pixels)))


@pytest.fixture
def embedded_photo_counts(monkeypatch) -> list[int]:
    """How many photos each backbone pass embedded."""
    counts, real = [], features.embed_image_files

    def counting(paths, *args, **kwargs):
        counts.append(len(paths))
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(features, "embed_image_files", counting)
    return counts


def test_a_replaced_photo_is_embedded_again_and_its_old_vector_never_served(
        tmp_path, mean_colour_backbone, embedded_photo_counts):
    embed = dict(backbone_name="toy", image_size=SIZE, cache_dir=tmp_path / "cache", progress=False,
                 backbone=mean_colour_backbone)
    photo = solid_jpeg(tmp_path / "17.jpg", (200, 30, 30))
    red = catalog_image_embeddings([17], [photo], **embed).vectors[0]
    solid_jpeg(tmp_path / "17.jpg", (30, 30, 200))  # the same product and path, a new photo

    blue = catalog_image_embeddings([17], [photo], **embed)
    assert embedded_photo_counts == [1, 1]
    assert blue.has_image[0] and not np.allclose(blue.vectors[0], red, atol=1e-3)
    again = catalog_image_embeddings([17], [photo], **embed)  # the new photo is stored from now on
    assert embedded_photo_counts == [1, 1] and np.array_equal(again.vectors[0], blue.vectors[0])


def test_a_photo_shared_by_many_products_is_embedded_once(tmp_path, mean_colour_backbone, embedded_photo_counts):
    shared = [solid_jpeg(tmp_path / f"{pid}.jpg", (10, 160, 10)) for pid in range(5)]  # replicas, own files
    paths = [*shared, solid_jpeg(tmp_path / "other.jpg", (240, 240, 20)), None, str(tmp_path / "gone.jpg")]
    result = catalog_image_embeddings(range(8), paths, backbone_name="toy", image_size=SIZE,
                                      cache_dir=tmp_path / "cache", progress=False, backbone=mean_colour_backbone)
    assert embedded_photo_counts == [3]  # the shared photo, the other one, the unreadable file (for its reason)
    assert result.has_image.tolist() == [True] * 6 + [False, False]
    assert all(np.array_equal(result.vectors[0], result.vectors[i]) for i in range(1, 5))
    assert len(result.photo_vectors) == 2  # held once per distinct photo
    reasons = {error.product_id: error.reason for error in result.errors}
    assert reasons[6] == "product has no image" and "cannot read file" in reasons[7]


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from fashion_tagging.features import FeatureStore, photo_digest

    store, first = FeatureStore(sys.argv[1]), int(sys.argv[2])
    for start in range(first, first + 400, 20):  # 20 shards; the two writers overlap on half their photos
        keys = np.array([photo_digest(str(k).encode()) for k in range(start, start + 20)])
        vectors = np.repeat(np.arange(start, start + 20, dtype=np.float16)[:, None], 1280, axis=1)
        tops = np.repeat(vectors[:, :12], 1, axis=0).reshape(20, 2, 2, 3)
        store.append(keys, vectors, tops)
""")


def test_two_concurrent_writers_leave_a_consistent_store(tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "store"), str(first)], cwd=PROJECT_ROOT)
               for first in (0, 200)]
    assert [w.wait(timeout=120) for w in writers] == [0, 0]

    store = FeatureStore(tmp_path / "store")
    assert len(store.shards()) == 40 and not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".")]
    index = store.index(with_top_inputs=True)
    keys = np.array([photo_digest(str(k).encode()) for k in range(600)])
    shard, row = index.locate(keys)
    assert len(index.keys) == 600 and (shard >= 0).all()
    vectors = StoredRows(index.vectors, shard, row, (IMAGE_EMBEDDING_DIM,))[np.arange(600)]
    assert np.array_equal(vectors[:, 0], np.arange(600, dtype=np.float16)) and (vectors == vectors[:, :1]).all()
    tops = StoredRows(index.top_inputs, shard, row, (2, 2, 3))[np.arange(600)]
    assert np.array_equal(tops.reshape(600, -1)[:, 5], np.arange(600, dtype=np.float16))


class RecordingRows(StoredRows):
    """Stored rows that record how many rows each read gathers."""

    reads: list

    def __getitem__(self, selection):
        out = super().__getitem__(selection)
        self.reads.append(len(out))
        return out


def test_backbone_tuning_reads_the_store_a_batch_at_a_time(tmp_path):
    """Stage 1's input is never loaded whole: each step gathers its batch from the memory-mapped shards."""
    from fashion_tagging.train import _top_dataset

    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    expected = {}
    for shard in range(3):
        keys = np.array([photo_digest(f"{shard}-{i}".encode()) for i in range(30)])
        tops = rng.normal(size=(30, 2, 2, 3)).astype(np.float16)
        store.append(keys, np.zeros((30, IMAGE_EMBEDDING_DIM)), tops)
        expected.update(zip(keys.tolist(), tops))
    index = store.index(with_top_inputs=True)
    keys = np.array(list(expected))
    shard, row = index.locate(keys)
    stored = RecordingRows(index.top_inputs, shard, row, (2, 2, 3))
    stored.reads = []
    assert all(isinstance(array, np.memmap) for array in stored.arrays)

    labels = {"articleType": np.arange(len(keys)) % 4}
    batches = list(_top_dataset(stored, labels, batch_size=8, training=False, seed=0))
    assert max(stored.reads) == 8 and sum(stored.reads) == len(keys)  # a batch per read, every row once
    gathered = np.concatenate([x.numpy() for x, _, _ in batches])
    assert np.allclose(gathered, np.stack([expected[k] for k in keys.tolist()]).astype(np.float32))


def test_evaluating_a_trained_model_on_a_fresh_worker_embeds_no_photo_again(
        tiny_artifact, tiny_settings_factory, tmp_path, monkeypatch):
    """The evaluation cache lives in the shared store, not in the artifact a worker downloads."""
    from fashion_tagging.evaluate import evaluate

    fresh = tmp_path / tiny_artifact.name
    shutil.copytree(tiny_artifact, fresh)  # as a worker fetches it from the object store
    assert not (fresh / "cache").exists()

    def no_embedding(*args, **kwargs):
        raise AssertionError("evaluation embedded a photo the feature store holds")

    monkeypatch.setattr(features, "embed_image_files", no_embedding)
    report = evaluate(fresh, tiny_settings_factory(), progress=False)
    assert report["products"] > 0 and report["modes"]["image_only"]["articleType"]["accuracy"] > 0


def test_a_retrain_downloads_a_photo_again_only_when_the_object_store_replaced_it(tmp_path):
    import pandas as pd

    from fashion_tagging.objectstore import open_configured_store
    from fashion_tagging.pipeline import materialize_images
    from fashion_tagging.settings import get_settings

    settings = get_settings(home=tmp_path / "home", object_store_url=(tmp_path / "store").as_uri())
    store = open_configured_store(settings)
    store.put("images/1.jpg", b"the first photo")
    store.put("images/2.jpg", b"another photo")
    frame = pd.DataFrame({"image_key": ["images/1.jpg", "images/2.jpg", None, "images/1.jpg"]})
    paths = materialize_images(settings, frame)
    assert paths[2] is None and paths[0] == paths[3]
    assert [open(p, "rb").read() for p in paths[:2]] == [b"the first photo", b"another photo"]

    with open(paths[1], "wb") as local:
        local.write(b"marked")  # a download would overwrite it
    store.put("images/1.jpg", b"its replacement")
    paths = materialize_images(settings, frame)
    assert [open(p, "rb").read() for p in paths[:2]] == [b"its replacement", b"marked"]
