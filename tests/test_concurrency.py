"""Concurrent writers on the real PostgreSQL: an ingest while the retrain snapshot runs, a promotion
in the middle of a nightly run, two workers on the same tagging batch."""

from __future__ import annotations

import io
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging import pipeline
from fashion_tagging.db import repository, schema
from fashion_tagging.objectstore import open_store
from fashion_tagging.tagging import tag_work_batch
from tests.test_db import stats_match_tags
from tests.test_db_faults import SyntheticTagger, products_frame, run_with_deadline

A, B = "v-a", "v-b"


def register(engine, version, *, promote=True):
    repository.register_model(engine, version, "efficientnet-lite0", 32, False, "file:///unused", {}, 0.9)
    if promote:
        repository.promote_model(engine, version)


def tag_ids(engine, version) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(schema.tags.c.product_id)
                                   .where(schema.tags.c.model_version == version)).scalars())


def tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT tablename FROM pg_tables")).scalars())


def run_batches(settings, engine, descriptors, run_id, tagger=None):
    store = open_store(settings.resolved_object_store_url)
    return [tag_work_batch(d["batch_id"], settings=settings, run_id=run_id, engine=engine, store=store,
                           tagger=tagger or SyntheticTagger()) for d in descriptors]


def nightly(settings, engine, run_id):
    """discover -> plan -> every batch -> finish, as the DAG runs them."""
    discovered = pipeline.discover_tagging_work(settings, run_id)
    descriptors = pipeline.plan_tagging_run(settings, discovered)
    run_batches(settings, engine, descriptors, run_id)
    return descriptors, pipeline.finish_tagging_run(settings, discovered)


# --- (a) nightly ingest while the retrain snapshot runs --------------------------------------------


def test_product_writes_go_in_product_id_order(catalog_engine):
    repository.upsert_products(catalog_engine, products_frame(range(20, 0, -1)))  # a manifest in reverse order
    with catalog_engine.connect() as conn:
        by_seq = conn.execute(sa.select(schema.products.c.product_id).order_by(schema.products.c.change_seq)
                              ).scalars().all()
    assert by_seq == list(range(1, 21))


