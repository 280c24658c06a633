"""The origin's S3 client: boto3, with conditional writes and managed transfers.

Why boto3 (and not obstore): it takes the endpoint and credentials the standard
way (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
profiles, instance roles) with no code of ours; its transfer manager does
multipart uploads and parallel ranged downloads of one object; and it exposes
``IfNoneMatch``/``IfMatch`` on PutObject, the conditional writes the manifests
and heads rely on. It is synchronous: the daemon calls it from worker threads.

Every failure leaves as a :class:`~ctxstore.errors.StorageError` (the origin
cannot be reached or refused a request) or :class:`~ctxstore.errors.NotFoundError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConflictError, NotFoundError, StorageError
from ..faults import crash_point
from .layout import MAX_RECORD_BYTES, Origin

#: objects from this size up travel in parts, several at a time
DEFAULT_PART_SIZE = 16 << 20
DEFAULT_CONCURRENCY = 8
_MISSING = ("404", "NoSuchKey", "NotFound")
_PRECONDITION = ("412", "PreconditionFailed")
_CONDITIONAL_CONFLICT = ("409", "ConditionalRequestConflict")


@dataclass(frozen=True, slots=True)
class Versioned:
    """A small object's bytes and its ETag (the compare-and-swap token)."""

    data: bytes
    etag: str


class OriginClient:
    """One origin (bucket and prefix) through one boto3 client; safe across threads."""

    def __init__(
        self,
        origin: Origin,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        objects_at_once: int = 1,
        timeout: float = 30.0,
    ) -> None:
        """``concurrency``: parts in flight per object; ``objects_at_once``: objects a
        caller moves at the same time (sizes the connection pool for all their parts)."""
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.origin = origin
        self.part_size = part_size
        # Path-style addressing: S3-compatible servers (SeaweedFS, MinIO) on a bare host
        # name or IP serve it; AWS S3 serves it too.
        config = Config(
            connect_timeout=min(timeout, 10.0),
            read_timeout=timeout,
            retries={"max_attempts": 3, "mode": "standard"},
            s3={"addressing_style": "path"},
            max_pool_connections=max(10, concurrency * max(2, objects_at_once)),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._s3: Any = boto3.session.Session().client("s3", config=config)
        self._transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=concurrency,
            use_threads=concurrency > 1,
        )

    def __repr__(self) -> str:
        return f"OriginClient({self.origin})"

    @property
    def endpoint(self) -> str:
        return str(self._s3.meta.endpoint_url)

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (a writer's first start)."""
        with self._errors(f"bucket {self.origin.bucket}"):
            try:
                self._s3.head_bucket(Bucket=self.origin.bucket)
            except Exception as exc:
                if _code(exc) not in _MISSING:
                    raise
                with contextlib.suppress(Exception):
                    self._s3.create_bucket(Bucket=self.origin.bucket)
                self._s3.head_bucket(Bucket=self.origin.bucket)

    def exists(self, key: str) -> bool:
        with self._errors(key):
            try:
                self._s3.head_object(Bucket=self.origin.bucket, Key=key)
            except Exception as exc:
                if _code(exc) in _MISSING:
                    return False
                raise
        return True

    def get(self, key: str) -> Versioned | None:
        """A small object (a manifest, a head) and its ETag; None when it is absent."""
        with self._errors(key):
            try:
                answer = self._s3.get_object(Bucket=self.origin.bucket, Key=key)
            except Exception as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
            if answer.get("ContentLength", 0) > MAX_RECORD_BYTES:
                answer["Body"].close()
                raise StorageError(f"{key} is larger than a record may be")
            return Versioned(answer["Body"].read(), str(answer["ETag"]))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create ``key``; False when it exists already (nothing written)."""
        return self._put(key, data, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """Replace ``key`` if its ETag is still ``etag`` (None: if it is still absent);
        False when another write came first (nothing written)."""
        if etag is None:
            return self.put_if_absent(key, data)
        return self._put(key, data, IfMatch=etag)

    def _put(self, key: str, data: bytes, **condition: str) -> bool:
        with self._errors(key):
            try:
                self._s3.put_object(Bucket=self.origin.bucket, Key=key, Body=data, **condition)
            except Exception as exc:
                if _code(exc) in _PRECONDITION or _code(exc) in _CONDITIONAL_CONFLICT:
                    return False
                raise
        return True

    def put_object(self, key: str, data: bytes) -> None:
        """Write ``key`` unconditionally (content-addressed objects: same key, same bytes)."""
        with self._errors(key):
            self._s3.put_object(Bucket=self.origin.bucket, Key=key, Body=data)

    def upload_file(self, path: str, key: str, size: int | None = None) -> None:
        """Upload a file, in parts when large; the object appears whole or not at all.

        ``size`` (the file's, when known): below the part size one PutObject, which
        spares the transfer manager's threads for the many small tensors of a model."""
        with self._errors(key):
            if size is not None and size < self.part_size:
                with open(path, "rb") as source:
                    self._s3.put_object(Bucket=self.origin.bucket, Key=key, Body=source)
                return
            self._s3.upload_file(path, self.origin.bucket, key, Config=self._transfer,
                                 Callback=_upload_progress)  # fmt: skip

    def download_file(self, key: str, path: str, size: int | None = None) -> None:
        """Download ``key`` to ``path`` with parallel ranged GETs when large.

        ``size`` (the object's, as its manifest records it): below the part size one
        GetObject streamed to the file, not the transfer manager's HEAD and threads."""
        with self._errors(key):
            try:
                if size is not None and size < self.part_size:
                    answer = self._s3.get_object(Bucket=self.origin.bucket, Key=key)
                    with open(path, "wb") as out:
                        for chunk in answer["Body"].iter_chunks(1 << 20):
                            out.write(chunk)
                            crash_point("origin_download_progress")
                    return
                self._s3.download_file(self.origin.bucket, key, path, Config=self._transfer,
                                       Callback=_download_progress)  # fmt: skip
            except Exception as exc:
                if _code(exc) in _MISSING:
                    raise NotFoundError(f"origin {self.origin} has no object {key}") from None
                raise

    def list_etags(self, prefix: str) -> dict[str, str]:
        """Every key under ``prefix`` with its ETag (the heads, for the follower's poll)."""
        found: dict[str, str] = {}
        with self._errors(prefix):
            pages = self._s3.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self.origin.bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    found[str(item["Key"])] = str(item["ETag"])
        return found

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._s3.delete_object(Bucket=self.origin.bucket, Key=key)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """boto3's and botocore's exceptions as StorageError, naming the origin."""
        try:
            yield
        except (StorageError, NotFoundError, ConflictError):
            raise
        except OSError as exc:
            raise StorageError(f"origin {self.origin}: {what}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.split(".")[0] not in ("botocore", "boto3", "s3transfer"):
                raise
            raise StorageError(f"origin {self.origin} ({self.endpoint}): {what}: {exc}") from exc


def _upload_progress(_nbytes: int) -> None:
    crash_point("origin_upload_progress")


def _download_progress(_nbytes: int) -> None:
    crash_point("origin_download_progress")


def _code(exc: BaseException) -> str:
    """The S3 error code of a botocore ClientError (its HTTP status when it has none)."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    code = str(response.get("Error", {}).get("Code", ""))
    return code or str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def origin_env_summary() -> str:
    """Where boto3 will look, for a start-up log line (never the secrets)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return f"endpoint {endpoint or 'AWS default'}"
