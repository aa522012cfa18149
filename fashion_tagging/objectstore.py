"""One object-store interface over a local directory (``file://``) and S3 (``s3://``, also MinIO/moto).

The pipeline only ever needs flat keys, whole-object reads and writes, streamed reads of big
manifests, and many small concurrent reads (product photos), so that is all the interface offers.
Per-key failures of a bulk read are returned, never raised: one missing photo must not sink a batch.
"""

from __future__ import annotations

import abc
import io
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from fashion_tagging.settings import Settings

DEFAULT_MAX_CONCURRENCY = 16
# Request retries are botocore's, configured here and nowhere else; the one loop of our own resumes
# a body cut off mid-read, which botocore never retries (S3Store._download_into).
# "adaptive" = "standard" retries (503 SlowDown and other throttling, 500/502/503/504, connection
# resets, connect and read timeouts; jittered exponential backoff, 1 s base for throttling, 50 ms
# otherwise; a per-client retry quota so an outage fails fast instead of multiplying the load) plus
# client-side rate limiting once the bucket throttles, which is what a burst of thousands of small
# photo GETs from 16 threads needs. The limiter costs nothing until the first throttling reply; after
# one it slows the whole client for a few seconds (to ~10 GET/s when the client had just started).
S3_RETRY_MODE = "adaptive"
# 8 attempts (7 retries): a 5xx or reset costs a call at most ~6 s of backoff (50 ms x 2^i), a
# SlowDown streak up to ~70 s (1 s x 2^i, capped at 20 s; ~35 s on average) before the call fails
# (a photo is then recorded and its product queued again). A long outage spends the retry quota
# first (500 units, 14 per retry, 5 per throttled retry; successes refill it) and fails fast.
S3_MAX_ATTEMPTS = 8
S3_CONNECT_TIMEOUT_S = 10
# Per socket read (not per object): a stalled connection is dropped after this long and retried.
S3_READ_TIMEOUT_S = 60
# Managed transfers: objects from this size up go multipart (parallel parts, a failed part is
# retried alone, no 5 GB single-PUT limit); below it one PUT, as before.
S3_MULTIPART_THRESHOLD = 64 * 1024 * 1024
S3_MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
STREAM_BLOCK_SIZE = 1024 * 1024
_S3_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class ObjectNotFound(LookupError):
    """The key does not exist in the store (as opposed to a transient or permission error)."""

    def __init__(self, uri: str):
        super().__init__(f"object not found: {uri}")
        self.uri = uri


