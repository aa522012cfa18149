"""The catalog in an object store: manifests (Parquet, CSV or JSON Lines) + product photos.

A shop drops manifest files under ``settings.catalog_prefix`` and photos under
``settings.images_prefix``; :func:`load_catalog_into_db` streams them into the database in
chunks, with per-row errors (a malformed row never sinks the file, an unreadable file never sinks
the others); :func:`read_manifests` gives the same rows as one frame.
:func:`import_kaggle_catalog` builds such a catalog from the Kaggle folder, idempotently.

The rules for faulty manifests (docs/STORAGE.md, "Catalog layout in a store"):

* a bad row (id missing, not an integer or beyond a bigint; a repeated id; no title; a value of
  the wrong type: ``year`` not a whole number 1-9999, text that is not text, ``split`` not
  train/val/test, ``deleted`` not true/false) is a :class:`RowError` and the rest loads;
* a manifest that is unreadable, lacks a required column, or (CSV, JSON Lines) does not end with
  a line break, i.e. looks half-written, is rejected whole: nothing of it is loaded, one error
  says why, and the ledger is not advanced, so it is read again (and reported again) every run
  until it is rewritten;
* a product in several manifests takes the values of the one latest in key order, whichever
  night each arrived (``products.source`` remembers it);
* a row with ``deleted`` true (only ``id`` needed) deletes the product: a tombstone
  (``products.deleted_at``), its tags and embeddings dropped, hidden from every reader, never
  tagged again unless a later manifest lists it again.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import re
from collections.abc import Collection, Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import numpy as np
import pandas as pd
import sqlalchemy as sa

from fashion_tagging.catalog import MAX_PRODUCT_ID, STYLE_COLUMNS, clean_html, load_kaggle_catalog, parse_csv_rows, \
    validate_rows
from fashion_tagging.errors import RowError, describe_error
from fashion_tagging.objectstore import ObjectStore, open_configured_store
from fashion_tagging.settings import Settings, get_settings

MANIFEST_FORMATS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
MANIFEST_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
OPTIONAL_COLUMNS = ("brandName", "description", "image_key", "split")
MANIFEST_COLUMNS = (*STYLE_COLUMNS, *OPTIONAL_COLUMNS)
# A row with this column true is a deletion (tombstone): only its id is needed.
TOMBSTONE_COLUMN = "deleted"
READ_COLUMNS = (*MANIFEST_COLUMNS, TOMBSTONE_COLUMN)
TEXT_COLUMNS = tuple(column for column in MANIFEST_COLUMNS if column not in ("id", "year"))
SPLITS = ("train", "val", "test")
MIN_YEAR, MAX_YEAR = 1, 9999
_TRUE_WORDS, _FALSE_WORDS = ("true", "t", "yes", "y", "1"), ("false", "f", "no", "n", "0", "")
IMAGE_SUFFIX = ".jpg"
# Rows read, validated and upserted at a time: bounds memory whatever the manifest's size, and
# big enough that a COPY + upsert per chunk costs little.
MANIFEST_CHUNK_ROWS = 25_000


@dataclasses.dataclass
class ImportSummary:
    """What one import wrote; ``errors`` are the Kaggle rows that could not be imported."""

    manifest_key: str
    products: int
    images_uploaded: int
    images_already_present: int
    products_without_image: int
    errors: list[RowError]


@dataclasses.dataclass
class CatalogSync:
    """What :func:`load_catalog_into_db` read and wrote."""

    manifest_keys: list[str]
    products_read: int
    products_written: int
    errors: list[RowError]
    rejected: list[str] = dataclasses.field(default_factory=list)  # manifests rejected whole (not in the ledger)


def import_kaggle_catalog(data_dir: str | Path, store: ObjectStore, *, limit: int | None = None,
                          ids: Collection[int] | None = None, manifest_format: str = "parquet",
                          batch_name: str | None = None, settings: Settings | None = None) -> ImportSummary:
    """Copy a Kaggle-layout folder (or a slice: ``ids`` / first ``limit`` rows) into ``store``.

    Re-running it duplicates nothing: photos already in the store are skipped and the manifest
    key is derived from the products it holds (or ``batch_name``), so it is overwritten.
    """
    if manifest_format not in MANIFEST_FORMATS:
        raise ValueError(f"manifest_format must be one of {sorted(MANIFEST_FORMATS)}, not {manifest_format!r}")
    settings = settings or get_settings()  # prefixes
    load = load_kaggle_catalog(data_dir)
    products = load.products
    if ids is not None:
        products = products[products["id"].isin({int(i) for i in ids})]
    if limit is not None:
        products = products.head(limit)
    products = products.reset_index(drop=True)

    image_paths = [path if isinstance(path, str) and path else None for path in products["image_path"]]
    image_keys = [f"{settings.images_prefix}{pid}{IMAGE_SUFFIX}" if path else None
                  for pid, path in zip(products["id"], image_paths, strict=True)]
    present = set(store.list_keys(settings.images_prefix))
    to_upload = [(key, path) for key, path in zip(image_keys, image_paths, strict=True)
                 if key and key not in present]
    store.put_files(to_upload)

    manifest = products.assign(image_key=image_keys)[list(MANIFEST_COLUMNS)]
    batch_name = batch_name or _default_batch_name(manifest["id"])
    manifest_key = f"{settings.catalog_prefix}{batch_name}{MANIFEST_FORMATS[manifest_format]}"
    store.put(manifest_key, encode_manifest(manifest, manifest_format))
    with_image = sum(key is not None for key in image_keys)
    return ImportSummary(manifest_key=manifest_key, products=len(manifest), images_uploaded=len(to_upload),
                         images_already_present=with_image - len(to_upload),
                         products_without_image=len(manifest) - with_image, errors=list(load.errors))


def import_catalog(settings: Settings | None = None, data_dir: str | Path | None = None, *, limit: int | None = None,
                   ids: Collection[int] | None = None, manifest_format: str = "parquet",
                   batch_name: str | None = None, load_into_db: bool = True, run_id: str | None = None) -> dict:
    """CLI ``import-catalog``: Kaggle folder -> the configured store, then (by default) into the database."""
    from fashion_tagging.db.engine import migrate_database
    from fashion_tagging.db.repository import record_errors

    settings = settings or get_settings()
    run_id = run_id or f"import-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}"
    store = open_configured_store(settings)
    summary = import_kaggle_catalog(data_dir or settings.data_dir, store, limit=limit, ids=ids,
                                    manifest_format=manifest_format, batch_name=batch_name, settings=settings)
    report = {"run_id": run_id, "store": store.url, **dataclasses.asdict(summary), "errors": len(summary.errors)}
    if load_into_db:
        with migrate_database(settings).begin() as conn:
            record_errors(conn, run_id, summary.errors)
            sync = load_catalog_into_db(conn, store, prefix=settings.catalog_prefix, run_id=run_id,
                                        since_keys=set(list_manifest_keys(store, settings.catalog_prefix))
                                        - {summary.manifest_key})
        report.update(products_written=sync.products_written, manifest_errors=len(sync.errors))
    return report


def encode_manifest(frame: pd.DataFrame, manifest_format: str) -> bytes:
    """A manifest file's bytes in one of :data:`MANIFEST_FORMATS`."""
    if manifest_format == "parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    if manifest_format == "csv":
        return frame.to_csv(index=False).encode()
    if manifest_format == "jsonl":
        return frame.to_json(orient="records", lines=True, force_ascii=False).encode()
    raise ValueError(f"unknown manifest format {manifest_format!r}")


