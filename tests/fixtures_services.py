"""Fixtures: real services (PostgreSQL + pgvector, S3 over HTTP), started once per test session.

Stable names, used across the suite (Airflow, UI, tagging tests):

- ``postgres_url`` (session): admin URL (``postgresql+psycopg2://postgres@127.0.0.1:<port>/postgres``)
  of an embedded PostgreSQL 18 + pgvector started under a session tmp dir (fsync off), stopped at the end.
- ``new_database(postgres_url, migrated=True) -> url``: plain helper creating a fresh, uniquely named
  database (migrated to head unless ``migrated=False``); use it for module- or session-scoped set-ups.
- ``catalog_db_url`` (function): URL of a fresh migrated database for this test (dropped afterwards).
- ``catalog_engine`` (function): SQLAlchemy engine on ``catalog_db_url``.
- ``s3_endpoint`` (session): ``http://127.0.0.1:<port>`` of a moto ThreadedMotoServer (real S3 HTTP);
  also sets dummy ``AWS_*`` credentials in the environment.
- ``s3_store`` (function): an ``S3Store`` over a new, empty bucket on that server.
- ``catalog_settings`` (function): ``Settings`` with ``home`` in tmp, ``database_url`` = ``catalog_db_url``,
  a ``file://`` object store in tmp (everything a pipeline step needs, isolated per test).
- ``kaggle_slice`` (session): a small Kaggle-layout folder (``KAGGLE_SLICE_SIZE`` real products,
  some without photo, one with a corrupt photo, plus ``KAGGLE_SLICE_BAD_ROWS`` broken rows).
- ``synthetic_predictions(n, seed) -> TagPredictions``: random but well-formed model output, for
  DB tests and benchmarks that need rows to write without training a model.
- ``tag_and_embedding_rows(...)``: predictions as plain ``tags`` / ``embeddings`` rows, the reference
  the repository's hand-built COPY encoder is checked against.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from fashion_tagging.db.engine import embedded_postgres_url, engine_for_url, ensure_database, migrate, \
    stop_embedded_postgres
from fashion_tagging.objectstore import S3Store
from fashion_tagging.settings import HEADS, IMAGE_EMBEDDING_DIM, PRIMARY_HEAD, PRODUCT_EMBEDDING_DIM, get_settings

SLICE_WITH_IMAGE = 20
SLICE_WITHOUT_IMAGE = 3
KAGGLE_SLICE_SIZE = SLICE_WITH_IMAGE + SLICE_WITHOUT_IMAGE + 1  # + the product whose photo is corrupt
KAGGLE_SLICE_BAD_ROWS = 5  # rows write_kaggle_slice breaks on purpose
SYNTHETIC_LABELS = {head: [f"{head}-{i}" for i in range(5)] for head in HEADS}
DUMMY_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}


def new_database(postgres_url: str, *, migrated: bool = True, prefix: str = "t") -> str:
    """Create a uniquely named database on the test server; returns its URL."""
    url = ensure_database(postgres_url, f"{prefix}_{uuid.uuid4().hex[:12]}")
    if migrated:
        migrate(engine_for_url(url))
    return url


def drop_database(postgres_url: str, url: str) -> None:
    """Drop a database made by :func:`new_database`, closing this process's pooled connections first."""
    engine_for_url(url).dispose()
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{sa.make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    pgdata = tmp_path_factory.mktemp("postgres") / "pgdata"
    url = embedded_postgres_url(pgdata, durable=False)
    yield url
    stop_embedded_postgres(pgdata)


@pytest.fixture
def catalog_db_url(postgres_url):
    url = new_database(postgres_url)
    yield url
    drop_database(postgres_url, url)


@pytest.fixture
def catalog_engine(catalog_db_url):
    return engine_for_url(catalog_db_url)


@pytest.fixture
def catalog_settings(catalog_db_url, tmp_path):
    return get_settings(home=tmp_path / "home", database_url=catalog_db_url,
                        object_store_url=(tmp_path / "store").as_uri())


@pytest.fixture(scope="session")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    for name, value in DUMMY_AWS_ENV.items():
        os.environ.setdefault(name, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_store(s3_endpoint):
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    store = S3Store(bucket, endpoint_url=s3_endpoint)
    store.client.create_bucket(Bucket=bucket)
    return store


@pytest.fixture(scope="session")
def kaggle_slice(tmp_path_factory):
    """A small Kaggle-layout folder: real products with and without photos, plus the broken rows
    and the corrupt-photo product of ``tests.fixtures_data.write_kaggle_slice``."""
    from tests.fixtures_data import DATA_DIR, require_data, slice_ids, write_kaggle_slice

    require_data()
    styles = pd.read_csv(DATA_DIR / "styles.csv", usecols=["id"])
    image_less = [int(i) for i in styles["id"] if not (DATA_DIR / "images" / f"{i}.jpg").is_file()]
    ids = slice_ids()[:SLICE_WITH_IMAGE] + image_less[:SLICE_WITHOUT_IMAGE]
    return write_kaggle_slice(tmp_path_factory.mktemp("kaggle") / "catalog", ids)


def synthetic_predictions(n: int, seed: int = 0, *, has_image=None):
    """Random, well-formed model output for ``n`` products (unit-norm product embeddings)."""
    from fashion_tagging.artifacts import TagPredictions

    rng = np.random.default_rng(seed)
    labels, confidences, top_k = {}, {}, {}
    for head, names in SYNTHETIC_LABELS.items():
        picks = rng.integers(0, len(names), n)
        labels[head] = [names[i] for i in picks]
        confidences[head] = rng.uniform(0.2, 1.0, n).astype(np.float32)
        top_k[head] = [[(names[i], float(c))] for i, c in zip(picks, confidences[head], strict=True)]
    product = rng.normal(size=(n, PRODUCT_EMBEDDING_DIM)).astype(np.float32)
    product /= np.linalg.norm(product, axis=1, keepdims=True)
    has_image = np.ones(n, dtype=bool) if has_image is None else np.asarray(has_image, dtype=bool)
    image = rng.normal(size=(n, IMAGE_EMBEDDING_DIM)).astype(np.float32) * has_image[:, None]
    return TagPredictions(labels, confidences, top_k, image, product, has_image, np.ones(n, dtype=bool))


def tag_and_embedding_rows(model_version: str, run_id: str, product_ids, predictions) -> tuple[list, list]:
    """Rows in ``repository.TAG_COLUMNS`` / ``EMBEDDING_COLUMNS`` order, built field by field."""
    tag_rows, embedding_rows = [], []
    for i, product_id in enumerate(product_ids):
        routed = predictions.auto_accepted or {}
        head_json = {head: {"label": predictions.labels[head][i],
                            "confidence": round(float(predictions.confidences[head][i]), 6),
                            "top_k": [[label, float(score)] for label, score in predictions.top_k[head][i]],
                            **({"status": "auto_accepted" if routed[head][i] else "needs_review"}
                               if head in routed else {})}
                     for head in predictions.labels}
        status = None if PRIMARY_HEAD not in routed else "auto_accepted" if routed[PRIMARY_HEAD][i] else "needs_review"
        tag_rows.append((int(product_id), model_version, predictions.labels[PRIMARY_HEAD][i],
                         float(predictions.confidences[PRIMARY_HEAD][i]), head_json, bool(predictions.has_image[i]),
                         bool(predictions.has_text[i]), run_id, status))
        embedding_rows.append((int(product_id), model_version, predictions.product_embeddings[i], run_id))
    return tag_rows, embedding_rows


def untagged_product_ids(conn, model_version: str, *, limit: int | None = None) -> list[int]:
    """Ids of products with no tags from ``model_version`` yet, or changed since (a test oracle: it scans)."""
    from fashion_tagging.db import schema

    p, t = schema.products, schema.tags
    query = (
        sa.select(p.c.product_id)
        .select_from(p.outerjoin(t, sa.and_(t.c.product_id == p.c.product_id, t.c.model_version == model_version)))
        .where(sa.or_(t.c.product_id.is_(None), t.c.tagged_at < p.c.updated_at))
        .order_by(p.c.product_id)
    )
    if limit is not None:
        query = query.limit(limit)
    return list(conn.execute(query).scalars())
