"""The human review loop on a real PostgreSQL: the queue, accepts and corrections with their audit,
re-tagging that never replaces a reviewed value, readers that show it, and the retrain snapshot
that trains on it."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from fashion_tagging import dashboard, pipeline, review
from fashion_tagging.db import repository
from fashion_tagging.db.engine import engine_for_url
from fashion_tagging.objectstore import open_configured_store
from fashion_tagging.settings import HEADS, PRIMARY_HEAD, get_settings
from tests.fixtures_services import drop_database, new_database
from tests.synthetic_catalog import catalog_products, seed_synthetic_catalog

SEEDED_PRODUCTS = 120
NEEDS_REVIEW_SHARE = 0.3


@pytest.fixture(scope="module")
def seeded(postgres_url, tmp_path_factory):
    """A seeded catalog (v003 serving) whose tags carry routing statuses: about 30 % need review."""
    url = new_database(postgres_url)
    engine = engine_for_url(url)
    products = catalog_products(get_settings().data_dir, SEEDED_PRODUCTS)
    version = seed_synthetic_catalog(engine, products, tmp_path_factory.mktemp("models"))
    status = "CASE WHEN product_id % 10 < :share THEN 'needs_review' ELSE 'auto_accepted' END"
    with engine.begin() as conn:
        conn.execute(sa.text(f"""
            UPDATE tags SET review_status = {status},
                            heads = (SELECT jsonb_object_agg(key, value || jsonb_build_object('status', {status}))
                                     FROM jsonb_each(heads))
            WHERE model_version = :v
        """), {"v": version, "share": int(NEEDS_REVIEW_SHARE * 10)})
    yield SimpleNamespace(url=url, engine=engine, products=products, version=version)
    drop_database(postgres_url, url)


def tag_of(engine, product_id: int, version: str) -> dict:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT heads FROM tags WHERE product_id = :id AND model_version = :v"),
                            {"id": product_id, "v": version}).scalar_one()


def submit(engine, product_id, labels, reviewer, version):
    with engine.begin() as conn:
        return review.submit_review(conn, product_id, labels, reviewer, version=version)


def audit_rows(engine, product_id: int) -> list[dict]:
    with engine.connect() as conn:
        return list(reversed(review.recent_reviews(conn, product_id=product_id, limit=100)))


def test_queue_puts_needs_review_first_then_lowest_confidence(seeded):
    with seeded.engine.connect() as conn:
        queue = review.review_queue(conn, seeded.version, limit=1000)
        statuses = dict(conn.execute(sa.text("SELECT product_id, review_status FROM tags WHERE model_version = :v"),
                                     {"v": seeded.version}).all())
    items = queue["items"]
    assert len(items) == SEEDED_PRODUCTS
    focus = [next(t for t in item["tags"] if t["head"] == PRIMARY_HEAD) for item in items]
    needs = [t["status"] == "needs_review" for t in focus]
    assert needs == sorted(needs, reverse=True) and any(needs) and not all(needs)
    assert queue["pending"] == sum(needs) == sum(s == "needs_review" for s in statuses.values())
    split = needs.index(False)
    for part in (focus[:split], focus[split:]):
        assert [t["confidence"] for t in part] == sorted(t["confidence"] for t in part)
    first = items[0]
    assert first["title"] and {t["head"] for t in first["tags"]} == set(HEADS)
    assert all(t["label"] == t["predicted"] for t in first["tags"])  # nobody reviewed it yet


def test_queue_filters_by_head_and_category(seeded):
    with seeded.engine.connect() as conn:
        by_colour = review.review_queue(conn, seeded.version, head="baseColour", limit=1000)
        categories = review.queue_categories(conn, seeded.version)
        category = categories[0]
        in_category = review.review_queue(conn, seeded.version, category=category, limit=1000)
        with pytest.raises(review.ReviewError, match="unknown head"):
            review.review_queue(conn, seeded.version, head="colour")
    colour = [next(t for t in item["tags"] if t["head"] == "baseColour") for item in by_colour["items"]]
    needs = [t["status"] == "needs_review" for t in colour]
    split = needs.index(False)
    assert needs == sorted(needs, reverse=True)
    assert [t["confidence"] for t in colour[:split]] == sorted(t["confidence"] for t in colour[:split])
    assert in_category["items"] and {i["tags"][0]["label"] for i in in_category["items"]} == {category}
    assert len(in_category["items"]) < SEEDED_PRODUCTS


def test_accept_and_correct_are_audited_once_and_leave_the_queue(seeded):
    engine, version = seeded.engine, seeded.version
    with engine.connect() as conn:
        product_id = review.review_queue(conn, version)["items"][0]["product_id"]
    predicted = tag_of(engine, product_id, version)
    labels = {PRIMARY_HEAD: "Corrected Type", "baseColour": predicted["baseColour"]["label"]}

    first = submit(engine, product_id, labels, "alice", version)
    again = submit(engine, product_id, labels, "alice", version)  # a retried request

    assert {c["head"]: c["action"] for c in first["changed"]} == {PRIMARY_HEAD: "corrected", "baseColour": "accepted"}
    assert again == {"product_id": product_id, "changed": [], "unchanged": sorted(labels)}
    rows = audit_rows(engine, product_id)
    assert [(r["head"], r["action"], r["before_label"], r["after_label"], r["reviewer"], r["model_version"])
            for r in rows] == [
        ("articleType", "corrected", predicted[PRIMARY_HEAD]["label"], "Corrected Type", "alice", version),
        ("baseColour", "accepted", predicted["baseColour"]["label"], predicted["baseColour"]["label"], "alice",
         version)]
    assert all(r["reviewed_at"] is not None for r in rows)

    # a second reviewer changes their mind: before is the earlier reviewed value
    changed = submit(engine, product_id, {PRIMARY_HEAD: "Other Type"}, "bob", version)
    assert changed["changed"] == [{"head": PRIMARY_HEAD, "action": "corrected", "before": "Corrected Type",
                                   "after": "Other Type"}]
    assert audit_rows(engine, product_id)[-1]["reviewer"] == "bob"
    with engine.connect() as conn:
        queued = {item["product_id"] for item in review.review_queue(conn, version, limit=1000)["items"]}
        colour_queue = {item["product_id"] for item in
                        review.review_queue(conn, version, head="baseColour", limit=1000)["items"]}
        season_queue = {item["product_id"] for item in
                        review.review_queue(conn, version, head="season", limit=1000)["items"]}
    assert product_id not in queued and product_id not in colour_queue and product_id in season_queue


def test_bad_reviews_are_refused_and_write_nothing(seeded):
    engine, version = seeded.engine, seeded.version
    product_id = int(seeded.products["id"].iloc[5])
    for labels, reviewer in (({"colour": "Red"}, "alice"), ({PRIMARY_HEAD: "  "}, "alice"), ({}, "alice"),
                             ({PRIMARY_HEAD: "x" * (review.MAX_LABEL_LENGTH + 1)}, "alice"),
                             ({PRIMARY_HEAD: "Shirts"}, "")):
        with pytest.raises(review.ReviewError):
            submit(engine, product_id, labels, reviewer, version)
    with pytest.raises(repository.NotFound):
        submit(engine, 10**12, {PRIMARY_HEAD: "Shirts"}, "alice", version)
    assert audit_rows(engine, product_id) == []


def test_retagging_never_replaces_a_reviewed_value_and_readers_show_it(seeded):
    engine, version, products = seeded.engine, seeded.version, seeded.products
    product_id = int(products["id"].iloc[10])
    neighbour_of = int(products["id"].iloc[11])
    submit(engine, product_id, {PRIMARY_HEAD: "Reviewed Label"}, "carol", version)

    # the same version re-tags the product (an upsert), then a newer version tags it in its own partition
    n = 1
    predictions = SimpleNamespace(
        labels={head: ["Model Label"] for head in HEADS}, confidences={head: np.array([0.51]) for head in HEADS},
        top_k={head: [[("Model Label", 0.51)]] for head in HEADS}, has_image=np.ones(n, bool),
        has_text=np.ones(n, bool), product_embeddings=np.full((n, 256), 1 / 16, dtype=np.float32))
    repository.write_tags_and_embeddings(engine, version, "retag-run", [product_id], predictions)
    repository.write_tags_and_embeddings(engine, "v-next", "retag-run", [product_id], predictions)
    assert tag_of(engine, product_id, version)[PRIMARY_HEAD]["label"] == "Model Label"

    with dashboard.read_only(engine) as conn:
        card = dashboard.product_cards(conn, [product_id], version)[0]
        entry = review.product_tags(conn, [product_id], "v-next")[0]
        neighbours = repository.similar_products(conn, neighbour_of, k=len(products), model_version=version)
        low = dashboard.low_confidence_products(conn, version, limit=len(products))
    assert card["label"] == "Reviewed Label"
    primary = next(t for t in entry["tags"] if t["head"] == PRIMARY_HEAD)
    assert (primary["label"], primary["predicted"], primary["status"], primary["reviewed_by"]) == (
        "Reviewed Label", "Model Label", "reviewed", "carol")
    assert {pid: label for pid, _, label, _ in neighbours}[product_id] == "Reviewed Label"
    assert {p["product_id"]: p["label"] for p in low}[product_id] == "Reviewed Label"


def test_snapshot_trains_on_reviewed_values(seeded, tmp_path, monkeypatch):
    engine, version, products = seeded.engine, seeded.version, seeded.products
    monkeypatch.setattr(pipeline, "SNAPSHOT_CHUNK_ROWS", 40)  # streamed in several chunks, summaries merged
    corrected_id = int(products.loc[products["split"] == "train", "id"].iloc[-1])
    accepted_id = int(products.loc[products["split"] == "test", "id"].iloc[-1])
    arrival_id = 10**9 + 7  # a new arrival: no split, no catalog labels
    repository.upsert_products(engine, pd.DataFrame({"id": [arrival_id], "productDisplayName": ["Blue Denim Jacket"]}))
    submit(engine, corrected_id, {PRIMARY_HEAD: "Snapshot Label"}, "dave", version)
    submit(engine, accepted_id, {"season": tag_of(engine, accepted_id, version)["season"]["label"]}, "dave", version)
    submit(engine, arrival_id, {PRIMARY_HEAD: "Jackets", "baseColour": "Blue"}, "dave", None)
    with engine.connect() as conn:
        expected = conn.execute(sa.text("SELECT count(*), count(*) FILTER (WHERE corrected), "
                                        "count(DISTINCT product_id) FROM product_reviews")).one()

    settings = get_settings(home=tmp_path / "home", database_url=seeded.url,
                            object_store_url=(tmp_path / "store").as_uri())
    summary = pipeline.snapshot_training_data(settings)

    used = summary[review.REVIEW_LABELS_KEY]
    assert (used["labels"], used["corrections"], used["products"]) == tuple(expected)
    assert used["added_to_train"] == 1 and used["by_head"]["season"] == {"labels": 1, "corrections": 0}
    assert used["corrections"] >= 2 and used["changed_labels"] >= 2
    data = open_configured_store(settings).get(summary["snapshot_key"])
    assert pq.ParquetFile(io.BytesIO(data)).num_row_groups == -(-summary["products"] // 40)
    frame = pd.read_parquet(io.BytesIO(data)).set_index("id")
    assert frame.loc[corrected_id, PRIMARY_HEAD] == "Snapshot Label"
    assert frame.loc[accepted_id, "split"] == "test"
    assert frame.loc[arrival_id, ["split", PRIMARY_HEAD, "baseColour"]].tolist() == ["train", "Jackets", "Blue"]
    assert summary["products"] == SEEDED_PRODUCTS + 1

    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "config.json").write_text(json.dumps({"version": "v-x"}))
    review.record_in_artifact(artifact, used)
    assert json.loads((artifact / "config.json").read_text())[review.REVIEW_LABELS_KEY] == used


def test_label_suggestions_join_the_models_classes_and_the_shown_labels():
    items = [{"tags": [{"head": "gender", "label": "Men", "predicted": "Women", "top_k": ["Women", "Boys"]}]}]
    model = review.parse_labels_json(json.dumps({"gender": ["Girls"], "unknown": ["x"]}).encode())
    assert model == {"gender": ["Girls"]}
    assert review.label_choices(model, items) == {"gender": ["Boys", "Girls", "Men", "Women"]}
    assert review.parse_labels_json(b"not json") == {} and review.parse_labels_json(None) == {}


def test_the_cli_exports_reviewed_values(seeded, monkeypatch, capsys, tmp_path):
    from fashion_tagging import cli

    engine, version = seeded.engine, seeded.version
    product_id = int(seeded.products["id"].iloc[20])
    submit(engine, product_id, {"gender": "Unisex"}, "erin", version)
    monkeypatch.setenv("FT_DATABASE_URL", seeded.url)

    assert cli.main(["tags", str(product_id), "--home", str(tmp_path)]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["model_version"] == version
    gender = next(t for t in exported["products"][0]["tags"] if t["head"] == "gender")
    assert (gender["label"], gender["status"], gender["reviewed_by"]) == ("Unisex", "reviewed", "erin")
    assert cli.main(["tags", str(product_id), "424242424242", "--home", str(tmp_path)]) == 2