class ObjectStore(abc.ABC):
    """Flat key -> bytes store. Keys are relative to the store root, '/'-separated."""

    def __init__(self, url: str, max_concurrency: int = DEFAULT_MAX_CONCURRENCY):
        self.url = url.rstrip("/")
        self.max_concurrency = max(1, int(max_concurrency))
        self._retry_counts: Counter[str] = Counter()
        self._retry_lock = threading.Lock()

    @property
    def retry_counts(self) -> dict[str, int]:
        """Retries this store needed so far, by operation.

        botocore's retries count under the operation's name (``GetObject``, ``ListObjectsV2``,
        ``PutObject``, ``HeadObject``...), bodies cut off mid-read under ``resumed_reads``.
        Always empty for a local directory.
        """
        with self._retry_lock:
            return dict(self._retry_counts)

    @property
    def retries(self) -> int:
        """Total of :attr:`retry_counts`: how many requests had to be sent again."""
        return sum(self.retry_counts.values())

    def _count_retry(self, operation: str) -> None:
        with self._retry_lock:
            self._retry_counts[operation] += 1

    @abc.abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """All keys starting with ``prefix``, sorted."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; raises :class:`ObjectNotFound` when it is absent."""

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) an object; readers never see a half-written one."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def fingerprint(self, key: str) -> str:
        """Changes whenever the object is rewritten (ETag / size+mtime): tells re-uploads apart."""

    def list_fingerprints(self, prefix: str = "") -> dict[str, str]:
        """Key -> :meth:`fingerprint` of every key under ``prefix``, sorted by key.

        Stores override it to take the fingerprints from the listing itself (one request per
        1,000 keys on S3 instead of one HEAD per key).
        """
        return {key: self.fingerprint(key) for key in self.list_keys(prefix)}

    def open(self, key: str) -> BinaryIO:
        """A readable, seekable binary file of the object, for reading big objects in pieces.

        The caller closes it. Raises :class:`ObjectNotFound` when the key is absent.
        """
        return io.BytesIO(self.get(key))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        """Upload one local file (stores override it to stream instead of reading it whole)."""
        self.put(key, Path(path).read_bytes())

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        """Download one object to a local file, atomically (stores override it to stream)."""
        _atomic_write(Path(path), self.get(key))

    def uri(self, key: str) -> str:
        """Absolute URI of a key, e.g. for error rows and the model registry."""
        return f"{self.url}/{key.lstrip('/')}"

    def get_many(self, keys: Iterable[str], *, max_workers: int | None = None,
                 max_bytes: int | None = None) -> dict[str, bytes | Exception]:
        """Fetch many objects concurrently (bounded pool); a failing key maps to its exception.

        ``max_bytes``: read at most that many bytes of each (:meth:`get_head`).
        """
        unique_keys = list(dict.fromkeys(keys))
        if not unique_keys:
            return {}
        workers = min(max_workers or self.max_concurrency, len(unique_keys))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-get") as pool:
            results = pool.map(lambda key: self._get_or_exception(key, max_bytes), unique_keys)
            return dict(zip(unique_keys, results))

    def get_head(self, key: str, max_bytes: int) -> bytes:
        """At most the first ``max_bytes`` bytes of an object, never reading the rest of it.

        A caller that must refuse huge objects (photos) asks for one byte more than it accepts.
        The read asks for no more than the object holds: a file's ``read(max_bytes)`` allocates
        ``max_bytes`` first (20 MiB for a 3 KB photo). Objects are replaced by rename, never grown
        in place, so the size an open object has is the size it keeps.
        """
        with self.open(key) as handle:  # seekable, as ``open`` promises
            size = handle.seek(0, os.SEEK_END)
            handle.seek(0)
            return handle.read(min(max_bytes, size))

    def _get_or_exception(self, key: str, max_bytes: int | None = None) -> bytes | Exception:
        try:
            return self.get(key) if max_bytes is None else self.get_head(key, max_bytes)
        except Exception as error:  # returned to the caller, who records it per key
            return error

    def put_files(self, pairs: Iterable[tuple[str, str | os.PathLike]]) -> int:
        """Upload local files as (key, path) pairs concurrently; returns how many were written."""
        pairs = list(pairs)
        if not pairs:
            return 0
        workers = min(self.max_concurrency, len(pairs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-put") as pool:
            list(pool.map(lambda pair: self.put_file(pair[0], pair[1]), pairs))
        return len(pairs)

    def upload_dir(self, local_dir: str | os.PathLike, prefix: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``prefix/<relative path>``; returns the keys."""
        root = Path(local_dir)
        files = sorted(path for path in root.rglob("*") if path.is_file())
        keys = [_join(prefix, path.relative_to(root).as_posix()) for path in files]
        self.put_files(zip(keys, files))
        return keys

    def download_dir(self, prefix: str, local_dir: str | os.PathLike) -> Path:
        """Copy every object under ``prefix`` into ``local_dir`` (mirror of :meth:`upload_dir`)."""
        prefix = prefix.rstrip("/") + "/"
        keys = self.list_keys(prefix)
        if not keys:
            raise ObjectNotFound(self.uri(prefix))
        target = Path(local_dir)
        workers = min(self.max_concurrency, len(keys))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-get") as pool:
            list(pool.map(lambda key: self.get_file(key, target / key[len(prefix):]), keys))
        return target


class LocalStore(ObjectStore):
    """A directory on local disk; what the embedded set-up and most tests use."""

    def __init__(self, root: str | os.PathLike, max_concurrency: int = DEFAULT_MAX_CONCURRENCY):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        super().__init__(self.root.as_uri(), max_concurrency)

    def _path(self, key: str) -> Path:
        path = (self.root / key.lstrip("/")).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key escapes the store root: {key!r}")
        return path

    def list_keys(self, prefix: str = "") -> list[str]:
        start = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not start.is_dir():
            return []
        keys = (path.relative_to(self.root).as_posix() for path in start.rglob("*") if path.is_file())
        return sorted(key for key in keys if key.startswith(prefix) and not _is_temp_name(key))

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None

    def get_many(self, keys: Iterable[str], *, max_workers: int | None = None,
                 max_bytes: int | None = None) -> dict[str, bytes | Exception]:
        """Read one after another: a local read takes microseconds, less than handing it to a thread
        (a pool per call cost about 0.1 ms of CPU a photo on the tagging path)."""
        return {key: self._get_or_exception(key, max_bytes) for key in dict.fromkeys(keys)}

    def put(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        with open(path, "rb") as source:
            _atomic_write_stream(self._path(key), source)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        with self.open(key) as source:
            _atomic_write_stream(Path(path), source)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def fingerprint(self, key: str) -> str:
        try:
            return _local_fingerprint(self._path(key).stat())
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None

    def list_fingerprints(self, prefix: str = "") -> dict[str, str]:
        fingerprints = {}
        for key in self.list_keys(prefix):
            try:
                fingerprints[key] = _local_fingerprint(self._path(key).stat())
            except FileNotFoundError:  # deleted since the listing, as if listed a moment later
                continue
        return fingerprints


class S3Store(ObjectStore):
    """An S3 bucket (or prefix in one) through boto3; endpoint_url points it at MinIO or moto."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY, multipart_threshold: int = S3_MULTIPART_THRESHOLD,
                 multipart_chunksize: int = S3_MULTIPART_CHUNKSIZE, retry_mode: str = S3_RETRY_MODE,
                 max_attempts: int = S3_MAX_ATTEMPTS, connect_timeout: float = S3_CONNECT_TIMEOUT_S,
                 read_timeout: float = S3_READ_TIMEOUT_S):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.multipart_threshold = int(multipart_threshold)
        self.multipart_chunksize = int(multipart_chunksize)
        self.retry_mode = retry_mode
        self.max_attempts = max(1, int(max_attempts))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        super().__init__(f"s3://{bucket}/{self.prefix}", max_concurrency)
        self._client = None
        self._client_pid = None
        self._client_lock = threading.Lock()

    @property
    def client(self):
        """A boto3 client per process (clients are thread-safe but not fork-safe)."""
        with self._client_lock:
            if self._client is None or self._client_pid != os.getpid():
                import boto3
                from botocore.config import Config

                config = Config(
                    # total_max_attempts counts the first try; botocore's "max_attempts" key counts retries
                    retries={"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
                    max_pool_connections=self.max_concurrency,
                    connect_timeout=self.connect_timeout,
                    read_timeout=self.read_timeout,
                )
                client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
                client.meta.events.register("request-created.s3", self._count_botocore_retry)
                self._client, self._client_pid = client, os.getpid()
            return self._client

    def _count_botocore_retry(self, request, operation_name: str, **_) -> None:
        """botocore builds a new request for every attempt and numbers it in the call's retry context."""
        if (getattr(request, "context", None) or {}).get("retries", {}).get("attempt", 1) > 1:
            self._count_retry(operation_name)

    @property
    def transfer_config(self):
        """boto3 managed-transfer settings; retries stay with the client's botocore config."""
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=self.multipart_chunksize,
                              max_concurrency=self.max_concurrency,
                              preferred_transfer_client="classic")  # never CRT: it has its own retries

    def _full_key(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def _list_objects(self, prefix: str) -> Iterable[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_key(prefix)):
            yield from page.get("Contents", [])

    def list_keys(self, prefix: str = "") -> list[str]:
        return sorted(item["Key"][len(self.prefix):] for item in self._list_objects(prefix))

    def list_fingerprints(self, prefix: str = "") -> dict[str, str]:
        items = sorted((item["Key"][len(self.prefix):], _etag_fingerprint(item["ETag"]))
                       for item in self._list_objects(prefix))
        return dict(items)

    def get(self, key: str) -> bytes:
        buffer = io.BytesIO()
        self._download_into(key, buffer)  # a body cut off mid-read resumes instead of failing the read
        return buffer.getvalue()

    def get_head(self, key: str, max_bytes: int) -> bytes:
        """The GET with its retries and resume, stopped (its body closed) once ``max_bytes`` arrived."""
        sink = _CappedSink(max_bytes)
        try:
            self._download_into(key, sink)
        except _CapReached:
            pass
        return sink.getvalue()

    def open(self, key: str) -> BinaryIO:
        """The object spooled to an anonymous temp file: bounded memory, and seekable (Parquet needs that)."""
        handle = tempfile.TemporaryFile(prefix="ft-s3-")
        try:
            self._download_into(key, handle)
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                self._download_into(key, handle)
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise

    def _download_into(self, key: str, handle: BinaryIO) -> None:
        """Stream one GET into ``handle`` block by block, never holding the object in memory.

        A connection dropped mid-body (which botocore does not retry: its retries end when the
        headers arrive) resumes with a ranged GET pinned to the first response's ETag, so a
        rewrite in between fails instead of mixing two versions; at most ``max_attempts`` reads,
        each counted in :attr:`retry_counts` as ``resumed_reads``. No HEAD request.
        """
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        request = {"Bucket": self.bucket, "Key": self._full_key(key)}
        written = 0
        for attempt in range(1, self.max_attempts + 1):
            if attempt > 1:
                self._count_retry("resumed_reads")
            try:
                response = self.client.get_object(**request)
            except Exception as error:
                if _is_s3_missing(error):
                    raise ObjectNotFound(self.uri(key)) from None
                raise
            body = response["Body"]
            try:
                while block := body.read(STREAM_BLOCK_SIZE):
                    handle.write(block)
                    written += len(block)
                return
            except (HTTPClientError, IncompleteReadError, ConnectionError):
                if attempt == self.max_attempts:
                    raise
                request.update(Range=f"bytes={written}-", IfMatch=response["ETag"])
            finally:
                body.close()

    def put(self, key: str, data: bytes) -> None:
        self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._full_key(key), Config=self.transfer_config)

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        self.client.upload_file(os.fspath(path), self.bucket, self._full_key(key), Config=self.transfer_config)

    def put_files(self, pairs: Iterable[tuple[str, str | os.PathLike]]) -> int:
        """One managed-transfer pool for all files: many small PUTs in parallel, big files multipart."""
        from boto3.s3.transfer import create_transfer_manager

        pairs = list(pairs)
        if not pairs:
            return 0
        with create_transfer_manager(self.client, self.transfer_config) as manager:
            futures = [manager.upload(os.fspath(path), self.bucket, self._full_key(key)) for key, path in pairs]
            for future in futures:
                future.result()
        return len(pairs)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))
            return True
        except Exception as error:
            if _is_s3_missing(error):
                return False
            raise

    def fingerprint(self, key: str) -> str:
        try:
            return _etag_fingerprint(self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))["ETag"])
        except Exception as error:
            if _is_s3_missing(error):
                raise ObjectNotFound(self.uri(key)) from None
            raise

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"