def test_overlapping_ingests_and_the_training_snapshot_finish_without_deadlock(catalog_engine, catalog_settings):
    engine, settings = catalog_engine, catalog_settings
    repository.upsert_products(engine, products_frame(range(1, 401), "Seed", split="train"))
    store = open_store(settings.resolved_object_store_url)
    store.put("catalog/night.csv", products_frame(range(500, 521), "Manifest", split="train")
              .to_csv(index=False).encode())
    first_holds_its_rows = threading.Event()

    def ingest_ascending():  # the nightly ingest: ids 1..300 in ascending order, held open a moment
        with engine.begin() as conn:
            repository.upsert_products(conn, products_frame(range(1, 301), "A", split="train"))
            first_holds_its_rows.set()
            time.sleep(0.5)

    def ingest_descending():  # a second writer: ids 450..150, descending, overlapping the first
        assert first_holds_its_rows.wait(10)
        with engine.begin() as conn:
            repository.upsert_products(conn, products_frame(range(450, 149, -1), "B", split="train"))

    def snapshot():  # the retrain DAG's first step: its own ingest (the manifest), then the read
        assert first_holds_its_rows.wait(10)
        return pipeline.snapshot_training_data(settings)

    results, errors = {}, []

    def run(name, function):
        try:
            results[name] = function()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append((name, error))

    threads = [threading.Thread(target=run, args=(name, function))
               for name, function in (("asc", ingest_ascending), ("desc", ingest_descending), ("snap", snapshot))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a writer hangs"
    assert errors == [] and time.perf_counter() - started < 30

    with engine.connect() as conn:
        titles = dict(conn.execute(sa.select(schema.products.c.product_id, schema.products.c.title)).all())
        seqs = conn.execute(sa.select(schema.products.c.change_seq)).scalars().all()
    expected = {i: f"A {i}" for i in range(1, 150)} | {i: f"B {i}" for i in range(150, 451)} \
        | {i: f"Manifest {i}" for i in range(500, 521)}  # the second writer waited for the first: its rows win
    assert titles == expected and len(set(seqs)) == len(seqs) == 149 + 301 + 21

    frame = pd.read_parquet(io.BytesIO(store.get(results["snap"]["snapshot_key"])))
    seen = dict(zip(frame["id"], frame["productDisplayName"], strict=True))
    assert set(seen) >= set(range(1, 401)) and {f"Manifest {i}" for i in range(500, 521)} <= set(seen.values())
    # the snapshot's read is one statement: each writer's rows are there entirely or not at all (its
    # own ingest queued behind the first writer, so that one's rows are always in)
    first, overlap, second_only = ({seen[i].split()[0] for i in ids}
                                   for ids in (range(1, 150), range(150, 301), range(301, 401)))
    assert (first, overlap, second_only) in [({"A"}, {"A"}, {"Seed"}), ({"A"}, {"B"}, {"B"})]


# --- (b) a promotion in the middle of a nightly run -------------------------------------------------


def test_promotion_during_a_run_leaves_the_serving_models_batches_to_finish(catalog_engine, catalog_settings):
    """A serves; B is promoted after the run planned A's new arrivals: they complete (readers stay on A)
    and B's backfill is planned by the next run."""
    engine = catalog_engine
    settings = catalog_settings.replace(tagging_batch_size=10, tagging_task_min_products=1, tagging_task_max_products=10, tagging_max_tasks=10)
    repository.upsert_products(engine, products_frame(range(1, 31)))
    register(engine, A)
    _, first = nightly(settings, engine, "night-1")
    assert first["activated"]["version"] == A

    repository.upsert_products(engine, products_frame(range(31, 46), "Arrival"))
    discovered = pipeline.discover_tagging_work(settings, "night-2")
    descriptors = pipeline.plan_tagging_run(settings, discovered)
    register(engine, B)  # the retrain DAG promotes B while night-2's batches wait to run
    results = run_batches(settings, engine, descriptors, "night-2")
    summary = pipeline.finish_tagging_run(settings, discovered)

    assert {d["model_version"] for d in descriptors} == {A} and sum(r.tagged for r in results) == 15
    assert summary["status"] == "success" and summary["failed_batches"] == [] and summary["superseded_batches"] == 0
    assert summary["versions"][B] == {"status": "promoted", "tagged_seq": 0, "covers_catalog": False}
    assert summary["more_work"]  # the DAG schedules itself again for B's backfill
    assert repository.serving_model(engine)["version"] == A and tag_ids(engine, A) == list(range(1, 46))
    assert repository.similar_products(engine, 40, k=3)  # readers on A see the arrivals

    descriptors, backfill = nightly(settings, engine, "night-3")
    assert {d["model_version"] for d in descriptors} == {B}  # nothing new for A; B's whole backfill
    assert backfill["activated"]["version"] == B and repository.serving_model(engine)["version"] == B
    assert tag_ids(engine, B) == list(range(1, 46)) and tag_ids(engine, A) == list(range(1, 46))
    with engine.connect() as conn:
        assert stats_match_tags(conn, A) and stats_match_tags(conn, B)


def test_promotion_supersedes_the_batches_of_the_model_it_replaces_even_mid_batch(catalog_engine, catalog_settings):
    """A is promoted (backfilling); B is promoted while A's first batch has a chunk in its transaction.
    The promotion waits for that chunk, retires A and drops its rows; A's batches stop without writing
    (their version's partitions are not brought back), the run succeeds, the next run backfills B."""
    engine = catalog_engine
    settings = catalog_settings.replace(tagging_batch_size=10, tagging_task_min_products=1, tagging_task_max_products=20, tagging_max_tasks=2)
    repository.upsert_products(engine, products_frame(range(1, 41)))
    register(engine, A)
    discovered = pipeline.discover_tagging_work(settings, "night-1")
    descriptors = pipeline.plan_tagging_run(settings, discovered)
    assert [d["model_version"] for d in descriptors] == [A, A]  # two batches of 20: two chunks each
    register(engine, B, promote=False)

    promoter = threading.Thread(target=repository.promote_model, args=(engine, B))
    waited = []

    def promote_during_chunk(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("UPDATE tagging_batches SET done_seq=greatest") and not promoter.is_alive() \
                and not waited:
            promoter.start()  # B's promotion, as the retrain DAG would run it, from another worker
            time.sleep(0.5)
            waited.append(promoter.is_alive())  # still waiting: this chunk holds its batch's row

    sa.event.listen(engine, "before_cursor_execute", promote_during_chunk)
    try:
        results = run_with_deadline(lambda: run_batches(settings, engine, descriptors, "night-1"))
    finally:
        sa.event.remove(engine, "before_cursor_execute", promote_during_chunk)
    promoter.join(10)
    assert waited == [True] and not promoter.is_alive()

    assert [r.tagged for r in results] == [10, 0]  # the first chunk committed; nothing after the promotion
    assert repository.get_model(engine, A)["status"] == "retired" and repository.production_model(engine)["version"] == B
    assert repository.partition_name("tags", A) not in tables(engine) and tag_ids(engine, A) == []
    with engine.connect() as conn:
        assert {b["status"] for b in repository.run_batches(conn, "night-1")} == {"superseded"}
        assert conn.execute(sa.text("SELECT count(*) FROM tag_stats WHERE model_version = :v"), {"v": A}).scalar() == 0

    summary = pipeline.finish_tagging_run(settings, discovered)
    assert summary["status"] == "success" and summary["failed_batches"] == []
    assert summary["superseded_batches"] == 2 and summary["more_work"] and summary["activated"] is None

    descriptors, backfill = nightly(settings, engine, "night-2")  # 2 batches of 20: the whole backfill
    assert {d["model_version"] for d in descriptors} == {B} and backfill["activated"]["version"] == B
    assert repository.serving_model(engine)["version"] == B and tag_ids(engine, B) == list(range(1, 41))
    assert repository.partition_name("tags", A) not in tables(engine)


# --- (c) two workers on the same batch -------------------------------------------------------------


def one_batch_of_new_products(engine, products: int) -> dict:
    """Products 1..``products`` in the catalog, model A serving, and one planned batch holding them all."""
    repository.upsert_products(engine, products_frame(range(1, products + 1)))
    register(engine, A)
    with engine.begin() as conn:
        [batch] = repository.plan_tagging_batches(conn, A, "night-1",
                                                  target_seq=repository.newest_change_seq(conn), max_batches=1,
                                                  products_per_batch=products)
    return batch


@pytest.mark.parametrize("chunk", [7, 10, 40])
def test_two_workers_on_one_batch_write_and_count_each_product_once(catalog_engine, catalog_settings, chunk):
    """A task thought lost is run again while the first still runs: both tag the same batch at once."""
    engine, products = catalog_engine, 35
    settings = catalog_settings.replace(tagging_batch_size=chunk, tagging_task_min_products=1)
    batch = one_batch_of_new_products(engine, products)
    together = threading.Barrier(2, timeout=10)  # both have predicted their first chunk before either writes
    taggers = [SyntheticTagger(on_predict=lambda call: call == 1 and together.wait()) for _ in range(2)]
    store = open_store(settings.resolved_object_store_url)
    results, errors = [], []

    def worker(tagger):
        try:
            results.append(tag_work_batch(batch["batch_id"], settings=settings, run_id="night-1", engine=engine,
                                          store=store, tagger=tagger))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(tagger,)) for tagger in taggers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []

    final = repository.get_batch(engine, batch["batch_id"])
    assert (final["status"], final["tagged"], final["attempts"], final["errors"]) == ("done", products, 2, 0)
    assert final["done_seq"] == final["seq_to"]
    assert sum(r.tagged for r in results) == products  # every chunk counted by exactly one worker
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT product_id, count(*) FROM tags GROUP BY 1")).all()
        embeddings = conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar()
        assert stats_match_tags(conn, A)
    assert sorted(rows) == [(i, 1) for i in range(1, products + 1)] and embeddings == products


def test_a_tasks_first_chunk_is_one_inference_batch_then_full_chunks(catalog_engine, catalog_settings):
    """Nothing overlaps the first chunk's fetch and decode, so it is kept to one inference batch."""
    engine, products = catalog_engine, 35
    settings = catalog_settings.replace(tagging_batch_size=10, inference_batch_size=4, tagging_task_min_products=1)
    batch = one_batch_of_new_products(engine, products)
    sizes = []

    class CountingTagger(SyntheticTagger):
        def predict(self, images, texts, **kwargs):
            sizes.append(len(texts))
            return super().predict(images, texts, **kwargs)

    [result] = run_batches(settings, engine, [batch], "night-1", tagger=CountingTagger())
    assert sizes == [4, 10, 10, 10, 1] and result.tagged == products
    assert tag_ids(engine, A) == list(range(1, products + 1))
