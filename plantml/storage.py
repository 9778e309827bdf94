"""Where a run's data lives: a local folder or an ``s3://`` prefix, behind one small API.

Every step of the flow may run on another machine (a Kubernetes pod, a GPU node, a
``resume`` on a fresh laptop), so nothing a later step needs may live on an earlier
step's local disk. The flow therefore publishes its shards, checkpoints and detector
files under one *store* URI — a folder of the run's local Metaflow datastore, or an S3
prefix beside the S3 datastore — and every step reads them back through these
functions. ``s3://`` goes through boto3, which reads the usual AWS settings; an
S3-compatible endpoint (MinIO, moto) is taken from ``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL`` or Metaflow's ``METAFLOW_S3_ENDPOINT_URL``.

Torch-free.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"


class StorageError(OSError):
    """A store location cannot be read or written; the message names the URI."""


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """Whether ``uri`` is an ``s3://`` location."""
    return str(uri).startswith(S3_SCHEME)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a local path or an S3 prefix (no normalisation of ``..``)."""
    text = str(base).rstrip("/")
    for p in parts:
        text = f"{text}/{str(p).strip('/')}"
    return text


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = str(uri)[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise StorageError(f"not an S3 URI with a bucket: {uri!r}")
    return bucket, key


def _endpoint() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "METAFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name]
    return None


@lru_cache(maxsize=4)
def _client(endpoint: str | None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def s3_client() -> Any:
    """A boto3 S3 client for the configured endpoint (cached per endpoint)."""
    return _client(_endpoint())


def read_bytes(uri: str | os.PathLike[str]) -> bytes:
    """The whole object or file at ``uri``.

    Raises:
        StorageError: if it does not exist or cannot be read.
    """
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # noqa: BLE001 - botocore raises many types; name the URI once
            raise StorageError(f"cannot read {uri}: {exc}") from exc
    try:
        return Path(uri).read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc


def open_read(uri: str | os.PathLike[str]) -> IO[bytes]:
    """A streaming, readable binary file object (S3 objects are not downloaded first)."""
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot read {uri}: {exc}") from exc
    try:
        return open(uri, "rb")
    except OSError as exc:
        raise StorageError(f"cannot read {uri}: {exc.strerror or exc}") from exc


def exists(uri: str | os.PathLike[str]) -> bool:
    """Whether a file/object exists at ``uri``."""
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception:  # noqa: BLE001 - 404 and 403 both mean "not usable here"
            return False
    return Path(uri).is_file()


def write_bytes(uri: str | os.PathLike[str], data: bytes) -> str:
    """Write ``data`` to ``uri`` atomically (readers see the old or the new object, never half)."""
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)  # an S3 PUT is atomic
        return str(uri)
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def upload_file(local: str | os.PathLike[str], uri: str | os.PathLike[str]) -> str:
    """Copy a local file to ``uri`` (multipart for large files on S3; atomic locally)."""
    if is_s3(uri):
        bucket, key = _split_s3(str(uri))
        s3_client().upload_file(str(local), bucket, key)
        return str(uri)
    dest = Path(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)
    return str(dest)


def list_files(prefix: str | os.PathLike[str]) -> Iterator[tuple[str, int]]:
    """Every file below ``prefix`` as ``(path relative to prefix, size in bytes)``, sorted.

    Hidden files and folders (a leading ``.``) are left out, as the local walk does.
    """
    if is_s3(prefix):
        bucket, key = _split_s3(str(prefix))
        key = key.rstrip("/") + "/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        found = []
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(key):]
                if rel and not any(part.startswith(".") for part in rel.split("/")):
                    found.append((rel, int(obj["Size"])))
        yield from sorted(found)
        return
    root = Path(prefix)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                full = Path(dirpath) / name
                yield full.relative_to(root).as_posix(), full.stat().st_size


def prefix_exists(prefix: str | os.PathLike[str]) -> bool:
    """Whether anything is stored below ``prefix`` (a local folder that exists counts)."""
    if is_s3(prefix):
        bucket, key = _split_s3(str(prefix))
        key = key.rstrip("/") + "/" if key else ""
        try:
            page = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
        except Exception as exc:  # noqa: BLE001
            raise StorageError(f"cannot list {prefix}: {exc}") from exc
        return bool(page.get("KeyCount"))
    return Path(prefix).is_dir()
