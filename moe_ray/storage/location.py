"""A storage location: a local folder or `s3://bucket/prefix`, as Ray Train and boto3 need it.

S3-compatible endpoints (MinIO, moto, ...) come from the standard AWS environment:
AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@dataclass(frozen=True)
class Location:
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.uri[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        """Key prefix below the bucket, without slashes at either end."""
        parts = self.uri[5:].split("/", 1)
        return parts[1].strip("/") if len(parts) > 1 else ""

    @property
    def local_path(self) -> Path:
        return Path(self.uri).expanduser().resolve()

    def child(self, *names: str) -> Location:
        if self.is_s3:
            return Location("s3://" + "/".join(p for p in (self.bucket, self.prefix, *names) if p))
        return Location(str(self.local_path.joinpath(*names)))

    def ray_storage(self):
        """(storage_path, storage_filesystem) for ray.train.RunConfig."""
        if not self.is_s3:
            return str(self.local_path), None
        from pyarrow.fs import S3FileSystem

        endpoint = s3_endpoint()
        kwargs = {"region": s3_region()}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        return "/".join(p for p in (self.bucket, self.prefix) if p), S3FileSystem(**kwargs)

    def __str__(self) -> str:
        return self.uri


def refuse_occupied(out: str, error: type[Exception]) -> None:
    """Raise `error` unless `out` holds nothing: a new or empty folder, or an S3 prefix with no
    object at or below it; and, for a folder, unless it can be written (its parent is made and
    probed). Writers that never overwrite check this before they start."""
    loc = Location(out)
    if loc.is_s3:
        from moe_ray.storage import s3  # s3 builds on this module

        if s3.holds_anything(loc):
            raise error(f"{out} already exists and is not empty: give a new prefix (nothing was written)")
    elif loc.local_path.exists() and (not loc.local_path.is_dir() or any(loc.local_path.iterdir())):
        raise error(f"{out} already exists and is not empty: give a new folder (nothing was written)")
    else:
        try:
            make_writable_folder(loc.local_path.parent)  # where the staging folder goes
        except OSError as err:
            raise error(f"cannot write {out}: {err}; give a folder you can write to (nothing was written)") from None


def make_writable_folder(folder: Path) -> None:
    """Make `folder` (and its parents) and write and delete a file in it: OSError if it cannot be
    written, found before any work starts rather than at its end."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".moe-ray-write-check-"):
        pass


def staging_sibling(out: Path) -> Path:
    """A new hidden folder beside `out`, to be renamed to `out` once complete (so an interrupted
    write never leaves something that looks finished), with the permissions a plain mkdir gives:
    mkdtemp's owner-only mode would hide the result from other users of a shared filesystem."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp
