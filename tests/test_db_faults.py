"""Real database faults: the catalog's PostgreSQL stops for real in the middle of a ``tag_batch``,
an ingest and a registry write, then comes back; the retry (what Airflow does, here in the same
process, with the same pooled engine) leaves exactly one row per (product, model version).

The server is a dedicated embedded PostgreSQL (its own pgdata), stopped with ``pg_ctl stop``:
``immediate`` is a crash (the next start replays the WAL), ``fast`` a clean restart (sessions
ended, transactions rolled back). The moment is chosen by the test, from inside the real code
path: the tagger's ``predict`` (between two committed chunks) or an SQLAlchemy
``before_cursor_execute`` hook (inside an open transaction, after its first writes). The server
always comes back on the port it had, so the URL and the cached engine stay the same.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time

import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging import pipeline
from fashion_tagging.db import repository, schema
from fashion_tagging.db.engine import embedded_postgres_url, engine_for_url, running_port, stop_embedded_postgres
from fashion_tagging.ingest import load_catalog_into_db
from fashion_tagging.objectstore import open_store
from fashion_tagging.settings import get_settings
from fashion_tagging.tagging import tag_work_batch
from tests.fixtures_services import drop_database, new_database, synthetic_predictions, untagged_product_ids
from tests.test_db import stats_match_tags

VERSION = "v-fault"
DEADLINE_S = 60  # a faulted call must fail (or finish) well within this: it must not hang
DISCONNECTED = (sa.exc.OperationalError, sa.exc.InterfaceError)  # what psycopg2 raises for a lost server
# The suite's servers run with synchronous_commit off: a crash loses the last commits (still in the WAL
# buffers), which is not what this module tests. fsync stays off: a process crash keeps the OS's cache.
CRASH_SAFE_COMMITS = {"synchronous_commit": "on"}


class SyntheticTagger:
    """Stands in for a Tagger (no model to train): well-formed predictions, and a hook on each call."""

    image_size = 32

    def __init__(self, on_predict=None):
        self.calls = 0
        self.on_predict = on_predict

    def predict(self, images, texts, *, batch_size=128, top_k=3):
        self.calls += 1
        if self.on_predict is not None:
            self.on_predict(self.calls)
        return synthetic_predictions(len(texts), seed=self.calls, has_image=[image is not None for image in images])


def products_frame(ids, title="Product", split=None) -> pd.DataFrame:
    ids = list(ids)
    frame = pd.DataFrame({"id": ids, "productDisplayName": [f"{title} {i}" for i in ids],
                          "articleType": ["Tshirts"] * len(ids), "year": [2012] * len(ids)})
    return frame if split is None else frame.assign(split=split)


def run_with_deadline(function, seconds: float = DEADLINE_S):
    """Run ``function`` in a worker thread (as an Airflow worker would); fail the test if it hangs."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    started = time.perf_counter()
    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds}s: the call hangs on the lost database"
    outcome["seconds"] = time.perf_counter() - started
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def wait_until(condition, seconds: float = DEADLINE_S / 2, every: float = 0.05) -> None:
    """Poll ``condition`` until it holds; fail if it never does."""
    deadline = time.perf_counter() + seconds
    while not condition():
        assert time.perf_counter() < deadline, f"not reached within {seconds}s"
        time.sleep(every)


class FaultServer:
    """A dedicated embedded PostgreSQL that a test may stop for real and start again on its port."""

    def __init__(self, pgdata):
        self.pgdata = pgdata
        self.port: int | None = None
        self.url = ""
        self.stops: list[str] = []

    def start(self) -> str:
        url = embedded_postgres_url(self.pgdata, durable=False, port=self.port, options=CRASH_SAFE_COMMITS)
        self.port = sa.make_url(url).port
        self.url = url
        return url

    def stop(self, mode: str) -> None:
        """``pg_ctl stop -m <mode>``; engines are kept: they must recover by themselves."""
        assert stop_embedded_postgres(self.pgdata, mode=mode, dispose_engines=False) == self.port
        self.stops.append(mode)

    @property
    def running(self) -> bool:
        return running_port(self.pgdata) is not None


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    server = FaultServer(tmp_path_factory.mktemp("faultpg") / "pgdata")
    server.start()
    yield server
    stop_embedded_postgres(server.pgdata)


