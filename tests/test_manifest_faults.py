"""Real manifest faults, on real manifests in a store and a real database (docs/STORAGE.md, "Catalog layout").

* a value of the wrong type: that row is an error with its reason, the rest of the manifest loads;
* a required column missing: the manifest is rejected whole, stays out of the ledger, is read
  (and reported) again each run, and loads once fixed;
* the same product in two manifests: the one latest in key order wins, whichever night each came;
* a half-written object (CSV / JSON Lines cut mid-line, truncated Parquet): rejected whole, never
  half-loaded (even when chunks were written before the cut was seen), loaded once rewritten;
* a deleted product (``deleted`` true): a tombstone, tags and embeddings gone, hidden from every
  reader, no tagging work; a later manifest listing it again restores it.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging import dashboard
from fashion_tagging.db import repository, schema
from fashion_tagging.ingest import encode_manifest, load_catalog_into_db, read_manifests
from fashion_tagging.objectstore import open_store
from tests.fixtures_services import synthetic_predictions

VERSION = "v-faults"


@pytest.fixture
def store(tmp_path):
    return open_store((tmp_path / "store").as_uri())


def load(engine, store, run_id: str, **kwargs):
    return load_catalog_into_db(engine, store, prefix="catalog/", run_id=run_id, **kwargs)


def products(engine) -> dict[int, dict]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.products)).mappings().all()
    return {row["product_id"]: dict(row) for row in rows}


def errors_of(engine, run_id: str) -> dict[str, str]:
    e = schema.product_errors
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(e.c.source, e.c.reason).where(e.c.run_id == run_id)).all())


def ledger(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return repository.loaded_manifests(conn)


def jsonl(*records) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


def test_a_value_of_the_wrong_type_rejects_its_row_only(catalog_engine, store):
    store.put("catalog/a.csv", b"id,productDisplayName,year,articleType\n1,Shirt,2012,Shirts\n2,Shoe,20x2,Shoes\n"
                               b"3,Bag,,Bags\n")
    store.put("catalog/b.jsonl", jsonl(
        {"id": 1, "productDisplayName": "Shirt v2", "year": "abc"},  # a bad update: the stored row stays
        {"id": 4.0, "productDisplayName": "Four", "year": 2013.0},  # integral floats (a number column with nulls)
        {"id": 5, "productDisplayName": {"en": "Five"}},
        {"id": 6, "productDisplayName": 12345, "brandName": 361},  # whole numbers as text: their digits
        {"id": 7, "productDisplayName": "Seven", "split": "training"},
        {"id": 99999999999999999999, "productDisplayName": "Too big"},
        {"id": 8, "productDisplayName": "Eight", "year": 99999},
        {"id": 9, "productDisplayName": "Nine", "articleType": ["Shirts"], "deleted": "maybe"},
        {"id": 10, "productDisplayName": "Ten", "gender": True}))
    typed = pd.DataFrame({"id": [11, 12], "productDisplayName": ["Eleven", "Twelve"], "year": ["2014", "soon"],
                          "usage": [1.5, None]})
    store.put("catalog/c.parquet", encode_manifest(typed, "parquet"))

    sync = load(catalog_engine, store, "night-1", chunk_rows=3)

    stored = products(catalog_engine)
    assert sorted(stored) == [1, 3, 4, 6]
    assert (stored[1]["title"], stored[1]["year"], stored[1]["source"]) == ("Shirt", 2012, "catalog/a.csv")
    assert stored[3]["year"] is None and (stored[4]["title"], stored[4]["year"]) == ("Four", 2013)
    assert (stored[6]["title"], stored[6]["brand"]) == ("12345", "361")
    reasons = errors_of(catalog_engine, "night-1")
    assert reasons == {error.source: error.reason for error in sync.errors}
    expected = {
        "catalog/a.csv#row3": "year must be a whole number from 1 to 9999, not str '20x2'",
        "catalog/b.jsonl#row1": "year must be a whole number from 1 to 9999, not str 'abc'",
        "catalog/b.jsonl#row3": "productDisplayName must be text, not dict {'en': 'Five'}",
        "catalog/b.jsonl#row5": "split must be one of train, val, test (or empty), not str 'training'",
        "catalog/b.jsonl#row6": "product id is out of range (at most 9223372036854775807): '99999999999999999999'",
        "catalog/b.jsonl#row7": "year must be a whole number from 1 to 9999, not int 99999",
        "catalog/b.jsonl#row8": "deleted must be true or false, not str 'maybe'",
        "catalog/b.jsonl#row9": "gender must be text, not bool True",
        "catalog/c.parquet#row1": "usage must be text, not float 1.5",
        "catalog/c.parquet#row2": "year must be a whole number from 1 to 9999, not str 'soon'",
    }
    assert reasons == expected
    assert sync.rejected == [] and set(ledger(catalog_engine)) == {"catalog/a.csv", "catalog/b.jsonl",
                                                                     "catalog/c.parquet"}
    whole, whole_errors = read_manifests(store, "catalog/")  # the same rules read at once
    assert sorted(whole["id"]) == [1, 3, 4, 6] and whole_errors == sync.errors


def test_typed_ids_stay_integers_beside_a_row_without_one(catalog_engine, store):
    """An integral float id next to a record with no id (a column with nulls) is still an integer id."""
    store.put("catalog/a.jsonl", jsonl({"id": 5, "productDisplayName": "Five"}, {"productDisplayName": "no id"},
                                       {"id": 6.0, "productDisplayName": "Six", "year": None}))
    sync = load(catalog_engine, store, "night-1", chunk_rows=10)
    assert sorted(products(catalog_engine)) == [5, 6]
    assert [(error.source, error.reason) for error in sync.errors] == [("catalog/a.jsonl#row2", "missing product id")]


@pytest.mark.parametrize("manifest_format", ["csv", "jsonl", "parquet"])
def test_a_manifest_missing_a_required_column_is_rejected_until_fixed(catalog_engine, store, manifest_format):
    key = f"catalog/new.{manifest_format}"
    broken = pd.DataFrame({"id": [1, 2], "title": ["Shirt", "Shoe"]})  # productDisplayName misspelt
    store.put("catalog/good.csv", b"id,productDisplayName\n7,Hat\n")
    store.put(key, encode_manifest(broken, manifest_format))

    first = load(catalog_engine, store, "night-1")
    second = load(catalog_engine, store, "night-2")

    assert sorted(products(catalog_engine)) == [7]
    assert first.rejected == second.rejected == [key] and second.manifest_keys == [key]  # read again
    for run_id in ("night-1", "night-2"):  # and reported again, every run, until fixed
        reason = errors_of(catalog_engine, run_id)[key]
        assert reason.startswith("manifest lacks required columns ['productDisplayName'] (its columns: id, title)")
        assert reason.endswith("nothing of it was loaded")
    assert set(ledger(catalog_engine)) == {"catalog/good.csv"}

    store.put(key, encode_manifest(broken.rename(columns={"title": "productDisplayName"}), manifest_format))
    fixed = load(catalog_engine, store, "night-3")
    assert fixed.manifest_keys == [key] and fixed.rejected == [] and fixed.products_written == 2
    assert sorted(products(catalog_engine)) == [1, 2, 7] and set(ledger(catalog_engine)) == {"catalog/good.csv", key}
    assert load(catalog_engine, store, "night-4").manifest_keys == []


def test_the_manifest_latest_in_key_order_wins_whatever_the_night(catalog_engine, store):
    # one night: both new, product 7 in each; uploaded "later" first, to show upload order does not matter
    store.put("catalog/2026-11-29-b.jsonl", jsonl({"id": 7, "productDisplayName": "Seven from b", "year": 2014}))
    store.put("catalog/2026-11-29-a.csv", b"id,productDisplayName,year\n7,Seven from a,2012\n8,Eight,2012\n")
    first = load(catalog_engine, store, "night-1")
    stored = products(catalog_engine)
    assert (stored[7]["title"], stored[7]["year"], stored[7]["source"]) == ("Seven from b", 2014,
                                                                             "catalog/2026-11-29-b.jsonl")
    assert first.products_written == 2

    # a later night rewrites the earlier manifest: its product 7 still loses to b, the rest applies
    store.put("catalog/2026-11-29-a.csv", b"id,productDisplayName,year\n7,Seven fixed in a,2012\n8,Eight v2,2012\n")
    second = load(catalog_engine, store, "night-2")
    stored = products(catalog_engine)
    assert second.manifest_keys == ["catalog/2026-11-29-a.csv"] and second.products_written == 1
    assert stored[7]["title"] == "Seven from b" and stored[8]["title"] == "Eight v2"

    # a manifest later in key order changes it
    store.put("catalog/2026-11-30.csv", b"id,productDisplayName,year\n7,Seven from the 30th,2015\n")
    load(catalog_engine, store, "night-3")
    stored = products(catalog_engine)
    assert (stored[7]["title"], stored[7]["source"]) == ("Seven from the 30th", "catalog/2026-11-30.csv")
    whole, _ = read_manifests(store, "catalog/")
    assert whole.set_index("id").loc[7, "productDisplayName"] == "Seven from the 30th"


def test_half_written_manifests_are_rejected_whole_and_loaded_once_rewritten(catalog_engine, store):
    frame = pd.DataFrame({"id": range(1, 31), "productDisplayName": [f"Product number {i}" for i in range(1, 31)]})
    complete = {f"catalog/{name}.{fmt}": encode_manifest(frame.assign(id=frame["id"] + offset), fmt)
                for name, fmt, offset in (("a", "csv", 0), ("b", "jsonl", 100), ("c", "parquet", 200))}
    for key, data in complete.items():
        store.put(key, data[:-9])  # cut mid-line (CSV, JSON Lines) / without its footer (Parquet)
    store.put("catalog/d.csv", b"id,productDisplayName\n500,Whole\n")

    sync = load(catalog_engine, store, "night-1", chunk_rows=4)  # chunks were written before each cut was seen

    assert sorted(products(catalog_engine)) == [500]  # nothing half-loaded
    assert sync.rejected == sorted(complete) and set(ledger(catalog_engine)) == {"catalog/d.csv"}
    reasons = errors_of(catalog_engine, "night-1")
    assert set(reasons) == set(complete)  # one error per file, no row errors for the cut-off line
    for key in ("catalog/a.csv", "catalog/b.jsonl"):
        assert "does not end with a line break: it looks half-written" in reasons[key]
    assert reasons["catalog/c.parquet"].startswith("unreadable parquet manifest")
    assert read_manifests(store, "catalog/")[0]["id"].tolist() == [500]

    for key, data in complete.items():  # the uploads finish
        store.put(key, data)
    rewritten = load(catalog_engine, store, "night-2", chunk_rows=4)
    assert rewritten.rejected == [] and rewritten.products_written == 90 and not rewritten.errors
    assert len(products(catalog_engine)) == 91 and len(ledger(catalog_engine)) == 4


def test_a_text_manifest_must_end_with_a_line_break(catalog_engine, store):
    """A cut in the last field leaves a well-formed but truncated row: only the missing line break tells."""
    store.put("catalog/a.csv", b"id,productDisplayName\n1,Shirt\n2,Blue Sh")
    sync = load(catalog_engine, store, "night-1")
    assert sync.rejected == ["catalog/a.csv"] and products(catalog_engine) == {}
    store.put("catalog/a.csv", b"id,productDisplayName\r\n1,Shirt\r\n2,Blue Shoe\r\n")  # CRLF is a line break too
    assert load(catalog_engine, store, "night-2").products_written == 2


def tag_all(engine, ids, seed=1):
    with engine.begin() as conn:
        repository.register_model(conn, VERSION, "efficientnet-lite0", 224, False, "file:///tmp/x", {}, 0.9)
        repository.promote_model(conn, VERSION)
        repository.write_tags_and_embeddings(conn, VERSION, "tag-1", ids, synthetic_predictions(len(ids), seed=seed))
        conn.execute(schema.model_versions.update().where(schema.model_versions.c.version == VERSION)
                     .values(tagged_seq=repository.newest_change_seq(conn)))
    repository.activate_model(engine, VERSION)


def stats_total(conn) -> int:
    return int(conn.execute(sa.text("SELECT coalesce(sum(products), 0) FROM tag_stats WHERE model_version = :v"),
                            {"v": VERSION}).scalar())


def stats_match_tags(conn) -> bool:
    kept = conn.execute(sa.text("SELECT article_type, confidence_bin, products FROM tag_stats "
                                "WHERE model_version = :v AND products <> 0 ORDER BY 1, 2"), {"v": VERSION}).all()
    counted = conn.execute(sa.text(
        f"SELECT article_type, {repository._CONFIDENCE_BIN_SQL}, count(*) FROM tags WHERE model_version = :v "
        "GROUP BY 1, 2 ORDER BY 1, 2"), {"v": VERSION}).all()
    return [tuple(row) for row in kept] == [tuple(row) for row in counted]


def test_a_deleted_product_is_a_tombstone_hidden_from_readers_and_not_tagged(catalog_engine, store):
    ids = list(range(1, 9))
    store.put("catalog/2026-11-01.csv", ("id,productDisplayName,image_key\n"
                                         + "".join(f"{i},Product {i},images/{i}.jpg\n" for i in ids)).encode())
    load(catalog_engine, store, "night-1")
    tag_all(catalog_engine, ids)
    with catalog_engine.connect() as conn:
        seq_before = conn.execute(sa.text("SELECT change_seq FROM products WHERE product_id = 3")).scalar_one()

    # a deletions manifest: id + deleted only (99 is unknown to the catalog); a row of it that is not
    # a deletion is an ordinary row, which needs its title
    store.put("catalog/2026-11-02-deletions.csv", b"id,deleted\n3,true\n4,yes\n2,false\n99,1\n")
    sync = load(catalog_engine, store, "night-2")
    assert sync.rejected == [] and [(error.source, error.reason) for error in sync.errors] == [
        ("catalog/2026-11-02-deletions.csv#row4", "missing product title")]

    stored = products(catalog_engine)
    assert stored[3]["deleted_at"] is not None and stored[4]["deleted_at"] is not None
    assert stored[3]["source"] == "catalog/2026-11-02-deletions.csv" and stored[3]["title"] == "Product 3"
    assert stored[2]["deleted_at"] is None and stored[2]["title"] == "Product 2"  # its row was rejected
    assert stored[99]["deleted_at"] is not None  # an unknown id gets a tombstone, no product
    assert stored[3]["change_seq"] == seq_before  # no tagging work for a deleted product
    with catalog_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tags WHERE product_id IN (3, 4)")).scalar() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM embeddings WHERE product_id IN (3, 4)")).scalar() == 0
        assert stats_total(conn) == 6 and stats_match_tags(conn)
        assert repository.count_products(conn) == 6
        tagged_seq = repository.get_model(conn, VERSION)["tagged_seq"]
        assert repository.count_changes_between(conn, tagged_seq, repository.newest_change_seq(conn)) == 1  # 99
        assert sorted(row.product_id for row in repository.products_in_range(conn, 0, 10**9, 100)) == [1, 2, 5, 6, 7, 8]
        # the readers: page, similar products, photos, the catalog count
        with dashboard.read_only(catalog_engine) as page:
            overview = dashboard.overview(page)
            assert {row["product_id"] for row in overview["low_confidence"]} == {1, 2, 5, 6, 7, 8}
            assert overview["counts"] == {"products": 6, "tagged": 6}
            assert sum(row["products"] for row in overview["categories"]) == 6
            assert sum(row["products"] for row in overview["confidence"]) == 6
            assert [card["product_id"] for card in dashboard.product_cards(page, [1, 3, 4], VERSION)] == [1]
            assert dashboard.image_key(page, 3) is None and dashboard.image_key(page, 1) == "images/1.jpg"
            assert dashboard.similar_products(page, 3, VERSION) is None
            neighbours = dashboard.similar_products(page, 1, VERSION)["neighbours"]
            assert {n["product_id"] for n in neighbours} == {2, 5, 6, 7, 8}
        with pytest.raises(repository.NotFound):
            repository.similar_products(conn, 4, model_version=VERSION)

    # a tag write racing the deletion (its rows read before) leaves no tags for the deleted product
    with catalog_engine.begin() as conn:
        repository.write_tags_and_embeddings(conn, VERSION, "late", [3, 5], synthetic_predictions(2, seed=5))
    with catalog_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT product_id FROM tags")).scalars().all().count(3) == 0
        assert stats_total(conn) == 6 and stats_match_tags(conn)

    # the deleted products' old manifest, re-uploaded, does not bring them back (it sorts earlier)...
    store.put("catalog/2026-11-01.csv", ("id,productDisplayName,image_key\n"
                                         + "".join(f"{i},Product {i} again,images/{i}.jpg\n" for i in ids)).encode())
    load(catalog_engine, store, "night-3")
    stored = products(catalog_engine)
    assert stored[3]["deleted_at"] is not None and stored[1]["title"] == "Product 1 again"
    # ... a later one does: restored, with a new change_seq, so every version tags it again
    store.put("catalog/2026-11-03.jsonl", jsonl({"id": 3, "productDisplayName": "Product 3 is back"}))
    load(catalog_engine, store, "night-4")
    stored = products(catalog_engine)
    assert stored[3]["deleted_at"] is None and stored[3]["title"] == "Product 3 is back"
    assert stored[3]["change_seq"] > seq_before and stored[4]["deleted_at"] is not None
    whole, _ = read_manifests(store, "catalog/")
    assert sorted(whole["id"]) == [1, 2, 3, 5, 6, 7, 8] and "deleted" not in whole.columns


def test_a_deletion_and_a_listing_in_one_manifest_or_one_night(catalog_engine, store):
    store.put("catalog/a.jsonl", jsonl({"id": 1, "productDisplayName": "One"}, {"id": 2, "productDisplayName": "Two"}))
    store.put("catalog/b.jsonl", jsonl({"id": 1, "deleted": True}, {"id": 1, "productDisplayName": "One again"},
                                       {"id": 3, "productDisplayName": "Three", "deleted": False}))
    sync = load(catalog_engine, store, "night-1")
    stored = products(catalog_engine)
    assert stored[1]["deleted_at"] is not None and stored[1]["title"] is None  # b (later) deleted it before a was read
    assert stored[2]["deleted_at"] is None and stored[3]["title"] == "Three"
    assert [(error.source, error.reason) for error in sync.errors] == [
        ("catalog/b.jsonl#row2", "duplicate product id 1 (first occurrence kept)")]