def list_manifest_keys(store: ObjectStore, prefix: str) -> list[str]:
    """Manifest files under ``prefix``, in key order (later keys win for repeated products)."""
    return [key for key in store.list_keys(prefix) if _is_manifest_key(key)]


def _is_manifest_key(key: str) -> bool:
    return PurePosixPath(key).suffix.lower() in MANIFEST_SUFFIXES


def read_manifests(store: ObjectStore, prefix: str, *, since_keys: Collection[str] | None = None,
                   chunk_rows: int = MANIFEST_CHUNK_ROWS) -> tuple[pd.DataFrame, list[RowError]]:
    """All manifests under ``prefix`` (skipping ``since_keys``, the ones already processed) as one frame.

    Malformed rows (unparseable, missing or non-integer id, duplicate id in a file, no title, a
    value of the wrong type) become ``RowError(stage="manifest", source="<key>#row<n>")``; a
    rejected manifest (unreadable, a required column missing, half-written) is one error and no
    rows. A product in several manifests takes its values from the last one in key order: that
    is how updates arrive; one whose last row is a deletion is left out. The frame holds the
    whole catalog: for big ones, :func:`load_catalog_into_db` streams instead.
    """
    skip = set(since_keys or ())
    frames, errors = [], []
    for key in list_manifest_keys(store, prefix):
        if key in skip:
            continue
        reader = ManifestReader(store, key, chunk_rows=chunk_rows)
        chunks = list(reader)
        errors.extend(reader.errors)
        if not reader.failed:
            frames.extend(chunk for chunk in chunks if len(chunk))
    if not frames:
        return pd.DataFrame(columns=[*MANIFEST_COLUMNS, "source"]), errors
    products = pd.concat(frames, ignore_index=True).drop_duplicates("id", keep="last")
    products = products[~products[TOMBSTONE_COLUMN].astype(bool)].drop(columns=TOMBSTONE_COLUMN)
    return products.reset_index(drop=True), errors