@pytest.fixture
def fault_db(fault_server):
    """A fresh migrated database on the fault server; its cached engine."""
    url = new_database(fault_server.url)
    fault_server.stops.clear()
    yield engine_for_url(url)
    fault_server.start()  # a test that failed half-way may have left it stopped
    drop_database(fault_server.url, url)


@contextlib.contextmanager
def stop_before(engine, pattern: str, *, server: FaultServer, mode: str, nth: int = 1):
    """Stop the server for real just before the ``nth`` statement matching ``pattern`` runs on ``engine``."""
    matched = []

    def before_cursor_execute(conn, cursor, statement, parameters, context, executemany):
        if re.search(pattern, statement):
            matched.append(statement)
            if len(matched) == nth:
                server.stop(mode)

    sa.event.listen(engine, "before_cursor_execute", before_cursor_execute)
    try:
        yield matched
    finally:
        sa.event.remove(engine, "before_cursor_execute", before_cursor_execute)


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(sa.text(sql), params).scalar()


# --- tag_batch ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["immediate", "fast"])
@pytest.mark.parametrize("moment", ["between_chunks", "inside_chunk_transaction"])
def test_tag_batch_interrupted_by_the_database_resumes_and_writes_each_row_once(fault_server, fault_db, tmp_path,
                                                                                 moment, mode):
    engine, products = fault_db, 35
    settings = get_settings(home=tmp_path / "home", database_url=engine.url.render_as_string(hide_password=False),
                            object_store_url=(tmp_path / "store").as_uri(), tagging_batch_size=10, tagging_task_min_products=1)
    store = open_store((tmp_path / "store").as_uri())
    repository.upsert_products(engine, products_frame(range(1, products + 1)))
    repository.register_model(engine, VERSION, "efficientnet-lite0", 32, False, "file:///unused", {}, 0.9)
    repository.promote_model(engine, VERSION)
    with engine.begin() as conn:
        [batch] = repository.plan_tagging_batches(conn, VERSION, "night-1",
                                                  target_seq=repository.newest_change_seq(conn), max_batches=1,
                                                  products_per_batch=products)
    run = dict(settings=settings, run_id="night-1", engine=engine, store=store)

    if moment == "between_chunks":  # chunk 1 committed; the server goes before chunk 2 writes
        def stop_once_chunk_1_is_committed(call):  # chunk 1's write (its own thread) overlaps chunk 2's predict
            if call == 2:
                wait_until(lambda: repository.get_batch(engine, batch["batch_id"])["tagged"] == 10)
                fault_server.stop(mode)

        tagger = SyntheticTagger(on_predict=stop_once_chunk_1_is_committed)
        hook = contextlib.nullcontext()
    else:  # chunk 2's tags are COPYed, its stats counted; the server goes before its progress is recorded
        tagger = SyntheticTagger()
        hook = stop_before(engine, r"UPDATE tagging_batches SET done_seq=greatest", server=fault_server, mode=mode,
                           nth=2)
    with hook, pytest.raises(DISCONNECTED):
        run_with_deadline(lambda: tag_work_batch(batch["batch_id"], tagger=tagger, **run))
    assert fault_server.stops == [mode] and not fault_server.running

    port = fault_server.port
    fault_server.start()
    assert fault_server.port == port  # same URL: the engine cached for it is the one the retry uses
    first_chunk = repository.get_batch(engine, batch["batch_id"])
    with engine.connect() as conn:
        tagged_ids = conn.execute(sa.select(schema.tags.c.product_id)).scalars().all()
        assert sorted(tagged_ids) == list(range(1, 11))  # chunk 1 only: nothing of chunk 2 is visible
        assert stats_match_tags(conn, VERSION)
    assert (first_chunk["tagged"], first_chunk["attempts"], first_chunk["status"]) == (10, 1, "planned")
    assert first_chunk["done_seq"] == scalar(engine, "SELECT change_seq FROM products WHERE product_id = 10")

    retry_tagger = SyntheticTagger()  # the retry: same process, same engine (its pool held dead connections)
    result = run_with_deadline(lambda: tag_work_batch(batch["batch_id"], tagger=retry_tagger, **run))

    assert result.requested == result.tagged == products - 10 and retry_tagger.calls == 3  # resumed, not redone
    final = repository.get_batch(engine, batch["batch_id"])
    assert (final["status"], final["tagged"], final["attempts"], final["error"]) == ("done", products, 2, None)
    assert final["done_seq"] == final["seq_to"]
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT product_id, count(*) FROM tags WHERE model_version = :v GROUP BY 1"),
                            {"v": VERSION}).all()
        embeddings = conn.execute(sa.select(sa.func.count()).select_from(schema.embeddings)).scalar()
        assert stats_match_tags(conn, VERSION)
        assert untagged_product_ids(conn, VERSION) == []
    assert sorted(rows) == [(i, 1) for i in range(1, products + 1)] and embeddings == products


