"""The read-only queries behind the Catalog tagging page, on a real PostgreSQL with a seeded catalog."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fashion_tagging import dashboard
from fashion_tagging.db import repository
from fashion_tagging.db.engine import engine_for_url
from fashion_tagging.settings import PRIMARY_HEAD, get_settings
from tests.fixtures_services import drop_database, new_database
from tests.synthetic_catalog import catalog_products, seed_synthetic_catalog

SEEDED_PRODUCTS = 200
BACKFILL_SHARE = 0.25


@pytest.fixture(scope="module")
def seeded(postgres_url, tmp_path_factory):
    """A migrated catalog with real products and synthetic registry, runs, tags and embeddings."""
    url = new_database(postgres_url)
    engine = engine_for_url(url)
    products = catalog_products(get_settings().data_dir, SEEDED_PRODUCTS)
    version = seed_synthetic_catalog(engine, products, tmp_path_factory.mktemp("models"))
    yield engine, products, version
    drop_database(postgres_url, url)


@pytest.fixture(scope="module")
def backfilling(postgres_url, tmp_path_factory):
    """The same catalog plus a newer promoted version that has tagged a quarter of it."""
    url = new_database(postgres_url)
    engine = engine_for_url(url)
    products = catalog_products(get_settings().data_dir, SEEDED_PRODUCTS)
    version = seed_synthetic_catalog(engine, products, tmp_path_factory.mktemp("models"), backfill=BACKFILL_SHARE)
    yield engine, products, version
    drop_database(postgres_url, url)


def test_overview_shows_registry_evaluation_runs_and_predictions(seeded):
    engine, products, version = seeded
    with dashboard.read_only(engine) as conn:
        page = dashboard.overview(conn)

    registry = page["registry"]
    assert [m["version"] for m in registry] == ["v001", "v002", "v003"]
    assert [m["status"] for m in registry] == ["retired", "rejected", "serving"]
    assert registry[-1]["accuracy"][PRIMARY_HEAD] == pytest.approx(0.927)
    assert registry[-1]["primary_accuracy_by_mode"]["text_only"] == pytest.approx(0.815)
    assert page["version"] == version == "v003"
    assert page["backfill"] is None  # no promoted version is backfilling

    spots = page["evaluation"]["weak_spots"]
    assert page["evaluation"]["version"] == "v003" and spots
    assert [s["f1"] for s in spots] == sorted(s["f1"] for s in spots)

    assert len(page["runs"]) == 12
    assert [r["started_at"] for r in page["runs"]] == sorted(r["started_at"] for r in page["runs"])

    gates = page["gate_decisions"]  # newest first, with the paired figures the gate recorded
    assert [g["version"] for g in gates] == ["v003", "v002"]
    assert gates[0]["promote"] is True and gates[0]["production_version"] == "v001" and gates[0]["p_value"] < 0.05
    assert (gates[1]["candidate_only_right"], gates[1]["production_only_right"]) == (41, 30)
    assert [(d["alert"], d["min_products"]) for d in page["drift"]] == [(False, 100), (True, 100)]  # oldest first

    assert page["counts"] == {"products": len(products), "tagged": len(products)}
    assert sum(c["products"] for c in page["categories"]) == len(products)
    assert len(page["confidence"]) == dashboard.CONFIDENCE_BINS
    assert sum(b["products"] for b in page["confidence"]) == len(products)
    confidences = [p["confidence"] for p in page["low_confidence"]]
    assert confidences == sorted(confidences) and len(confidences) == dashboard.LOW_CONFIDENCE_LIMIT


def test_aggregates_equal_a_count_over_the_serving_versions_tags(seeded):
    """The page reads tag_stats (kept by every write) instead of scanning tags: they must agree."""
    engine, products, version = seeded
    with dashboard.read_only(engine) as conn:
        categories = dashboard.category_distribution(conn, version, top=1000)
        histogram = dashboard.confidence_histogram(conn, version)
        coarse = dashboard.confidence_histogram(conn, version, bins=5)
        by_label = dict(conn.execute(sa.text("SELECT article_type, count(*) FROM tags WHERE model_version = :v "
                                             "GROUP BY 1"), {"v": version}).all())
        by_bin = dict(conn.execute(sa.text(
            "SELECT LEAST(width_bucket(article_type_confidence, 0.0, 1.0, :bins), :bins), count(*) FROM tags "
            "WHERE model_version = :v GROUP BY 1"), {"v": version, "bins": dashboard.CONFIDENCE_BINS}).all())
        partitions = set(conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE tablename = ANY(:t)"),
                                      {"t": [repository.partition_name(t, version) for t in ("tags", "embeddings")]})
                         .scalars())

    assert {c["label"]: c["products"] for c in categories} == by_label
    assert [b["products"] for b in histogram] == [by_bin.get(i, 0) for i in range(1, dashboard.CONFIDENCE_BINS + 1)]
    assert [b["products"] for b in coarse] == [sum(b["products"] for b in histogram[i:i + 4]) for i in range(0, 20, 4)]
    with pytest.raises(ValueError, match="divisor"):
        with dashboard.read_only(engine) as conn:
            dashboard.confidence_histogram(conn, version, bins=7)
    # the serving version was activated: its partitions have the review and vector indexes
    assert {f"{repository.partition_name('tags', version)}_confidence",
            f"{repository.partition_name('embeddings', version)}_hnsw"} <= partitions


def test_a_backfilling_version_is_shown_as_progress_while_readers_keep_the_serving_one(backfilling):
    engine, products, version = backfilling
    with dashboard.read_only(engine) as conn:
        page = dashboard.overview(conn)
        similar = dashboard.similar_products(conn, int(products["id"].iloc[-1]), dashboard.displayed_version(conn))

    assert [(m["version"], m["status"]) for m in page["registry"]][-2:] == [("v003", "serving"), ("v004", "promoted")]
    assert page["version"] == version == "v003"  # promoted is not served before it covers the catalog
    assert page["backfill"]["version"] == "v004"
    assert page["backfill"]["tagged"] == int(len(products) * BACKFILL_SHARE)
    assert page["counts"] == {"products": len(products), "tagged": len(products)}  # of the serving version
    assert sum(c["products"] for c in page["categories"]) == len(products)
    assert page["evaluation"]["version"] == "v004" and page["evaluation"]["status"] == "promoted"
    # the last product has no v004 tag yet; the serving version answers for it
    assert similar is not None and len(similar["neighbours"]) == dashboard.SIMILAR_LIMIT


def test_similar_products_are_nearest_by_embedding(seeded):
    engine, products, version = seeded
    product_id = int(products["id"].iloc[0])
    truth = products.set_index("id")[PRIMARY_HEAD]
    with dashboard.read_only(engine) as conn:
        result = dashboard.similar_products(conn, product_id, version)
        missing = dashboard.similar_products(conn, 10**12, version)

    assert result["product"]["product_id"] == product_id
    neighbours = result["neighbours"]
    assert len(neighbours) == dashboard.SIMILAR_LIMIT and product_id not in {n["product_id"] for n in neighbours}
    # synthetic embeddings cluster by true articleType: the nearest are the product's own type
    siblings = min(int((truth == truth[product_id]).sum()) - 1, len(neighbours))
    assert {truth[n["product_id"]] for n in neighbours[:siblings]} == {truth[product_id]}
    assert [n["distance"] for n in neighbours] == sorted(n["distance"] for n in neighbours)
    assert missing is None


def test_read_only_connection_refuses_writes(seeded):
    engine, _, _ = seeded
    with pytest.raises(sa.exc.DBAPIError, match="read-only"):
        with dashboard.read_only(engine) as conn:
            conn.execute(sa.text("DELETE FROM tags"))


def test_reports_of_other_shapes_are_read_defensively():
    old_shape = {"test": {"fused": {PRIMARY_HEAD: {"accuracy": 0.9, "per_class": {
        "Shirts": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 10},
        "Belts": {"precision": 0.5, "recall": 0.4, "f1": 0.44, "support": 3},
        "Empty": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}}}}}}
    listed_only = {"test": {"weak_spots": [{"label": "Ties", "f1": 0.3, "recall": 0.2, "support": 4}]}}

    assert dashboard.head_scores(old_shape, PRIMARY_HEAD)["accuracy"] == 0.9
    assert [s["label"] for s in dashboard.weak_spots(old_shape)] == ["Belts", "Shirts"]
    assert [s["label"] for s in dashboard.weak_spots(listed_only)] == ["Ties"]
    assert dashboard.weak_spots({}) == [] and dashboard.head_scores(None, PRIMARY_HEAD) == {}


def test_artifact_files_are_read_from_the_local_dir_a_path_or_s3(tmp_path, s3_store, s3_endpoint):
    settings = get_settings(home=tmp_path / "home", s3_endpoint_url=s3_endpoint)
    elsewhere = tmp_path / "elsewhere" / "v9"
    elsewhere.mkdir(parents=True)
    (elsewhere / "report.md").write_text("on disk")
    s3_store.put("models/v9/report.md", b"in s3")
    s3_uri = s3_store.uri("models/v9")

    assert dashboard.read_artifact_file(settings, "v9", elsewhere.as_uri(), "report.md") == b"on disk"
    assert dashboard.read_artifact_file(settings, "v9", s3_uri, "report.md") == b"in s3"
    assert dashboard.read_artifact_file(settings, "v9", s3_uri, "missing.png") is None
    assert dashboard.read_artifact_file(settings, "v9", str(elsewhere), "missing.png") is None