def load_catalog_into_db(conn: sa.Connection | sa.Engine, store: ObjectStore, *, prefix: str | None = None,
                         run_id: str, since_keys: Collection[str] | None = None,
                         chunk_rows: int = MANIFEST_CHUNK_ROWS) -> CatalogSync:
    """Upsert the products of new or changed manifests, recording bad rows under ``run_id``.

    Which manifests: by default those whose fingerprint (from the store listing, no request per
    file) differs from the ``catalog_manifests`` ledger (new files and rewritten ones); with
    ``since_keys``, all but those keys.

    Memory does not grow with the manifests: each is read, validated and upserted ``chunk_rows``
    rows at a time, in the caller's transaction; only product ids (8 bytes each) are kept, to
    spot repeats. Files go last key first and a product is written only from the last manifest
    holding it, so each is upserted once with its final values and the counts are what reading
    everything at once gave. A file rejected whole (unreadable, even half-way; a required column
    missing; half-written) is rolled back to a savepoint: it adds one error and no products, and
    stays out of the ledger, so the next load reads it again. Rows with ``deleted`` true become
    tombstones (:func:`repository.delete_products`). Across loads the manifest latest in key
    order keeps a product (:func:`repository.upsert_products` compares ``products.source``).
    """
    from fashion_tagging.db import repository

    if isinstance(conn, sa.Engine):  # one transaction for the whole load, not one per chunk
        with conn.begin() as connection:
            return load_catalog_into_db(connection, store, prefix=prefix, run_id=run_id, since_keys=since_keys,
                                        chunk_rows=chunk_rows)
    prefix = get_settings().catalog_prefix if prefix is None else prefix
    fingerprints = {key: fingerprint for key, fingerprint in store.list_fingerprints(prefix).items()
                    if _is_manifest_key(key)}
    if since_keys is None:
        loaded = repository.loaded_manifests(conn)
        since_keys = {key for key, fingerprint in fingerprints.items() if loaded.get(key) == fingerprint}
    skip = set(since_keys)
    keys = [key for key in fingerprints if key not in skip]
    written_later = _IdSet()  # ids already written from a manifest later in key order: theirs win
    products, written, file_errors, rejected = {}, 0, {}, []
    for key in reversed(keys):
        reader = ManifestReader(store, key, chunk_rows=chunk_rows)
        file_products = file_written = 0
        with conn.begin_nested() as savepoint:
            for chunk in reader:
                chunk = chunk[~written_later.contains(chunk["id"])]
                if len(chunk):
                    file_written += _write_chunk(conn, chunk, key)
                    file_products += len(chunk)
            if reader.failed:
                savepoint.rollback()
                file_products = file_written = 0
        if not reader.failed and key != keys[0]:  # no file left to read: nothing to update
            written_later.update(reader.ids)
        products[key], file_errors[key] = file_products, reader.errors
        written += file_written
        if reader.failed:
            rejected.append(key)
    errors = [error for key in keys for error in file_errors[key]]
    repository.record_errors(conn, run_id, errors)
    repository.mark_manifests_loaded(conn, run_id, [
        {"key": key, "fingerprint": fingerprints[key], "products": products[key], "errors": len(file_errors[key])}
        for key in keys if key not in rejected])
    return CatalogSync(manifest_keys=keys, products_read=sum(products.values()), products_written=written,
                       errors=errors, rejected=sorted(rejected))