def test_pooled_connections_recover_after_a_restart_on_the_same_port(fault_server, fault_db):
    engine = fault_db
    assert engine.pool._pre_ping  # engine_for_url: a stale pooled connection is tested before use
    with contextlib.ExitStack() as stack:  # fill the pool with idle connections to the old server
        old_pids = {stack.enter_context(engine.connect()).connection.dbapi_connection.get_backend_pid()
                    for _ in range(3)}
    new_connections = []

    def on_connect(dbapi_connection, record):
        new_connections.append(dbapi_connection)

    sa.event.listen(engine, "connect", on_connect)
    fault_server.stop("fast")
    fault_server.start()
    try:
        with engine.connect() as conn:  # the first try works: no error reaches the caller
            pid = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar()
    finally:
        sa.event.remove(engine, "connect", on_connect)
    assert pid not in old_pids and len(new_connections) >= 1


# --- ingest ---------------------------------------------------------------------------------------


def test_ingest_interrupted_by_a_crash_leaves_nothing_and_its_retry_loads_each_product_once(fault_server, fault_db,
                                                                                             tmp_path):
    engine = fault_db
    url = engine.url.render_as_string(hide_password=False)
    assert engine_for_url(url) is engine  # the pipeline step gets this very engine (and its hook)
    settings = get_settings(home=tmp_path / "home", database_url=url, object_store_url=(tmp_path / "store").as_uri())
    store = open_store(settings.resolved_object_store_url)
    store.put("catalog/a.csv", products_frame(range(1, 31), "Old").to_csv(index=False).encode())
    pipeline.ingest_new_manifests(settings, "night-1")
    seq_before = scalar(engine, "SELECT max(change_seq) FROM products")
    store.put("catalog/b.csv", products_frame(range(21, 61), "New").to_csv(index=False).encode())

    # b.csv goes in 4 chunks of 10 in one transaction; the crash comes as the 2nd chunk is upserted
    real_load = load_catalog_into_db
    with stop_before(engine, r"^INSERT INTO products", server=fault_server, mode="immediate", nth=2), \
            pytest.MonkeyPatch.context() as patch, pytest.raises(DISCONNECTED):
        patch.setattr("fashion_tagging.ingest.load_catalog_into_db",
                      lambda *args, **kwargs: real_load(*args, **{**kwargs, "chunk_rows": 10}))
        run_with_deadline(lambda: pipeline.ingest_new_manifests(settings, "night-2"))
    fault_server.start()

    with engine.connect() as conn:
        titles = dict(conn.execute(sa.select(schema.products.c.product_id, schema.products.c.title)).all())
        ledger = conn.execute(sa.select(schema.catalog_manifests.c.key)).scalars().all()
    assert titles == {i: f"Old {i}" for i in range(1, 31)} and ledger == ["catalog/a.csv"]  # all or nothing
    assert scalar(engine, "SELECT max(change_seq) FROM products") == seq_before

    retry = run_with_deadline(lambda: pipeline.ingest_new_manifests(settings, "night-2"))
    assert retry["manifests"] == ["catalog/b.csv"] and retry["products_written"] == 40  # 10 updated + 30 new
    with engine.connect() as conn:
        rows = conn.execute(sa.select(schema.products.c.product_id, schema.products.c.title,
                                      schema.products.c.change_seq)).all()
        ledger = conn.execute(sa.select(schema.catalog_manifests.c.key)).scalars().all()
    assert sorted((pid, title) for pid, title, _ in rows) == \
        [(i, f"Old {i}") for i in range(1, 21)] + [(i, f"New {i}") for i in range(21, 61)]
    assert len({seq for _, _, seq in rows}) == 60 and sorted(ledger) == ["catalog/a.csv", "catalog/b.csv"]
    assert pipeline.ingest_new_manifests(settings, "night-3")["manifests"] == []  # loaded: not read again