def open_store(url: str, *, endpoint_url: str | None = None, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
               multipart_threshold: int = S3_MULTIPART_THRESHOLD,
               multipart_chunksize: int = S3_MULTIPART_CHUNKSIZE) -> ObjectStore:
    """``file:///dir`` (or a plain path) -> :class:`LocalStore`; ``s3://bucket/prefix`` -> :class:`S3Store`.

    For S3 without an explicit ``endpoint_url``, ``settings.s3_endpoint_url`` (``FT_S3_ENDPOINT_URL``) is used.
    The multipart settings only matter for S3.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL needs a bucket: {url!r}")
        if endpoint_url is None:
            from fashion_tagging.settings import get_settings

            endpoint_url = get_settings().s3_endpoint_url
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, max_concurrency=max_concurrency,
                       multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path), max_concurrency=max_concurrency)
    if parsed.scheme == "" and url:
        return LocalStore(url, max_concurrency=max_concurrency)
    raise ValueError(f"unsupported object store URL {url!r}: use file:///dir or s3://bucket/prefix")


def open_configured_store(settings: Settings) -> ObjectStore:
    """The store ``settings`` names (catalog manifests, photos, snapshots, model artifacts)."""
    return open_store(settings.resolved_object_store_url, endpoint_url=settings.s3_endpoint_url,
                      max_concurrency=settings.s3_max_concurrency)


def local_path(uri: str) -> Path | None:
    """The local file or directory of a ``file://`` URI or plain path; None for an ``s3://`` URI.

    The one place an absolute object URI (e.g. a registry ``artifact_uri``) becomes a local path.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return None
    return Path(unquote(parsed.path) if parsed.scheme == "file" else uri)