def _write_chunk(conn: sa.Connection, chunk: pd.DataFrame, key: str) -> int:
    """Upsert a chunk's products and tombstone its deletions; returns the rows that changed."""
    from fashion_tagging.db import repository

    deleted = chunk[TOMBSTONE_COLUMN].to_numpy(dtype=bool)
    written = 0
    if not deleted.all():
        written += repository.upsert_products(conn, chunk.loc[~deleted].drop(columns=TOMBSTONE_COLUMN))
    if deleted.any():
        written += repository.delete_products(conn, chunk.loc[deleted, "id"].tolist(), source=key)
    return written


class ManifestReader:
    """One manifest, read ``chunk_rows`` rows at a time: iterating yields its valid products.

    Errors and row numbers are the same as for the file read whole (a duplicate id is caught
    across chunks too). Once iterated: ``errors`` in file order; ``failed`` when the file is
    rejected whole (unreadable, a required column missing, a CSV / JSON Lines file not ending
    with a line break: half-written), in which case the chunks already yielded must be discarded
    and ``errors`` is that one error; ``ids``, the valid product ids (deletions included).
    Each chunk has the :data:`READ_COLUMNS` (``deleted`` a bool) plus ``source``.
    """

    def __init__(self, store: ObjectStore, key: str, *, chunk_rows: int = MANIFEST_CHUNK_ROWS):
        self.store, self.key, self.chunk_rows = store, key, max(1, int(chunk_rows))
        self.manifest_format = MANIFEST_SUFFIXES[PurePosixPath(key).suffix.lower()]
        self.errors: list[RowError] = []
        self.failed = False
        self.ids = _IdSet()

    def __iter__(self) -> Iterator[pd.DataFrame]:
        try:
            handle = self.store.open(self.key)
        except Exception as error:
            self._unreadable(error)
            return
        parse_errors, row_errors, columns = [], [], set()
        columns_known = self.manifest_format != "jsonl"  # CSV header / Parquet schema: all columns up front
        tail = None  # text formats: the bytes read, to tell a file cut off mid-line (Parquet has its footer)
        with handle:
            if self.manifest_format != "parquet":
                tail = _TailTracker(handle)
                handle = io.BufferedReader(tail, buffer_size=1 << 20)
            chunks = _parse_chunks(handle, self.manifest_format, self.key, self.chunk_rows)
            while True:
                try:
                    raw, row_numbers, chunk_errors = next(chunks)
                except StopIteration:
                    break
                except Exception as error:  # the whole file is unreadable: one error, the other files go on
                    self._unreadable(error)
                    return
                parse_errors += chunk_errors
                columns.update(raw.columns)
                if columns_known and _missing_columns(columns):
                    continue  # the file will be rejected whole: no point validating its rows
                valid, chunk_row_errors = self._validate(raw, row_numbers)
                row_errors += chunk_row_errors
                if len(valid):
                    yield valid
        missing = _missing_columns(columns)
        if missing:
            found = ", ".join(sorted(map(str, columns))[:20]) or "none"
            self._reject(f"manifest lacks required columns {missing} (its columns: {found})")
        elif tail is not None and tail.size and tail.last_byte not in (b"\n", b"\r"):
            self._reject("manifest does not end with a line break: it looks half-written (cut off mid-line)")
        else:
            self.errors = [*parse_errors, *row_errors]

    def _unreadable(self, error: Exception) -> None:
        self._reject(f"unreadable {self.manifest_format} manifest: {describe_error(error)}")

    def _reject(self, reason: str) -> None:
        """The whole file is refused: one error, no rows; read again once rewritten (or next run)."""
        self.failed = True
        self.errors = [RowError(f"{reason}; nothing of it was loaded", None, self.key, "manifest")]

    def _validate(self, raw: pd.DataFrame, row_numbers: list[int]) -> tuple[pd.DataFrame, list[RowError]]:
        for column in READ_COLUMNS:
            if column not in raw.columns:
                raw[column] = None
        raw = raw[list(READ_COLUMNS)].reset_index(drop=True)
        deleted, problems = _check_types(raw)
        if deleted.any():  # a deletion needs its id only
            titles = raw["productDisplayName"].tolist()
            raw["productDisplayName"] = [
                title if not gone or (isinstance(title, str) and title.strip()) else "(deleted)"
                for title, gone in zip(titles, deleted, strict=True)]
        # Rows repeating an id kept in an earlier chunk get validate_rows' own duplicate error
        # (it checks duplicates before titles, so taking them out first changes nothing else).
        ids = [_product_id(value) for value in raw["id"]]
        repeated = self.ids.contains([-1 if i is None else i for i in ids])
        errors = [RowError(f"duplicate product id {ids[p]} (first occurrence kept)", ids[p],
                           f"{self.key}#row{row_numbers[p]}", "manifest") for p in np.flatnonzero(repeated)]
        kept_numbers = [number for number, again in zip(row_numbers, repeated, strict=True) if not again]
        kept_problems = [problem for problem, again in zip(problems, repeated, strict=True) if not again]
        valid, row_errors = validate_rows(raw.loc[~repeated].reset_index(drop=True), self.key, row_offset=0,
                                          problems=kept_problems)
        errors += [_with_row_number(error, self.key, kept_numbers) for error in row_errors]
        errors.sort(key=_row_of)
        valid["description"] = valid["description"].map(clean_html)
        valid["year"] = pd.to_numeric(valid["year"], errors="coerce").astype("Int64")
        valid["image_key"] = valid["image_key"].map(lambda k: k.strip() if isinstance(k, str) and k.strip() else None)
        valid[TOMBSTONE_COLUMN] = valid[TOMBSTONE_COLUMN].astype(bool)
        valid["source"] = self.key
        self.ids.add(valid["id"].to_numpy(dtype=np.int64))
        return valid, errors