# --- model registry -------------------------------------------------------------------------------


def registry(engine) -> dict[str, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(schema.model_versions.c.version, schema.model_versions.c.status)).all())


def tables(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(sa.text("SELECT tablename FROM pg_tables")).scalars())


@pytest.mark.parametrize("mode", ["immediate", "fast"])
def test_registry_writes_interrupted_by_the_database_are_all_or_nothing(fault_server, fault_db, mode):
    engine, ids = fault_db, list(range(1, 21))
    repository.upsert_products(engine, products_frame(ids))
    for version in ("v-serving", "v-old"):
        repository.register_model(engine, version, "efficientnet-lite0", 32, False, "file:///unused", {}, 0.9)
        repository.promote_model(engine, version)
        repository.write_tags_and_embeddings(engine, version, "night-0", ids, synthetic_predictions(len(ids)))
        if version == "v-serving":
            repository.activate_model(engine, version, build_indexes=False)
    with engine.begin() as conn:
        repository.plan_tagging_batches(conn, "v-old", "night-1", target_seq=repository.newest_change_seq(conn),
                                        max_batches=2, products_per_batch=10)

    def register_new():
        repository.register_model(engine, "v-new", "efficientnet-lite0", 32, False, "file:///unused", {}, 0.95)

    # 1. a standalone registration (one statement, its own transaction)
    with stop_before(engine, r"^INSERT INTO model_versions", server=fault_server, mode=mode), \
            pytest.raises(DISCONNECTED):
        run_with_deadline(register_new)
    fault_server.start()
    assert registry(engine) == {"v-serving": "serving", "v-old": "promoted"}
    run_with_deadline(register_new)
    assert registry(engine)["v-new"] == "registered"

    # 2. a promotion (register + promote in one transaction, as register_and_promote does): the
    # server goes after the superseded version was retired and its partitions dropped, uncommitted
    def register_and_promote():
        with engine.begin() as conn:
            repository.register_model(conn, "v-new", "efficientnet-lite0", 32, False, "file:///unused", {}, 0.95)
            repository.promote_model(conn, "v-new")

    with stop_before(engine, r"^DELETE FROM tag_stats", server=fault_server, mode=mode), \
            pytest.raises(DISCONNECTED):
        run_with_deadline(register_and_promote)
    fault_server.start()
    assert registry(engine) == {"v-serving": "serving", "v-old": "promoted", "v-new": "registered"}
    assert repository.partition_name("tags", "v-old") in tables(engine)
    with engine.connect() as conn:
        assert stats_match_tags(conn, "v-old")
        assert {b["status"] for b in repository.run_batches(conn, "night-1")} == {"planned"}

    run_with_deadline(register_and_promote)
    assert registry(engine) == {"v-serving": "serving", "v-old": "retired", "v-new": "promoted"}
    assert repository.partition_name("tags", "v-old") not in tables(engine)
    assert repository.partition_name("tags", "v-new") in tables(engine)
    with engine.connect() as conn:
        statuses = conn.execute(sa.text("SELECT status, count(*) FROM model_versions GROUP BY 1")).all()
        assert {b["status"] for b in repository.run_batches(conn, "night-1")} == {"superseded"}
        assert stats_match_tags(conn, "v-serving")
    assert dict(statuses) == {"serving": 1, "promoted": 1, "retired": 1}
    assert repository.serving_model(engine)["version"] == "v-serving"  # readers never saw a change
