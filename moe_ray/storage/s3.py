"""boto3 for what Ray Train does not do: checking a bucket before a job starts, listing and
deleting a run's checkpoint objects, reading small files (a tokenizer) and byte ranges (token
shards), uploading prepared shards and exported models. Every failure is a StorageError that
names the location and what to fix."""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from pathlib import Path

from moe_ray.storage.location import Location, s3_endpoint, s3_region


class StorageError(Exception):
    """Storage that cannot be used; the message says what to fix."""


_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def client():
    """The process's S3 client for the current endpoint, region and credentials settings. One
    is shared: a client is thread-safe, but making one is not (boto3's default session) and costs
    milliseconds, which the block reader's threads would otherwise pay per ranged GET."""
    key = (
        os.getpid(),
        s3_endpoint(),
        s3_region(),
        os.environ.get("AWS_ACCESS_KEY_ID"),
        os.environ.get("AWS_PROFILE"),
    )
    with _clients_lock:
        if key not in _clients:
            import boto3

            _clients[key] = boto3.client("s3", endpoint_url=s3_endpoint(), region_name=s3_region())
        return _clients[key]


def has_credentials() -> bool:
    """Whether boto3 finds AWS credentials here (environment, profile, or instance role)."""
    with _clients_lock:  # boto3's default session is not thread-safe
        import boto3

        return boto3.Session().get_credentials() is not None


@contextlib.contextmanager
def storage_errors(loc: Location, doing: str):
    """S3 failures as a StorageError naming `loc` and what to fix, not a botocore traceback.
    `doing`: what was attempted, e.g. "read" or "write to"."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except NoCredentialsError:
        raise StorageError(
            f"no AWS credentials for {loc}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)"
        ) from None
    except (ClientError, S3UploadFailedError) as err:
        cause = err if isinstance(err, ClientError) else err.__context__  # an upload wraps the ClientError
        code = cause.response.get("Error", {}).get("Code", "?") if isinstance(cause, ClientError) else str(err)
        if code == "NoSuchBucket":
            raise StorageError(f"bucket {loc.bucket!r} does not exist (create it, or fix the s3:// URI)") from None
        if code in ("404", "NoSuchKey"):
            raise StorageError(f"{loc} does not exist") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"cannot {doing} {loc}: access denied ({code}); check the credentials") from None
        raise StorageError(f"cannot {doing} {loc}: {code}") from None
    except BotoCoreError as err:
        raise StorageError(f"cannot reach S3 for {loc} (endpoint {s3_endpoint() or 'AWS'}): {err}") from None


def check_writable(loc: Location) -> None:
    """Refuse a job early when its bucket is missing or not writable with these credentials."""
    from botocore.exceptions import ClientError

    s3 = client()
    probe = "/".join(p for p in (loc.prefix, f".moe-ray-write-check-{uuid.uuid4().hex}") if p)
    with storage_errors(loc, "write to"):
        try:
            s3.head_bucket(Bucket=loc.bucket)
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "404":  # a HEAD has no body to say NoSuchBucket
                raise StorageError(
                    f"bucket {loc.bucket!r} does not exist (create it, or fix checkpoint.storage)"
                ) from None
            raise
        s3.put_object(Bucket=loc.bucket, Key=probe, Body=b"ok")
        s3.delete_object(Bucket=loc.bucket, Key=probe)


def list_objects(loc: Location) -> list[dict]:
    """Every object below the location: [{"Key", "Size"}, ...]."""
    s3 = client()
    prefix = loc.prefix + "/" if loc.prefix else ""
    out = []
    with storage_errors(loc, "list"):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            out.extend({"Key": o["Key"], "Size": o["Size"]} for o in page.get("Contents", []))
    return out


def list_children(loc: Location) -> list[str]:
    """The names of the "folders" directly below the location (common prefixes), sorted."""
    s3 = client()
    prefix = loc.prefix + "/" if loc.prefix else ""
    out = []
    with storage_errors(loc, "list"):
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix, Delimiter="/")
        for page in pages:
            out.extend(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
    return sorted(out)


def delete_prefix(loc: Location) -> int:
    s3 = client()
    keys = [o["Key"] for o in list_objects(loc)]
    with storage_errors(loc, "delete"):
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=loc.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]})
    return len(keys)


def upload_file(path: Path, loc: Location) -> None:
    with storage_errors(loc, "write to"):
        client().upload_file(str(path), loc.bucket, loc.prefix)


def write_bytes(loc: Location, data: bytes) -> None:
    with storage_errors(loc, "write to"):
        client().put_object(Bucket=loc.bucket, Key=loc.prefix, Body=data)


def read_bytes(loc: Location) -> bytes:
    data = read_if_exists(loc)
    if data is None:
        raise StorageError(f"{loc} does not exist")
    return data


def _missing(err) -> bool:
    # A GET says NoSuchKey; a HEAD has no body and says only 404.
    return err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey")


def read_range(loc: Location, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the object (fewer at its end)."""
    with storage_errors(loc, "read"):
        return client().get_object(Bucket=loc.bucket, Key=loc.prefix, Range=f"bytes={start}-{stop - 1}")["Body"].read()


def read_if_exists(loc: Location) -> bytes | None:
    """The object's bytes, or None when there is no such object (its bucket must exist)."""
    from botocore.exceptions import ClientError

    with storage_errors(loc, "read"):
        try:
            return client().get_object(Bucket=loc.bucket, Key=loc.prefix)["Body"].read()
        except ClientError as err:
            if _missing(err):
                return None
            raise


def exists(loc: Location) -> bool:
    """Whether `loc` is an object (not a prefix). A missing bucket reads as a missing object."""
    from botocore.exceptions import ClientError

    with storage_errors(loc, "read"):
        try:
            client().head_object(Bucket=loc.bucket, Key=loc.prefix)
        except ClientError as err:
            if _missing(err):
                return False
            raise
    return True


def holds_anything(loc: Location) -> bool:
    """Whether there is an object at `loc` or below it (one request or two, however many there are)."""
    if exists(loc):
        return True
    with storage_errors(loc, "list"):
        page = client().list_objects_v2(Bucket=loc.bucket, Prefix=loc.prefix + "/" if loc.prefix else "", MaxKeys=1)
    return bool(page.get("Contents"))
