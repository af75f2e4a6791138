"""S3-compatible object storage (AWS S3, MinIO, moto's server) through boto3.

One small interface used by the worker (datasets in, artifacts out), the demo and the tests.
Transfers go through boto3's transfer manager (multipart above 8 MiB) with the ``standard``
retry mode, so a brief outage of the endpoint is retried with backoff instead of failing the job.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import ClientError, ParamValidationError
from s3transfer.subscribers import BaseSubscriber

from shared.exceptions import DatasetError, Interrupted
from shared.paths import cache_path, check_key, local_relative, printable, write_names
from shared.settings import Settings

_S3_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/key`` into ``("bucket", "some/key")``.

    Raises:
        ValueError: ``uri`` does not start with ``s3://<bucket>``.
    """
    match = _S3_URI.match(uri)
    if not match:
        raise ValueError(f"not an S3 URI: {uri!r} (expected s3://<bucket>/<key>)")
    return match["bucket"], match["key"]


def folder_prefix(uri: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``uri`` read as a folder: the prefix is empty or ends with ``/``."""
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def _is_hidden(relative_key: str) -> bool:
    return any(part.startswith(".") for part in relative_key.split("/"))


#: Polled while a long listing or download runs: a reason to stop (anything truthy) or None.
ShouldStop = Callable[[], object]
#: Seconds between a download's progress reports and stop checks.
_POLL_S = 0.25


@dataclass(frozen=True)
class TransferProgress:
    """How far a folder download has got: files and bytes done, of the totals to fetch."""

    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int


class _Transfers(BaseSubscriber):
    """Follows a folder's downloads: counts bytes (from the transfer threads) and finished files,
    re-raises the first failure, reports progress and asks whether to stop."""

    def __init__(
        self, files_total: int, bytes_total: int, on_progress: Callable[[TransferProgress], None] | None, should_stop: ShouldStop | None
    ) -> None:
        self.files_total, self.bytes_total = files_total, bytes_total
        self.report, self.should_stop = on_progress, should_stop
        self.finished: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.bytes_done = self.files_done = 0
        self.last_report = 0.0

    def on_progress(self, future, bytes_transferred: int, **kwargs) -> None:
        """s3transfer's hook: ``bytes_transferred`` more bytes arrived (on a transfer thread)."""
        with self.lock:
            self.bytes_done += bytes_transferred

    def on_done(self, future, **kwargs) -> None:
        """s3transfer's hook: ``future`` finished (done, failed or cancelled)."""
        self.finished.put(future)

    def poll(self, wait_s: float = 0.0) -> None:
        """Take finished transfers (waiting up to ``wait_s`` for one), then check for a stop and report.

        Raises:
            Interrupted: ``should_stop`` answered a reason.
            Exception: a failed transfer's error.
        """
        try:
            future = self.finished.get(timeout=wait_s) if wait_s else self.finished.get_nowait()
            while True:
                self.files_done += 1
                future.result()  # re-raises a failed download
                future = self.finished.get_nowait()
        except queue.Empty:
            pass
        if self.should_stop is not None and self.files_done < self.files_total and (reason := self.should_stop()):
            raise Interrupted(reason)
        now = time.monotonic()
        if self.report is not None and (now - self.last_report >= _POLL_S or self.files_done == self.files_total):
            self.last_report = now
            self.report(TransferProgress(self.files_done, self.files_total, min(self.bytes_done, self.bytes_total), self.bytes_total))

    def wait_all(self) -> None:
        """Poll until every file is done."""
        while self.files_done < self.files_total:
            self.poll(_POLL_S)


def _plan_download(
    listed: list[ObjectInfo], bucket: str, prefix: str, uri: str
) -> tuple[list[tuple[ObjectInfo, str]], set[str]]:
    """The visible objects under ``prefix`` with their local relative paths, and the folders to create.

    Every key is checked (hidden ones too) before anything is written. Folders that hold no
    visible file (a ``b/`` marker object, or only ``.DS_Store``) are created too, so an empty
    class is reported rather than silently dropped.

    Raises:
        DatasetError: a key is not a plain relative path, or an object's local path is also a
            folder's (an object ``cat`` beside ``cat/1.png``), naming both keys.
    """
    objects: list[tuple[ObjectInfo, str]] = []
    folders: dict[str, str] = {}  # local folder -> a key that needs it
    for obj in listed:
        relative = obj.key[len(prefix):]
        if not relative:
            continue  # the prefix's own folder marker
        is_folder = relative.endswith("/")
        local = local_relative(relative[:-1] if is_folder else relative, source=f"s3://{bucket}/{obj.key}")
        folder = local if is_folder else local.rpartition("/")[0]
        if folder and not _is_hidden(relative.rstrip("/") if is_folder else relative.rpartition("/")[0]):
            folders.setdefault(folder, obj.key)
        if not is_folder and not _is_hidden(relative):
            objects.append((obj, local))
    # An object and a folder cannot share a local name: refuse with both keys, before writing.
    ancestors: dict[str, str] = {}
    for path, key in [*folders.items(), *((relative, obj.key) for obj, relative in objects)]:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            ancestors.setdefault("/".join(parts[:depth]), key)
    for path, key in folders.items():
        ancestors.setdefault(path, key)
    seen: dict[str, str] = {}
    for obj, relative in objects:
        if relative in ancestors:
            raise DatasetError(
                f"{uri}: object s3://{bucket}/{printable(obj.key)} has the name of a folder that holds "
                f"s3://{bucket}/{printable(ancestors[relative])}; an object cannot shadow a class folder: "
                "rename or delete one of them"
            )
        if relative in seen:  # only two names crafted to share a shortened form
            raise DatasetError(f"{uri}: objects s3://{bucket}/{printable(seen[relative])} and s3://{bucket}/{printable(obj.key)} map to one local file")
        seen[relative] = obj.key
    return objects, set(folders)


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a prefix: its key, size in bytes, ETag (quotes stripped) and last change
    (seconds since the epoch)."""

    key: str
    size: int
    etag: str
    last_modified: float = 0.0


class Storage:
    """Reads and writes objects on one S3 endpoint.

    Args:
        settings: gives ``s3_endpoint_url`` (None means AWS), ``s3_bucket`` and ``s3_prefix``.
        max_attempts: boto3 ``standard`` retry mode attempts per request (backoff between them).
        max_concurrency: parallel transfers when a prefix is downloaded (many small files).
        endpoint_url: another endpoint than ``s3_endpoint_url`` (presigned URLs for clients outside).
        timeout_s: connect and read timeout in seconds (boto3's default, 60, if None).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        max_attempts: int = 10,
        max_concurrency: int = 16,
        endpoint_url: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = settings.s3_bucket
        secret = settings.aws_secret_access_key
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or settings.s3_endpoint_url,
            aws_access_key_id=settings.aws_access_key_id,
            aws_secret_access_key=secret.get_secret_value() if secret else None,
            region_name=settings.aws_default_region,
            config=Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                signature_version="s3v4",  # presigned URLs too (AWS regions since 2014 accept only v4)
                max_pool_connections=max_concurrency,
                **({"connect_timeout": timeout_s, "read_timeout": timeout_s} if timeout_s else {}),
            ),
        )
        self.transfer_config = TransferConfig(max_concurrency=max_concurrency)

    # -- URIs -------------------------------------------------------------------------------
    def job_uri(self, job_id: str, *parts: str) -> str:
        """``s3://<bucket>/<prefix>/<job_id>/<parts...>`` — where a job's artifacts go."""
        key = "/".join([self.settings.s3_prefix.strip("/"), job_id, *parts])
        return f"s3://{self.bucket}/{key}"

    # -- buckets ----------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        """Create the configured bucket if it does not exist (local stacks and tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    # -- reading ----------------------------------------------------------------------------
    def list_objects(self, uri: str, *, should_stop: ShouldStop | None = None) -> list[ObjectInfo]:
        """Every object whose key starts with ``uri``'s prefix, in key order.

        A prefix without a trailing slash is treated as a folder (``s3://b/data`` lists
        ``data/...``, not ``database/...``). ``should_stop`` is asked before each page of 1,000
        keys; a truthy answer raises :class:`shared.exceptions.Interrupted`.
        """
        bucket, prefix = folder_prefix(uri)
        paginator = self.client.get_paginator("list_objects_v2")
        objects: list[ObjectInfo] = []
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                if should_stop is not None and (reason := should_stop()):
                    raise Interrupted(reason)
                for item in page.get("Contents", []):
                    objects.append(
                        ObjectInfo(item["Key"], item["Size"], item["ETag"].strip('"'), item["LastModified"].timestamp())
                    )
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in {"NoSuchBucket", "AccessDenied", "InvalidBucketName", "403", "404"}:
                raise DatasetError(f"cannot list {uri}: {code}") from exc
            raise
        except ParamValidationError as exc:
            raise DatasetError(f"{uri} is not a valid S3 prefix: {exc}") from exc
        return objects

    def list_dataset(
        self, uri: str, *, should_stop: ShouldStop | None = None
    ) -> tuple[str, list[tuple[ObjectInfo, str]], set[str]]:
        """List a dataset prefix as :meth:`download_prefix` would download it, writing nothing.

        Returns:
            ``(bucket, objects, folders)``: each visible object with its local path relative to
            the download folder (``/``-separated), and the local folders to create.

        Raises:
            DatasetError: as :meth:`download_prefix`, with the same words (a dry run uses this).
            Interrupted: ``should_stop`` answered a reason between pages of the listing.
        """
        bucket, prefix = folder_prefix(uri)
        objects, folders = _plan_download(self.list_objects(uri, should_stop=should_stop), bucket, prefix, uri)
        if not objects:
            raise DatasetError(f"dataset prefix {uri} is empty or does not exist")
        return bucket, objects, folders

    def download_prefix(
        self,
        uri: str,
        cache_dir: Path,
        *,
        on_progress: Callable[[TransferProgress], None] | None = None,
        should_stop: ShouldStop | None = None,
    ) -> Path:
        """Download every object under ``uri`` into a local folder and return the folder.

        The folder is keyed by the objects' keys and ETags, so a second call for unchanged data
        downloads nothing. Hidden files (any path part starting with ``.``) are skipped. A folder
        is used only once complete (marked by a ``.complete`` file written last). Keys map to
        paths inside the folder through :func:`shared.paths.local_relative` (long names shortened).

        Args:
            on_progress: called about every 0.25 s (and at the end) while files are fetched.
            should_stop: asked as often; a truthy answer cancels the transfers not yet done
                (those in flight finish or abort within seconds) and raises.

        Raises:
            DatasetError: the prefix holds no objects (naming ``uri``), or cannot be listed; a key
                is not a plain relative path (``//``, ``..``…), or an object has the name of a
                folder (``cat`` beside ``cat/1.png``) — naming the keys.
            Interrupted: ``should_stop`` said so; the folder stays incomplete (not used).
        """
        bucket, objects, folders = self.list_dataset(uri, should_stop=should_stop)
        digest = hashlib.sha256(f"{bucket}\n".encode())
        for obj, _ in objects:
            digest.update(f"{obj.key}\t{obj.etag}\n".encode())
        for folder in sorted(folders):
            digest.update(f"{folder}/\n".encode())
        dest = cache_dir / digest.hexdigest()[:24]
        if (dest / ".complete").exists():
            return dest
        # Many small files (an image folder) are latency-bound: fetch them concurrently with
        # boto3's transfer manager, each to a temporary name renamed once complete.
        parts: list[tuple[Path, Path]] = []
        transfers = _Transfers(len(objects), sum(obj.size for obj, _ in objects), on_progress, should_stop)
        try:
            with create_transfer_manager(self.client, self.transfer_config) as manager:
                for obj, relative in objects:
                    target = dest / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    # Unique per process: two workers sharing a cache may fetch the same object at once.
                    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")
                    # Blocks while the manager's queue is full: most of the download happens in this loop.
                    manager.download(bucket, obj.key, str(tmp), subscribers=[transfers])
                    parts.append((tmp, target))
                    transfers.poll()
                transfers.wait_all()
        except Interrupted:
            # Leaving the manager's block with an exception cancelled every transfer not yet done.
            for tmp, _ in parts:
                tmp.unlink(missing_ok=True)
            raise
        for tmp, target in parts:
            os.replace(tmp, target)
        for folder in folders:
            (dest / folder).mkdir(parents=True, exist_ok=True)
        _, prefix = folder_prefix(uri)
        write_names(dest, {relative: obj.key[len(prefix):] for obj, relative in objects if relative != obj.key[len(prefix):]})
        (dest / ".complete").write_text(uri + "\n")
        return dest

    def download_cached(self, uri: str, cache_dir: Path) -> Path:
        """Download one object into a folder keyed by its URI and ETag; reuse it while unchanged.

        The local file keeps the key's last segment as its name (shortened when long).

        Raises:
            DatasetError: the object does not exist, or its key is not a plain path (naming ``uri``).
        """
        bucket, key = parse_s3_uri(uri)
        name = check_key(key, source=uri)[-1]
        try:
            etag = self.client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise DatasetError(f"{uri} does not exist or cannot be read ({code})") from exc
        except ParamValidationError as exc:
            raise DatasetError(f"{uri} is not a valid S3 object name: {exc}") from exc
        digest = hashlib.sha256(f"{uri}\n{etag}".encode()).hexdigest()[:24]
        path = cache_path(cache_dir / digest, name, source=uri)
        if not path.exists():
            tmp = self.download_file(uri, path.with_name(f"{path.name}.{os.getpid()}.part"))
            os.replace(tmp, path)
        return path

    def download_file(self, uri: str, path: Path) -> Path:
        """Download one object to ``path`` (parents created) and return ``path``."""
        bucket, key = parse_s3_uri(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.client.download_file(bucket, key, str(path))
        return path

    def presigned_url(self, uri: str, expires_s: int) -> str:
        """An HTTP GET URL for the object ``uri`` that works without credentials for ``expires_s`` seconds."""
        bucket, key = parse_s3_uri(uri)
        return self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)

    # -- writing ----------------------------------------------------------------------------
    def abort_incomplete_uploads(self, uri: str) -> list[str]:
        """Abort every multipart upload still open under ``uri``'s prefix; return their keys.

        A worker killed mid-upload leaves its multipart upload open: invisible to listings, yet
        its parts are stored (and billed, on AWS) until aborted. Call it only where nothing else
        uploads under ``uri`` (a job's next attempt, before it uploads). An S3 lifecycle rule
        (``AbortIncompleteMultipartUpload``) does the same for uploads nobody comes back to.
        """
        bucket, prefix = folder_prefix(uri)
        aborted = []
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                aborted.append(upload["Key"])
        return aborted

    def upload_file(self, path: Path, uri: str) -> str:
        """Upload one local file to ``uri`` and return ``uri``.

        An S3 PUT (or multipart completion) is atomic: readers see the old object or the whole
        new one, never a partial file.
        """
        bucket, key = parse_s3_uri(uri)
        self.client.upload_file(str(path), bucket, key)
        return uri

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri`` (nothing happens if there is none)."""
        bucket, key = parse_s3_uri(uri)
        self.client.delete_object(Bucket=bucket, Key=key)

    def upload_dir(self, local_dir: Path, uri: str) -> list[str]:
        """Upload every file under ``local_dir`` to ``uri/<relative path>``; return the URIs."""
        bucket, prefix = folder_prefix(uri)
        paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
        keys = [prefix + path.relative_to(local_dir).as_posix() for path in paths]
        with create_transfer_manager(self.client, self.transfer_config) as manager:
            futures = [manager.upload(str(path), bucket, key) for path, key in zip(paths, keys, strict=True)]
            for future in futures:
                future.result()  # re-raises the first failed upload
        return [f"s3://{bucket}/{key}" for key in keys]