class _IdSet:
    """A set of product ids as one sorted int64 array: 8 bytes an id, where a Python set takes ~60.

    The array grows by doubling and new ids are merged in place (a stable sort of two sorted runs
    is a single merge): re-allocating a whole new array per chunk made the heap grow far beyond
    the ids themselves.
    """

    _MERGE_ROWS = 65_536  # ids merged at a time: bounds the temporary arrays of a merge

    def __init__(self):
        self._buffer = np.empty(1024, dtype=np.int64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def contains(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        known = self._buffer[:self._size]
        if not self._size or not len(ids):
            return np.zeros(len(ids), dtype=bool)
        positions = np.minimum(np.searchsorted(known, ids), self._size - 1)
        return known[positions] == ids

    def add(self, ids) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        for start in range(0, len(ids), self._MERGE_ROWS):
            part = ids[start:start + self._MERGE_ROWS]
            self._merge(np.unique(part[~self.contains(part)]))

    def update(self, other: _IdSet) -> None:
        self.add(other._buffer[:other._size])

    def _merge(self, new_ids: np.ndarray) -> None:
        size = self._size + len(new_ids)
        if size > len(self._buffer):
            grown = np.empty(max(size, 2 * len(self._buffer)), dtype=np.int64)
            grown[:self._size] = self._buffer[:self._size]
            self._buffer = grown
        self._buffer[self._size:size] = new_ids
        self._buffer[:size].sort(kind="stable")
        self._size = size


def _parse_chunks(handle: BinaryIO, manifest_format: str, key: str,
                  chunk_rows: int) -> Iterator[tuple[pd.DataFrame, list[int], list[RowError]]]:
    """(frame as the file said it, the row number of each frame row, per-row parse errors) per chunk.

    Always yields at least once, so an empty file still shows its columns.
    """
    if manifest_format == "parquet":
        yield from _parse_parquet(handle, chunk_rows)
    elif manifest_format == "csv":
        yield from _parse_csv(handle, key, chunk_rows)
    else:
        yield from _parse_json_lines(handle, key, chunk_rows)


def _parse_parquet(handle: BinaryIO, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, list[int], list[RowError]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(handle)
    columns = list(parquet.schema_arrow.empty_table().to_pandas().columns)  # as pd.read_parquet names them
    wanted = [column for column in READ_COLUMNS if column in columns]
    if _missing_columns(wanted):
        yield pd.DataFrame(columns=columns, dtype=object), [], []
        return
    first_row = 1
    yielded = False
    for batch in parquet.iter_batches(batch_size=chunk_rows, columns=wanted):
        # integer_object_nulls: an int column with a null stays ints (else floats, "1.0", in that chunk only)
        frame = pa.Table.from_batches([batch]).to_pandas(integer_object_nulls=True).astype(object)
        yield frame.reset_index(drop=True), list(range(first_row, first_row + len(frame))), []
        first_row += len(frame)
        yielded = True
    if not yielded:
        yield pd.DataFrame(columns=wanted, dtype=object), [], []


def _parse_csv(handle: BinaryIO, key: str, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, list[int], list[RowError]]]:
    yield from parse_csv_rows(io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline=""), key, chunk_rows)


def _parse_json_lines(handle: BinaryIO, key: str,
                      chunk_rows: int) -> Iterator[tuple[pd.DataFrame, list[int], list[RowError]]]:
    text = io.TextIOWrapper(handle, encoding="utf-8", errors="replace", newline="")
    records, numbers, errors = [], [], []
    row_number, any_record = 0, False
    for physical_line in text:
        # str.splitlines() as on the whole text before: it also breaks at \v, \f, \x1c-\x1e, \x85,
        # \u2028 and \u2029, which a file read line by line does not; keeps row numbers identical.
        for line in physical_line.splitlines():
            row_number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"expected a JSON object, found {type(record).__name__}")
            except ValueError as error:
                errors.append(RowError(f"unparseable JSON line: {describe_error(error)}", None,
                                       f"{key}#row{row_number}"))
                continue
            records.append(record)
            numbers.append(row_number)
        if len(records) + len(errors) >= chunk_rows:
            any_record = any_record or bool(records)
            yield _records_frame(records), numbers, errors
            records, numbers, errors = [], [], []
    any_record = any_record or bool(records)
    # A file without a single record reads as an empty frame with only an "id" column, as before.
    yield (_records_frame(records) if any_record else pd.DataFrame(columns=["id"], dtype=object)), numbers, errors


