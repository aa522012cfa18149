"""``tag_batch``: the unit of work the nightly DAG maps over (one batch = one DB transaction).

Products come from Postgres, photos from the object store (fetched concurrently), tags and
embeddings go back in one upsert. Per-product problems never sink the batch: a missing or
corrupt photo is recorded and the product is tagged from its text; a product with neither a
usable photo nor text is recorded and left untagged. Re-running a batch is always safe.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import sqlalchemy as sa

from fashion_tagging.catalog import product_text
from fashion_tagging.db import repository
from fashion_tagging.db.engine import get_engine
from fashion_tagging.errors import RowError, describe_error
from fashion_tagging.objectstore import ObjectNotFound, ObjectStore, open_configured_store
from fashion_tagging.progress import ProgressLogger
from fashion_tagging.settings import Settings

log = logging.getLogger(__name__)

MIXED_PRECISION_POLICY = "mixed_float16"

_taggers: dict[tuple[str, str], object] = {}
_taggers_lock = threading.Lock()
_accelerator_configured = False


@dataclasses.dataclass
class BatchResult:
    """Counts and stage timings of one batch; :meth:`as_dict` is what goes into XCom / run details."""

    run_id: str
    model_version: str
    requested: int
    tagged: int = 0
    text_only: int = 0
    errors: int = 0
    model_load_seconds: float = 0.0  # first batch of a process only: Taggers are cached
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def products_per_second(self) -> float:
        return self.tagged / self.total_seconds if self.total_seconds else 0.0

    def as_dict(self) -> dict:
        """JSON-safe; ``products`` and ``seconds`` are the names run summaries add up."""
        return {**dataclasses.asdict(self), "products": self.requested, "seconds": self.total_seconds,
                "products_per_second": self.products_per_second}


@dataclasses.dataclass
class _Inputs:
    """What one batch feeds the model, plus the errors found while assembling it."""

    product_ids: list[int]
    images: list[np.ndarray | None]
    texts: list[str]
    errors: list[RowError]
    retry_ids: list[int] = dataclasses.field(default_factory=list)  # transient failures: tag again later


def tag_batch(product_ids: Sequence[int], *, settings: Settings, engine: sa.Engine | None = None,
              store: ObjectStore | None = None, tagger=None, model_version: str | None = None,
              run_id: str) -> BatchResult:
    """Tag ``product_ids`` with ``tagger`` (default: the registry's production model) and store the results."""
    started = time.perf_counter()
    engine = engine or get_engine(settings)
    store = store or open_configured_store(settings)
    if tagger is None:
        tagger = load_production_tagger(settings, engine, model_version)
    model_version = model_version or tagger.version
    product_ids = list(dict.fromkeys(int(i) for i in product_ids))
    result = BatchResult(run_id=run_id, model_version=model_version, requested=len(product_ids),
                         model_load_seconds=time.perf_counter() - started)
    with engine.connect() as conn:
        rows = repository.fetch_products(conn, product_ids)
    _tag_rows(rows, product_ids, settings=settings, engine=engine, store=store, tagger=tagger, result=result)
    result.total_seconds = time.perf_counter() - started
    log.info("run %s: tagged %d/%d products (%d text-only, %d errors) in %.1fs", run_id, result.tagged,
             result.requested, result.text_only, result.errors, result.total_seconds)
    return result


def tag_work_batch(batch_id: int, *, settings: Settings, run_id: str, engine: sa.Engine | None = None,
                   store: ObjectStore | None = None, tagger=None) -> BatchResult:
    """Tag one planned range of ``tagging_batches``: the unit the nightly DAG maps over.

    The task selects its own rows (the range's products, ``tagging_batch_size`` per transaction)
    and records its progress in the same transaction as each chunk's tags, so a retry after a
    crash resumes where the last commit ended. An exception marks the batch failed with its
    error (for the run's summary) and is re-raised, so Airflow retries it.

    Each chunk's transaction first locks the batch row and checks that its progress is still
    where the chunk began: if another worker on the same batch committed that chunk first, the
    chunk is dropped and the work resumes from the other's progress (each product is written
    and counted once). A batch superseded (its version retired by a promotion) stops without
    writing; it is not an error.
    """
    started = time.perf_counter()
    engine = engine or get_engine(settings)
    batch = repository.start_batch_attempt(engine, batch_id)
    result = BatchResult(run_id=run_id, model_version=batch["model_version"], requested=0)
    if batch["status"] in repository.BATCH_CLOSED:
        return result
    try:
        store = store or open_configured_store(settings)
        tagger = tagger or load_production_tagger(settings, engine, batch["model_version"])
        result.model_load_seconds = time.perf_counter() - started
        done_seq, chunk_size = batch["done_seq"], max(1, int(settings.tagging_batch_size))
        progress = ProgressLogger(batch["products"], "products", log, every_s=30, label=f"batch {batch_id}")
        locked: dict = {}  # the batch row as the last chunk's transaction found it
        closed = False  # superseded, deleted or finished by another worker: nothing left to record

        def claim(conn, start):  # this chunk is ours: nobody committed past ``start``, batch still open
            locked["batch"] = current = repository.lock_batch(conn, batch_id)
            return current is not None and current["status"] not in repository.BATCH_CLOSED \
                and current["done_seq"] == start

        def load(start, size):  # the chunk after change_seq ``start``: rows, then photos fetched and decoded
            with engine.connect() as conn:
                rows = repository.products_in_range(conn, start, batch["seq_to"], size)
            if not rows:
                return rows, None
            return rows, _gather_inputs(rows, [row.product_id for row in rows], store, tagger.image_size, result)

        # Three stages, one chunk each: the next chunk is read, fetched and decoded (a thread of I/O
        # and Pillow) and the previous one written (a thread holding its transaction) while this
        # one is inferred. Writes stay in chunk order, each claiming the progress the one before
        # left; a chunk whose write finds another worker's progress drops the chunk behind it too.
        prefetch = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{batch_id}-read")
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{batch_id}-write")
        writing = None  # (future, rows, last_seq) of the chunk being written

        def write(inputs, predictions, start, last_seq, tick):
            return _write_inputs(inputs, predictions, engine=engine, result=result,
                                 claim=lambda conn: claim(conn, start),
                                 in_transaction=lambda conn, counts: repository.advance_batch(
                                     conn, batch_id, last_seq, **counts, seconds=time.perf_counter() - tick))

        # Nothing overlaps the first chunk's read, fetch and decode: it is one inference batch, so the
        # model starts sooner (and no batch shape new to the engine comes of it).
        sizes = chunk_sizes(chunk_size, settings.inference_batch_size)
        try:
            pending = prefetch.submit(load, done_seq, next(sizes))
            while True:
                rows, inputs = pending.result()
                if rows:
                    tick, last_seq = time.perf_counter(), rows[-1].change_seq
                    pending = prefetch.submit(load, last_seq, next(sizes))
                    predictions = _predict_inputs(inputs, settings=settings, engine=engine, tagger=tagger,
                                                  result=result)
                if writing is not None:  # the chunk before this one: settle it before writing this one
                    future, written_rows, written_seq = writing
                    writing = None
                    if not future.result():  # another worker committed it first, or the batch was closed
                        current = locked["batch"]
                        if current is None or current["status"] in repository.BATCH_CLOSED:
                            log.info("batch %s is %s: stopping without writing", batch_id,
                                     current["status"] if current else "deleted")
                            closed = True
                            break
                        log.info("batch %s: another worker wrote past change_seq %s; resuming at %s", batch_id,
                                 done_seq, current["done_seq"])
                        done_seq = current["done_seq"]
                        pending = prefetch.submit(load, done_seq, next(sizes))  # this chunk's work is dropped
                        continue
                    result.requested += len(written_rows)
                    done_seq = written_seq
                    progress.update(len(written_rows))
                if not rows:
                    break
                writing = (writer.submit(write, inputs, predictions, done_seq, last_seq, tick), rows, last_seq)
        finally:
            prefetch.shutdown(wait=False, cancel_futures=True)
            writer.shutdown(wait=True)  # a chunk's transaction ends before the batch's outcome is recorded
        progress.finish()
        if not closed:
            repository.finish_batch(engine, batch_id)
    except BaseException as error:
        try:
            repository.finish_batch(engine, batch_id, error=f"{type(error).__name__}: {describe_error(error)}")
        except Exception as unrecorded:  # the database itself is down: the original error is what counts
            log.warning("batch %s: could not record its failure (%s)", batch_id, describe_error(unrecorded))
        raise
    result.total_seconds = time.perf_counter() - started
    log.info("batch %s (%s, change_seq %s..%s): tagged %d/%d products (%d text-only, %d errors) in %.1fs",
             batch_id, batch["model_version"], batch["seq_from"], batch["seq_to"], result.tagged, result.requested,
             result.text_only, result.errors, result.total_seconds)
    return result


def chunk_sizes(chunk_size: int, first: int):
    """A task's chunk sizes: at most ``first`` products, then ``chunk_size`` each."""
    yield max(1, min(first, chunk_size))
    while True:
        yield chunk_size


def _tag_rows(rows, product_ids: list[int], *, settings: Settings, engine: sa.Engine, store: ObjectStore, tagger,
              result: BatchResult, in_transaction=None, claim=None) -> bool:
    """Fetch photos, predict and write one chunk in one transaction (adds to ``result``'s counts).

    Products whose photo could not be fetched (transient, after retries) get a new change_seq
    first, in their own transaction, so a later range tags them again: they are never lost.
    ``claim(conn)`` runs first in the chunk's transaction: if it returns False nothing is
    written or counted and this returns False. ``in_transaction(conn, counts)`` runs inside the
    chunk's transaction with the chunk's ``tagged`` / ``text_only`` / ``errors`` counts.
    """
    return _tag_inputs(_gather_inputs(rows, product_ids, store, tagger.image_size, result), settings=settings,
                       engine=engine, tagger=tagger, result=result, in_transaction=in_transaction, claim=claim)


def _tag_inputs(inputs: "_Inputs", *, settings: Settings, engine: sa.Engine, tagger, result: BatchResult,
                in_transaction=None, claim=None) -> bool:
    """Predict and write one chunk's gathered inputs (see :func:`_tag_rows`)."""
    predictions = _predict_inputs(inputs, settings=settings, engine=engine, tagger=tagger, result=result)
    return _write_inputs(inputs, predictions, engine=engine, result=result, in_transaction=in_transaction, claim=claim)


def _predict_inputs(inputs: "_Inputs", *, settings: Settings, engine: sa.Engine, tagger, result: BatchResult):
    """Requeue the chunk's transient failures, then run the model (None when nothing is taggable)."""
    if inputs.retry_ids:
        repository.requeue_products(engine, inputs.retry_ids)
    tick = time.perf_counter()
    predictions = tagger.predict(inputs.images, inputs.texts, batch_size=settings.inference_batch_size,
                                 top_k=settings.top_k) if inputs.product_ids else None
    result.infer_seconds += time.perf_counter() - tick
    return predictions


def _write_inputs(inputs: "_Inputs", predictions, *, engine: sa.Engine, result: BatchResult, in_transaction=None,
                  claim=None) -> bool:
    """One transaction: claim, the chunk's tags, embeddings and errors, its progress. False: not claimed."""
    tick = time.perf_counter()
    counts = {"tagged": len(inputs.product_ids), "text_only": sum(image is None for image in inputs.images),
              "errors": len(inputs.errors)}
    with engine.begin() as conn:  # one transaction: all of the chunk or none of it
        if claim is not None and not claim(conn):
            return False
        if predictions is not None:
            repository.write_tags_and_embeddings(conn, result.model_version, result.run_id, inputs.product_ids,
                                                 predictions)
        repository.record_errors(conn, result.run_id, inputs.errors)
        if in_transaction is not None:
            in_transaction(conn, counts)
    result.tagged += counts["tagged"]
    result.text_only += counts["text_only"]
    result.errors += counts["errors"]
    result.write_seconds += time.perf_counter() - tick
    return True


def _gather_inputs(rows, product_ids: list[int], store: ObjectStore, image_size: int,
                   result: BatchResult) -> _Inputs:
    """Fetch and decode photos, build texts; every problem becomes a RowError."""
    from fashion_tagging.images import ImageDecodeError, decode_image

    found = {row.product_id for row in rows}
    errors = [RowError("product id not in the catalog", pid, "products", "inference")
              for pid in product_ids if pid not in found]

    tick = time.perf_counter()
    fetched = fetch_photos(store, [row.image_key for row in rows if row.image_key])
    result.fetch_seconds += time.perf_counter() - tick

    tick = time.perf_counter()
    inputs = _Inputs([], [], [], errors)
    for row in rows:
        image = None
        if row.image_key:
            data = fetched[row.image_key]
            if isinstance(data, ObjectNotFound):
                errors.append(RowError("image object missing: tagged from text only", row.product_id,
                                       row.image_key, "image"))
            elif isinstance(data, Exception):  # transient after retries: leave it for the next run
                errors.append(RowError(f"image fetch failed, product not tagged (queued again): "
                                       f"{describe_error(data)}", row.product_id, row.image_key, "image"))
                inputs.retry_ids.append(row.product_id)
                continue
            else:
                try:
                    image = decode_image(data, image_size)
                except ImageDecodeError as error:
                    errors.append(RowError(f"{error}: tagged from text only", row.product_id, row.image_key, "image"))
        text = product_text(row.title, row.description)
        if image is None and not text:
            errors.append(RowError("no usable image and no text: not tagged", row.product_id,
                                   row.image_key or "products", "inference"))
            continue
        inputs.product_ids.append(row.product_id)
        inputs.images.append(image)
        inputs.texts.append(text)
    result.decode_seconds += time.perf_counter() - tick
    return inputs


def fetch_photos(store: ObjectStore, keys: Sequence[str]) -> dict[str, bytes | Exception]:
    """``store.get_many`` for photos, reading at most ``images.MAX_PHOTO_BYTES + 1`` bytes of each.

    One byte over the cap is enough for ``decode_image`` to reject the object as too large, so a
    huge object never sits whole in a worker's memory. A failing key maps to its exception.
    """
    from fashion_tagging.images import MAX_PHOTO_BYTES

    return store.get_many(keys, max_bytes=MAX_PHOTO_BYTES + 1)


# --- model resolution -------------------------------------------------------------------------


def load_production_tagger(settings: Settings, engine: sa.Engine | None = None, model_version: str | None = None):
    """The Tagger of ``model_version`` (default: the production model), loaded once per process."""
    engine = engine or get_engine(settings)
    with engine.connect() as conn:
        if model_version is None:
            row = repository.production_model(conn)
            if row is None:
                raise repository.NotFound("no production model in the registry: train and promote one first")
        else:
            row = repository.get_model(conn, model_version)
    return load_tagger(settings, row["version"], row["artifact_uri"])


def load_tagger(settings: Settings, version: str, artifact_uri: str):
    """Load (and cache per process) the Tagger of an artifact at a local path, file:// or s3:// URI."""
    key = (version, artifact_uri)
    with _taggers_lock:
        if key not in _taggers:
            configure_accelerator()
            from fashion_tagging.artifacts import Tagger, local_artifact_dir

            _taggers[key] = Tagger.load(local_artifact_dir(settings, version, artifact_uri),
                                        engine=settings.inference_engine)
        return _taggers[key]


def configure_accelerator() -> None:
    """On a GPU: grow memory on demand (several workers share a card) and run in mixed precision."""
    global _accelerator_configured
    if _accelerator_configured:
        return
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised by an earlier TF call: keep its settings
            pass
    if gpus:
        import keras

        keras.mixed_precision.set_global_policy(MIXED_PRECISION_POLICY)
        log.info("tagging on %d GPU(s) with %s", len(gpus), MIXED_PRECISION_POLICY)
    _accelerator_configured = True
