"""Object stores (local dir and S3 over moto's real HTTP server) and the catalog kept in them."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fashion_tagging.ingest import encode_manifest, import_kaggle_catalog, read_manifests
from fashion_tagging.objectstore import LocalStore, ObjectNotFound, S3Store, local_path, open_store, open_uri
from fashion_tagging.settings import get_settings
from tests.fixtures_services import KAGGLE_SLICE_BAD_ROWS, KAGGLE_SLICE_SIZE, SLICE_WITHOUT_IMAGE


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path.as_uri())
    return request.getfixturevalue("s3_store")


def test_store_round_trip_and_missing_keys(any_store):
    any_store.put("a/one.bin", b"1")
    any_store.put("a/two.bin", b"22")
    any_store.put("b/three.bin", b"333")

    assert any_store.get("a/two.bin") == b"22"
    assert any_store.list_keys("a/") == ["a/one.bin", "a/two.bin"]
    assert any_store.exists("b/three.bin") and not any_store.exists("b/nope.bin")
    with pytest.raises(ObjectNotFound, match="nope.bin"):
        any_store.get("b/nope.bin")

    fetched = any_store.get_many(["a/one.bin", "b/nope.bin", "b/three.bin"])
    assert fetched["a/one.bin"] == b"1" and fetched["b/three.bin"] == b"333"
    assert isinstance(fetched["b/nope.bin"], ObjectNotFound)


def test_capped_reads_stop_at_max_bytes(any_store):
    big = bytes(range(256)) * 40_000  # 10 MB: several blocks of the S3 body stream
    any_store.put("photos/big.bin", big)
    any_store.put("photos/small.bin", b"tiny")

    assert any_store.get_head("photos/big.bin", 1_000_001) == big[:1_000_001]
    assert any_store.get_head("photos/small.bin", 1_000_001) == b"tiny"
    fetched = any_store.get_many(["photos/big.bin", "photos/small.bin", "photos/none.bin"], max_bytes=10)
    assert fetched["photos/big.bin"] == big[:10] and fetched["photos/small.bin"] == b"tiny"
    assert isinstance(fetched["photos/none.bin"], ObjectNotFound)


def test_directories_round_trip(any_store, tmp_path):
    source = tmp_path / "artifact"
    (source / "sub").mkdir(parents=True)
    (source / "config.json").write_text("{}")
    (source / "sub" / "weights.h5").write_bytes(b"\x00" * 1000)

    keys = any_store.upload_dir(source, "models/v1")
    copy = any_store.download_dir("models/v1", tmp_path / "copy")

    assert keys == ["models/v1/config.json", "models/v1/sub/weights.h5"]
    assert (copy / "sub" / "weights.h5").read_bytes() == b"\x00" * 1000
    with pytest.raises(ObjectNotFound):
        any_store.download_dir("models/missing", tmp_path / "none")


def test_open_store_and_uris(tmp_path, s3_endpoint):
    local = open_store(tmp_path.as_uri())
    assert isinstance(local, LocalStore) and local.uri("x/y") == f"{tmp_path.as_uri()}/x/y"
    s3 = open_store("s3://bucket/some/prefix", endpoint_url=s3_endpoint, max_concurrency=4)
    assert isinstance(s3, S3Store) and s3.uri("k") == "s3://bucket/some/prefix/k"
    config = s3.client.meta.config
    assert config.retries["mode"] in ("standard", "adaptive") and config.max_pool_connections == 4
    store, key = open_uri("s3://bucket/models/v1", endpoint_url=s3_endpoint)
    assert (store.bucket, key) == ("bucket", "models/v1")
    spaced = tmp_path / "models dir" / "v1"
    assert local_path(spaced.as_uri()) == local_path(str(spaced)) == spaced and local_path("s3://b/v1") is None
    store, key = open_uri(spaced.as_uri())
    assert (store.root, key) == (spaced.parent.resolve(), "v1")
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://host/x")
    with pytest.raises(ValueError, match="escapes"):
        local.get("../outside")


def test_import_into_s3_is_idempotent(kaggle_slice, s3_store):
    first = import_kaggle_catalog(kaggle_slice, s3_store, manifest_format="parquet")
    again = import_kaggle_catalog(kaggle_slice, s3_store, manifest_format="parquet")

    assert first.products == again.products == KAGGLE_SLICE_SIZE
    assert first.products_without_image == SLICE_WITHOUT_IMAGE
    assert first.images_uploaded == KAGGLE_SLICE_SIZE - SLICE_WITHOUT_IMAGE and again.images_uploaded == 0
    assert len(first.errors) == KAGGLE_SLICE_BAD_ROWS
    assert again.manifest_key == first.manifest_key
    products, errors = read_manifests(s3_store, get_settings().catalog_prefix)
    assert len(products) == KAGGLE_SLICE_SIZE and not errors
    assert products["id"].is_unique
    with_image = products.dropna(subset=["image_key"])
    assert all(s3_store.exists(key) for key in with_image["image_key"])
    assert "<" not in "".join(products["description"].fillna(""))  # HTML cleaned


@pytest.mark.parametrize("manifest_format", ["csv", "jsonl"])
def test_import_formats_and_slices(kaggle_slice, tmp_path, manifest_format):
    store = open_store(tmp_path.as_uri())
    summary = import_kaggle_catalog(kaggle_slice, store, limit=5, manifest_format=manifest_format,
                                    batch_name="first-five")
    products, errors = read_manifests(store, "catalog/")
    assert summary.manifest_key == f"catalog/first-five.{manifest_format}"
    assert len(products) == 5 and not errors
    assert products["split"].isin(["train", "val", "test"]).all()
    assert products["description"].str.len().gt(0).any()


def test_malformed_manifest_rows_are_recorded_not_fatal(tmp_path):
    store = open_store(tmp_path.as_uri())
    good = pd.DataFrame({"id": [1, 2], "productDisplayName": ["Blue Shirt", "Red Shoe"], "year": [2012, 2013]})
    store.put("catalog/a-good.parquet", encode_manifest(good, "parquet"))
    store.put("catalog/b-rows.csv", (
        "id,productDisplayName,articleType\n"
        "10,Green Kurta,Kurtas\n"
        "x1,Bad Id,Tshirts\n"
        ",No Id,Tshirts\n"
        "10,Duplicate,Tshirts\n"
        "11,,Tshirts\n"
        "12,Too,Many,Fields\n"
        "13,Fine Bag,Handbags\n").encode())
    lines = [json.dumps({"id": 20, "productDisplayName": "Watch"}), "{not json", json.dumps([1, 2])]
    store.put("catalog/c-lines.jsonl", ("\n".join(lines) + "\n").encode())  # complete: ends with a line break
    store.put("catalog/d-broken.parquet", b"PAR1 truncated")
    store.put("catalog/e-no-title.csv", b"id,name\n1,x\n")

    products, errors = read_manifests(store, "catalog/")

    assert sorted(products["id"]) == [1, 2, 10, 13, 20]
    assert products.set_index("id").loc[10, "productDisplayName"] == "Green Kurta"
    by_source = {error.source: error for error in errors}
    assert set(by_source) == {
        "catalog/b-rows.csv#row3", "catalog/b-rows.csv#row4", "catalog/b-rows.csv#row5",
        "catalog/b-rows.csv#row6", "catalog/b-rows.csv#row7", "catalog/c-lines.jsonl#row2",
        "catalog/c-lines.jsonl#row3", "catalog/d-broken.parquet", "catalog/e-no-title.csv"}
    assert "not an integer" in by_source["catalog/b-rows.csv#row3"].reason
    assert "duplicate" in by_source["catalog/b-rows.csv#row5"].reason
    assert "title" in by_source["catalog/b-rows.csv#row6"].reason
    assert "fields" in by_source["catalog/b-rows.csv#row7"].reason
    assert all(error.stage == "manifest" for error in errors)

    new_only, _ = read_manifests(store, "catalog/", since_keys=["catalog/a-good.parquet", "catalog/b-rows.csv"])
    assert sorted(new_only["id"]) == [20]