def _records_frame(records: list[dict]) -> pd.DataFrame:
    """dtype=object from the start: a key missing from some records must not turn ints into floats."""
    return pd.DataFrame(records, dtype=object) if records else pd.DataFrame()


def _missing_columns(columns: Collection[str]) -> list[str]:
    """Required columns absent: ``id`` and ``productDisplayName``, or just ``id`` with a ``deleted`` column
    (a deletions manifest; a row of it that is not a deletion still needs its title)."""
    required = ("id",) if TOMBSTONE_COLUMN in columns else ("id", "productDisplayName")
    return [column for column in required if column not in columns]


def _product_id(raw_id) -> int | None:
    """The id as :func:`validate_rows` reads it (None when it is missing, not an integer or beyond a bigint)."""
    raw_id = "" if raw_id is None or (isinstance(raw_id, float) and pd.isna(raw_id)) else str(raw_id).strip()
    product_id = int(raw_id) if re.fullmatch(r"\d+", raw_id) else None
    return product_id if product_id is not None and product_id <= MAX_PRODUCT_ID else None


class _TailTracker(io.RawIOBase):
    """A binary file passed through, counting its bytes and keeping the last one."""

    def __init__(self, raw: BinaryIO):
        self._raw, self.size, self.last_byte = raw, 0, b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._raw.read(len(buffer))
        count = len(data)
        buffer[:count] = data
        if count:
            self.size += count
            self.last_byte = data[-1:]
        return count


