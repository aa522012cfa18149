"""Ingest at scale: manifests streamed in chunks into PostgreSQL, change detection from the
store listing (no HEAD per file), multipart uploads and resumable downloads on S3 (moto)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging.db import repository, schema
from fashion_tagging.ingest import encode_manifest, load_catalog_into_db, read_manifests
from fashion_tagging.objectstore import S3Store, open_store

MIB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return open_store(tmp_path.as_uri())
    return request.getfixturevalue("s3_store")


def write_catalog(store) -> None:
    """Three manifests, the CSV bigger than a chunk, bad rows on both sides of chunk borders."""
    csv_rows = ["id,productDisplayName,articleType,year"]
    csv_rows += [f"{i},Product {i},Tshirts,2012" for i in range(1, 10)]  # rows 2-10
    csv_rows += ["3,Repeat of an id from the first chunk,Tshirts,2013",  # row 11: duplicate across chunks
                 "x7,Bad id,Tshirts,2012",  # row 12
                 "20,,Tshirts,2012",  # row 13: no title
                 "21,Too,Many,Fields,Here",  # row 14
                 "20,Title this time,Tshirts,2014"]  # row 15: valid, the row-13 one was rejected
    csv_rows += [f"{i},Product {i},Shirts,2012" for i in range(30, 40)]  # rows 16-25
    store.put("catalog/a.csv", ("\n".join(csv_rows) + "\n").encode())  # complete files end with a line break
    lines = [json.dumps({"id": 5, "productDisplayName": "Updated 5"}), "{broken",
             json.dumps({"productDisplayName": "no id"}), json.dumps({"id": 40, "productDisplayName": "Forty"})]
    store.put("catalog/b.jsonl", ("\n".join(lines) + "\n").encode())
    parquet = pd.DataFrame({"id": [50, 51, 50, 52], "productDisplayName": ["A", "B", "again", "C"]})
    store.put("catalog/c.parquet", encode_manifest(parquet, "parquet"))


def products_in(conn) -> dict[int, tuple]:
    rows = conn.execute(sa.select(schema.products.c.product_id, schema.products.c.title,
                                  schema.products.c.year, schema.products.c.source))
    return {row[0]: tuple(row[1:]) for row in rows}


def test_chunked_load_writes_what_a_whole_read_gives(catalog_engine, tmp_path, monkeypatch):
    store = open_store(tmp_path.as_uri())
    write_catalog(store)
    chunk_sizes = []
    upsert = repository.upsert_products
    monkeypatch.setattr(repository, "upsert_products",
                        lambda conn, frame: chunk_sizes.append(len(frame)) or upsert(conn, frame))

    sync = load_catalog_into_db(catalog_engine, store, prefix="catalog/", run_id="night-1", chunk_rows=4)
    whole, whole_errors = read_manifests(store, "catalog/", chunk_rows=10**6)

    assert chunk_sizes and max(chunk_sizes) <= 4 and len(chunk_sizes) > 3
    with catalog_engine.connect() as conn:
        stored = products_in(conn)
        ledger = {row.key: (row.products, row.errors) for row in conn.execute(sa.select(schema.catalog_manifests))}
        recorded = {row.source for row in conn.execute(sa.select(schema.product_errors.c.source))}
    assert stored == {int(row.id): (row.productDisplayName, None if pd.isna(row.year) else int(row.year), row.source)
                      for row in whole.itertuples()}
    assert sync.errors == whole_errors and sync.products_read == len(whole) == sync.products_written == len(stored)
    assert stored[5] == ("Updated 5", None, "catalog/b.jsonl") and stored[20][0] == "Title this time"
    assert stored[50][0] == "A" and 40 in stored  # a JSONL record without id leaves the others' ids integers
    by_source = {error.source: error.reason for error in sync.errors}
    assert set(by_source) == recorded == {
        "catalog/a.csv#row11", "catalog/a.csv#row12", "catalog/a.csv#row13", "catalog/a.csv#row14",
        "catalog/b.jsonl#row2", "catalog/b.jsonl#row3", "catalog/c.parquet#row3"}
    assert "duplicate product id 3" in by_source["catalog/a.csv#row11"]
    assert "fields" in by_source["catalog/a.csv#row14"] and "title" in by_source["catalog/a.csv#row13"]
    # product 5 is counted for b.jsonl, the later manifest, only: as when all were read at once
    assert ledger == {"catalog/a.csv": (24 - 4 - 1, 4), "catalog/b.jsonl": (2, 2), "catalog/c.parquet": (3, 1)}


def test_listing_fingerprints_are_the_per_key_fingerprints(any_store):
    any_store.put("catalog/a.csv", b"id,productDisplayName\n1,a\n")
    any_store.put("catalog/b.jsonl", b"{}")
    any_store.put("other/c.bin", b"c")

    listed = any_store.list_fingerprints("catalog/")

    assert listed == {key: any_store.fingerprint(key) for key in ("catalog/a.csv", "catalog/b.jsonl")}
    assert not any('"' in fingerprint for fingerprint in listed.values())


def test_load_from_s3_takes_fingerprints_from_the_listing(catalog_engine, s3_store):
    write_catalog(s3_store)
    calls = {"HeadObject": 0, "ListObjectsV2": 0}

    def count(event_name, **_):
        calls[event_name.rsplit(".", 1)[1]] += 1

    s3_store.client.meta.events.register("before-call.s3.HeadObject", count)
    s3_store.client.meta.events.register("before-call.s3.ListObjectsV2", count)
    first = load_catalog_into_db(catalog_engine, s3_store, prefix="catalog/", run_id="night-1", chunk_rows=4)
    second = load_catalog_into_db(catalog_engine, s3_store, prefix="catalog/", run_id="night-2", chunk_rows=4)

    assert calls == {"HeadObject": 0, "ListObjectsV2": 2}
    assert len(first.manifest_keys) == 3 and first.products_written == 24
    assert second.manifest_keys == [] and second.products_read == 0  # ledger == listing: nothing re-read
    with catalog_engine.connect() as conn:
        ledger = repository.loaded_manifests(conn)
    assert ledger == {key: s3_store.fingerprint(key) for key in first.manifest_keys}  # same strings as HEAD gives


def test_big_uploads_go_multipart_and_arrive_intact(s3_store, tmp_path):
    store = S3Store(s3_store.bucket, endpoint_url=s3_store.endpoint_url,
                    multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)  # 5 MiB: S3's smallest part
    payload = os.urandom(6 * MIB + 123)
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "weights.h5").write_bytes(payload[::-1])
    (artifact / "config.json").write_text("{}")

    store.put("snapshots/big.parquet", payload)
    store.put("snapshots/small.json", b"{}")
    store.upload_dir(artifact, "models/v1")
    copy = store.download_dir("models/v1", tmp_path / "copy")

    assert store.get("snapshots/big.parquet") == payload
    assert (copy / "weights.h5").read_bytes() == payload[::-1] and (copy / "config.json").read_text() == "{}"
    assert store.fingerprint("snapshots/big.parquet").endswith("-2")  # multipart ETag: md5-of-parts-<n>
    assert store.fingerprint("models/v1/weights.h5").endswith("-2")
    assert "-" not in store.fingerprint("snapshots/small.json")  # small objects: one plain PUT


def test_s3_read_resumes_a_dropped_connection(s3_store):
    from botocore.exceptions import ResponseStreamingError

    payload = os.urandom(3 * MIB)
    s3_store.put("catalog/big.csv", payload)
    requests = []

    class DropsHalfWay:
        def __init__(self, body):
            self.body, self.sent = body, 0

        def read(self, size):
            if self.sent >= MIB:
                raise ResponseStreamingError(error="connection reset by peer")
            block = self.body.read(min(size, MIB - self.sent))
            self.sent += len(block)
            return block

        def close(self):
            self.body.close()

    def drop_first_response(parsed, **_):
        if len(requests) == 1:
            parsed["Body"] = DropsHalfWay(parsed["Body"])

    s3_store.client.meta.events.register("before-call.s3.GetObject",
                                         lambda params, **_: requests.append(dict(params.get("headers", {}))))
    s3_store.client.meta.events.register("after-call.s3.GetObject", drop_first_response)

    with s3_store.open("catalog/big.csv") as handle:
        assert handle.read() == payload
    assert len(requests) == 2 and requests[1]["Range"] == f"bytes={MIB}-" and "If-Match" in requests[1]