def open_uri(uri: str, *, endpoint_url: str | None = None) -> tuple[ObjectStore, str]:
    """A store and key for an absolute object URI (e.g. a registry ``artifact_uri``).

    ``s3://bucket/models/v1`` -> (store of the bucket, ``models/v1``);
    ``file:///home/x/models/v1`` -> (store of ``/home/x/models``, ``v1``).
    """
    path = local_path(uri)
    if path is None:
        parsed = urlparse(uri)
        return open_store(f"s3://{parsed.netloc}", endpoint_url=endpoint_url), parsed.path.strip("/")
    return LocalStore(path.parent), path.name


def _join(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}" if prefix.strip("/") else key


def _is_temp_name(key: str) -> bool:
    return Path(key).name.startswith(".tmp-")


def _atomic_write(path: Path, data: bytes) -> None:
    _atomic_write_stream(path, io.BytesIO(data))


def _atomic_write_stream(path: Path, source: BinaryIO) -> None:
    """Copy ``source`` to a temp file beside ``path``, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            shutil.copyfileobj(source, handle, STREAM_BLOCK_SIZE)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _local_fingerprint(stat: os.stat_result) -> str:
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _etag_fingerprint(etag: str) -> str:
    """HEAD and the listing both give the quoted ETag; the ledger has always stored it unquoted."""
    return etag.strip('"')


def _is_s3_missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _S3_MISSING_CODES or status == 404


__all__: Sequence[str] = ("ObjectNotFound", "ObjectStore", "LocalStore", "S3Store", "open_store", "open_configured_store",
                          "local_path", "open_uri")


class _CapReached(Exception):
    """Raised by :class:`_CappedSink` to stop a download at its byte cap."""


class _CappedSink(io.BytesIO):
    """A write-only buffer that keeps ``limit`` bytes, then stops the writer with :class:`_CapReached`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def write(self, block) -> int:
        room = self.limit - self.tell()
        super().write(bytes(block[:room]))
        if len(block) >= room:
            raise _CapReached
        return len(block)