def _check_types(raw: pd.DataFrame) -> tuple[np.ndarray, list[str | None]]:
    """Per-row value checks of a chunk, normalising values in place: (is a deletion, first problem) per row.

    CSV values are all text, so a CSV chunk costs a type scan per column; Parquet and JSON Lines
    values are typed: a whole number where text is expected becomes its digits, an integral float
    id or year its integer; anything else of the wrong type is the row's problem. A deletion is
    checked for its ``deleted`` value only (and its id, by :func:`validate_rows`).
    """
    problems: list[str | None] = [None] * len(raw)

    def problem(row: int, text: str) -> None:
        if problems[row] is None and not deleted[row]:
            problems[row] = text

    deleted = np.zeros(len(raw), dtype=bool)
    values = raw[TOMBSTONE_COLUMN].tolist()
    if not _all_missing(values):
        for row, value in enumerate(values):
            flag = _flag(value)
            if flag is None:
                problem(row, f"{TOMBSTONE_COLUMN} must be true or false, not {_shown(value)}")
            deleted[row] = bool(flag)
    raw[TOMBSTONE_COLUMN] = deleted
    if not _types(raw["id"]) <= {str, type(None)}:
        raw["id"] = _objects(raw, [_integral(value) for value in raw["id"]])
    for column in TEXT_COLUMNS:
        values = raw[column].tolist()
        if _types(values) <= {str, type(None)}:
            continue
        texts = []
        for row, value in enumerate(values):
            if _missing(value) or isinstance(value, str):
                texts.append(None if _missing(value) else value)
            elif _whole(value):
                texts.append(str(int(value)))
            else:
                texts.append(None)
                problem(row, f"{column} must be text, not {_shown(value)}")
        raw[column] = _objects(raw, texts)
    values = raw["year"].tolist()
    if not _all_missing(values):
        years = []
        for row, value in enumerate(values):
            year = _year(value)
            if year is False:
                problem(row, f"year must be a whole number from {MIN_YEAR} to {MAX_YEAR}, not {_shown(value)}")
            years.append(None if year is False else year)
        raw["year"] = _objects(raw, years)
    values = raw["split"].tolist()
    if not _all_missing(values):
        splits = []
        for row, value in enumerate(values):
            split = value.strip() if isinstance(value, str) else None
            if split and split not in SPLITS:
                problem(row, f"split must be one of {', '.join(SPLITS)} (or empty), not {_shown(value)}")
            splits.append(split or None)
        raw["split"] = _objects(raw, splits)
    return deleted, problems


def _objects(frame: pd.DataFrame, values: list) -> pd.Series:
    """A column of these values as they are (a list with ints and None would otherwise become floats)."""
    return pd.Series(values, index=frame.index, dtype=object)


def _types(values) -> set[type]:
    return set(map(type, values))


def _all_missing(values) -> bool:
    return _types(values) <= {type(None)} or all(_missing(value) for value in values)


def _missing(value) -> bool:
    return value is None or value is pd.NA or value is pd.NaT or (
        isinstance(value, (float, np.floating)) and math.isnan(value))


def _whole(value) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _integral(value):
    """An integral float (a Parquet / JSON number column with nulls) as its int; anything else unchanged."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return value


def _flag(value) -> bool | None:
    """A ``deleted`` value as a bool (missing: False); None when it is not a yes/no value."""
    if _missing(value):
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in (*_TRUE_WORDS, *_FALSE_WORDS):
        return value.strip().lower() in _TRUE_WORDS
    return None


def _year(value) -> int | None | bool:
    """A ``year`` value: its int, None when missing, False when it is not a whole number in range."""
    if _missing(value) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"(\d+)(?:\.0*)?", value.strip())
        year = int(match.group(1)) if match else None
    elif _whole(value):
        year = int(value)
    else:
        year = _integral(value) if isinstance(value, (float, np.floating)) else None
        year = year if _whole(year) else None
    return year if year is not None and MIN_YEAR <= year <= MAX_YEAR else False


def _shown(value) -> str:
    """A wrong value as an error shows it: its type and a bounded repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _row_of(error: RowError) -> int:
    return int(error.source.rsplit("#row", 1)[1])


def _with_row_number(error: RowError, key: str, row_numbers: list[int]) -> RowError:
    """validate_rows counts frame positions; report the row of the file instead."""
    position = int(error.source.rsplit("#row", 1)[1])
    return dataclasses.replace(error, source=f"{key}#row{row_numbers[position]}", stage="manifest")


def _default_batch_name(ids: Iterable[int]) -> str:
    ids = sorted(int(i) for i in ids)
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:12]
    return f"kaggle-{len(ids)}-{digest}"
