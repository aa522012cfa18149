"""One object-store interface over a local directory (``file://``) and S3 (``s3://``, also MinIO/moto).

The pipeline only ever needs flat keys, whole-object reads and writes, and many small concurrent
reads (product photos), so that is all the interface offers. Per-key failures of a bulk read are
returned, never raised: one missing photo must not sink a batch.
"""

from __future__ import annotations

import abc
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_MAX_CONCURRENCY = 16
# "adaptive" = standard retries (throttling, 5xx, connection errors) + client-side rate limiting,
# which is what a burst of thousands of small GETs against a throttling bucket needs.
S3_RETRY_MODE = "adaptive"
S3_MAX_ATTEMPTS = 8
S3_CONNECT_TIMEOUT_S = 10
S3_READ_TIMEOUT_S = 60
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

    def uri(self, key: str) -> str:
        """Absolute URI of a key, e.g. for error rows and the model registry."""
        return f"{self.url}/{key.lstrip('/')}"

    def get_many(self, keys: Iterable[str], *, max_workers: int | None = None) -> dict[str, bytes | Exception]:
        """Fetch many objects concurrently (bounded pool); a failing key maps to its exception."""
        unique_keys = list(dict.fromkeys(keys))
        if not unique_keys:
            return {}
        workers = min(max_workers or self.max_concurrency, len(unique_keys))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-get") as pool:
            results = pool.map(self._get_or_exception, unique_keys)
            return dict(zip(unique_keys, results))

    def _get_or_exception(self, key: str) -> bytes | Exception:
        try:
            return self.get(key)
        except Exception as error:  # returned to the caller, who records it per key
            return error

    def put_files(self, pairs: Iterable[tuple[str, str | os.PathLike]]) -> int:
        """Upload local files as (key, path) pairs concurrently; returns how many were written."""
        pairs = list(pairs)
        if not pairs:
            return 0
        workers = min(self.max_concurrency, len(pairs))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store-put") as pool:
            list(pool.map(lambda pair: self.put(pair[0], Path(pair[1]).read_bytes()), pairs))
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
        for key, data in self.get_many(keys).items():
            if isinstance(data, Exception):
                raise data
            _atomic_write(target / key[len(prefix):], data)
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

    def put(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def fingerprint(self, key: str) -> str:
        try:
            stat = self._path(key).stat()
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None
        return f"{stat.st_size}-{stat.st_mtime_ns}"


class S3Store(ObjectStore):
    """An S3 bucket (or prefix in one) through boto3; endpoint_url points it at MinIO or moto."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_concurrency: int = DEFAULT_MAX_CONCURRENCY):
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
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
                    retries={"mode": S3_RETRY_MODE, "max_attempts": S3_MAX_ATTEMPTS},
                    max_pool_connections=self.max_concurrency,
                    connect_timeout=S3_CONNECT_TIMEOUT_S,
                    read_timeout=S3_READ_TIMEOUT_S,
                )
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint_url, config=config)
                self._client_pid = os.getpid()
            return self._client

    def _full_key(self, key: str) -> str:
        return self.prefix + key.lstrip("/")

    def list_keys(self, prefix: str = "") -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        keys = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_key(prefix)):
            keys.extend(item["Key"][len(self.prefix):] for item in page.get("Contents", []))
        return sorted(keys)

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._full_key(key))["Body"].read()
        except Exception as error:
            if _is_s3_missing(error):
                raise ObjectNotFound(self.uri(key)) from None
            raise

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._full_key(key), Body=data)

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
            return self.client.head_object(Bucket=self.bucket, Key=self._full_key(key))["ETag"].strip('"')
        except Exception as error:
            if _is_s3_missing(error):
                raise ObjectNotFound(self.uri(key)) from None
            raise

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"


def open_store(url: str, *, endpoint_url: str | None = None,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY) -> ObjectStore:
    """``file:///dir`` (or a plain path) -> :class:`LocalStore`; ``s3://bucket/prefix`` -> :class:`S3Store`.

    For S3 without an explicit ``endpoint_url``, ``settings.s3_endpoint_url`` (``FT_S3_ENDPOINT_URL``) is used.
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"s3 URL needs a bucket: {url!r}")
        if endpoint_url is None:
            from fashion_tagging.settings import get_settings

            endpoint_url = get_settings().s3_endpoint_url
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url, max_concurrency=max_concurrency)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path), max_concurrency=max_concurrency)
    if parsed.scheme == "" and url:
        return LocalStore(url, max_concurrency=max_concurrency)
    raise ValueError(f"unsupported object store URL {url!r}: use file:///dir or s3://bucket/prefix")


def open_uri(uri: str, *, endpoint_url: str | None = None) -> tuple[ObjectStore, str]:
    """A store and key for an absolute object URI (e.g. a registry ``artifact_uri``).

    ``s3://bucket/models/v1`` -> (store of the bucket, ``models/v1``);
    ``file:///home/x/models/v1`` -> (store of ``/home/x/models``, ``v1``).
    """
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return open_store(f"s3://{parsed.netloc}", endpoint_url=endpoint_url), parsed.path.strip("/")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else uri)
    return LocalStore(path.parent), path.name


def _join(prefix: str, key: str) -> str:
    return f"{prefix.rstrip('/')}/{key}" if prefix.strip("/") else key


def _is_temp_name(key: str) -> bool:
    return Path(key).name.startswith(".tmp-")


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _is_s3_missing(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in _S3_MISSING_CODES or status == 404


__all__: Sequence[str] = ("ObjectNotFound", "ObjectStore", "LocalStore", "S3Store", "open_store", "open_uri")
