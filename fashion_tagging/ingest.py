"""The catalog in an object store: manifests (Parquet, CSV or JSON Lines) + product photos.

A shop drops manifest files under ``settings.catalog_prefix`` and photos under
``settings.images_prefix``; :func:`read_manifests` turns them into product rows and per-row
errors (a malformed row never sinks the file, an unreadable file never sinks the others).
:func:`import_kaggle_catalog` builds such a catalog from the Kaggle folder, idempotently.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
from collections.abc import Collection, Iterable
from pathlib import Path, PurePosixPath

import pandas as pd
import sqlalchemy as sa

from fashion_tagging.catalog import STYLE_COLUMNS, RowError, clean_html, load_kaggle_catalog, validate_rows
from fashion_tagging.objectstore import ObjectStore
from fashion_tagging.settings import Settings, get_settings

MANIFEST_FORMATS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
MANIFEST_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
OPTIONAL_COLUMNS = ("brandName", "description", "image_key", "split")
MANIFEST_COLUMNS = (*STYLE_COLUMNS, *OPTIONAL_COLUMNS)
IMAGE_SUFFIX = ".jpg"


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
    from fashion_tagging.objectstore import open_store

    settings = settings or get_settings()
    run_id = run_id or f"import-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S}"
    store = open_store(settings.resolved_object_store_url, endpoint_url=settings.s3_endpoint_url,
                       max_concurrency=settings.s3_max_concurrency)
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
    return [key for key in store.list_keys(prefix) if PurePosixPath(key).suffix.lower() in MANIFEST_SUFFIXES]


def read_manifests(store: ObjectStore, prefix: str, *,
                   since_keys: Collection[str] | None = None) -> tuple[pd.DataFrame, list[RowError]]:
    """All manifests under ``prefix`` (skipping ``since_keys``, the ones already processed) as one frame.

    Malformed rows (unparseable, missing or non-integer id, duplicate id in a file, no title)
    become ``RowError(stage="manifest", source="<key>#row<n>")``. A product in several manifests
    takes its values from the last one in key order: that is how updates arrive.
    """
    skip = set(since_keys or ())
    frames, errors = [], []
    for key in list_manifest_keys(store, prefix):
        if key in skip:
            continue
        frame, file_errors = _read_one_manifest(store, key)
        errors.extend(file_errors)
        if frame is not None and len(frame):
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*MANIFEST_COLUMNS, "source"]), errors
    products = pd.concat(frames, ignore_index=True).drop_duplicates("id", keep="last").reset_index(drop=True)
    return products, errors


def load_catalog_into_db(conn: sa.Connection, store: ObjectStore, *, prefix: str | None = None, run_id: str,
                         since_keys: Collection[str] | None = None) -> CatalogSync:
    """Upsert the products of new or changed manifests, recording bad rows under ``run_id``.

    Which manifests: by default those whose fingerprint differs from the ``catalog_manifests``
    ledger (new files and rewritten ones); with ``since_keys``, all but those keys.
    """
    from fashion_tagging.db import repository

    prefix = get_settings().catalog_prefix if prefix is None else prefix
    fingerprints = {key: store.fingerprint(key) for key in list_manifest_keys(store, prefix)}
    if since_keys is None:
        loaded = repository.loaded_manifests(conn)
        since_keys = {key for key, fingerprint in fingerprints.items() if loaded.get(key) == fingerprint}
    keys = [key for key in fingerprints if key not in set(since_keys)]
    products, errors = read_manifests(store, prefix, since_keys=set(fingerprints) - set(keys))
    written = repository.upsert_products(conn, products) if len(products) else 0
    repository.record_errors(conn, run_id, errors)
    per_key = products["source"].value_counts().to_dict() if len(products) else {}
    repository.mark_manifests_loaded(conn, run_id, [
        {"key": key, "fingerprint": fingerprints[key], "products": int(per_key.get(key, 0)),
         "errors": sum(e.source == key or e.source.startswith(f"{key}#") for e in errors)} for key in keys])
    return CatalogSync(manifest_keys=keys, products_read=len(products), products_written=written, errors=errors)


def _read_one_manifest(store: ObjectStore, key: str) -> tuple[pd.DataFrame | None, list[RowError]]:
    manifest_format = MANIFEST_SUFFIXES[PurePosixPath(key).suffix.lower()]
    try:
        raw, row_numbers, errors = _parse(store.get(key), manifest_format, key)
    except Exception as error:  # the whole file is unreadable: one error, the other files go on
        return None, [RowError(f"unreadable {manifest_format} manifest: {describe_error(error)}", None, key, "manifest")]
    missing = [column for column in ("id", "productDisplayName") if column not in raw.columns]
    if missing:
        return None, [*errors, RowError(f"manifest lacks required columns {missing}", None, key, "manifest")]
    for column in MANIFEST_COLUMNS:
        if column not in raw.columns:
            raw[column] = None
    valid, row_errors = validate_rows(raw[list(MANIFEST_COLUMNS)].reset_index(drop=True), key, row_offset=0)
    errors += [_with_row_number(error, key, row_numbers) for error in row_errors]
    valid["description"] = valid["description"].map(clean_html)
    valid["year"] = pd.to_numeric(valid["year"], errors="coerce").astype("Int64")
    valid["image_key"] = valid["image_key"].map(lambda k: k.strip() if isinstance(k, str) and k.strip() else None)
    valid["source"] = key
    return valid, errors


def _parse(data: bytes, manifest_format: str, key: str) -> tuple[pd.DataFrame, list[int], list[RowError]]:
    """Bytes -> (frame as the file said it, the row number of each frame row, per-row parse errors)."""
    if manifest_format == "parquet":
        frame = pd.read_parquet(io.BytesIO(data)).astype(object)
        return frame, list(range(1, len(frame) + 1)), []
    text = data.decode("utf-8", errors="replace")
    if manifest_format == "csv":
        return _parse_csv(text, key)
    return _parse_json_lines(text, key)


def _parse_csv(text: str, key: str) -> tuple[pd.DataFrame, list[int], list[RowError]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if not header:
        raise ValueError("empty CSV (no header)")
    rows, numbers, errors = [], [], []
    for row_number, row in enumerate(reader, start=2):  # like catalog.py: the header is row 1
        if len(row) != len(header):
            errors.append(RowError(f"expected {len(header)} fields, found {len(row)}", None, f"{key}#row{row_number}"))
            continue
        rows.append(row)
        numbers.append(row_number)
    return pd.DataFrame(rows, columns=header, dtype=object), numbers, errors


def _parse_json_lines(text: str, key: str) -> tuple[pd.DataFrame, list[int], list[RowError]]:
    records, numbers, errors = [], [], []
    for row_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, found {type(record).__name__}")
        except ValueError as error:
            errors.append(RowError(f"unparseable JSON line: {describe_error(error)}", None, f"{key}#row{row_number}"))
            continue
        records.append(record)
        numbers.append(row_number)
    frame = pd.DataFrame.from_records(records).astype(object) if records else pd.DataFrame(columns=["id"])
    return frame, numbers, errors


def _with_row_number(error: RowError, key: str, row_numbers: list[int]) -> RowError:
    """validate_rows counts frame positions; report the row of the file instead."""
    position = int(error.source.rsplit("#row", 1)[1])
    return dataclasses.replace(error, source=f"{key}#row{row_numbers[position]}", stage="manifest")


def _default_batch_name(ids: Iterable[int]) -> str:
    ids = sorted(int(i) for i in ids)
    digest = hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:12]
    return f"kaggle-{len(ids)}-{digest}"


def describe_error(error: Exception) -> str:
    """First line of an exception, bounded: enough for an error row, never a traceback."""
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]
