"""Object-store output: put finished local files into ``s3://`` or a local folder, whole or not at all.

Writers build each file locally (a shard, its index, a marker) and hand the finished file to a
:class:`Store`, which makes it appear under its final name atomically:

- :class:`S3Store` (``s3://bucket/prefix``): one ``PutObject``, or a multipart upload for large
  files, which S3 makes visible only when it completes; an interrupted upload leaves no object
  (its parts are dropped by :meth:`S3Store.abort_uploads`, which a resuming writer calls).
- :class:`LocalStore` (a folder, e.g. a shared filesystem while the shards are written on local
  disk): copy to ``NAME.tmp``, fsync, rename.

S3 goes through the transport's client (:mod:`wds_tools.transport`): boto3's usual environment
and credentials chain (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, region, instance roles), the same
timeouts, our retries with backoff, and URLs redacted in every message. Credentials are never
logged. Listing is lazy (one page of 1,000 names at a time).
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Iterator, Optional, Tuple

from . import io as wio
from .transport import s3_request, s3_split

__all__ = ["Store", "LocalStore", "S3Store", "open_store", "PART_BYTES"]

log = logging.getLogger(__name__)
PART_BYTES = 64 << 20  # files above this go up as a multipart upload of parts this size


class Store:
    """A folder-like destination: names are ``/``-separated paths relative to its root URL."""

    url: str

    def url_of(self, name: str) -> str:
        return self.url.rstrip("/") + "/" + name

    def list(self, prefix: str = "") -> Iterator[Tuple[str, int]]:
        """``(name, size)`` of every object whose name starts with ``prefix``, sorted, lazily."""
        raise NotImplementedError

    def put(self, local_path: str, name: str) -> None:
        """Make the finished file ``local_path`` appear as ``name``, whole or not at all."""
        raise NotImplementedError

    def put_bytes(self, data: bytes, name: str) -> None:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        """Remove ``name`` (no error if it is absent)."""
        raise NotImplementedError

    def read_bytes(self, name: str) -> bytes:
        return wio.read_bytes(self.url_of(name))

    def abort_uploads(self, prefix: str = "") -> int:
        """Drop unfinished uploads of names starting with ``prefix``; return how many."""
        return 0


class LocalStore(Store):
    """A local folder; files appear by rename, so a reader never sees half of one."""

    def __init__(self, root: str):
        self.root = wio.local_path(root)
        self.url = self.root
        os.makedirs(self.root, exist_ok=True)

    def url_of(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def list(self, prefix: str = "") -> Iterator[Tuple[str, int]]:
        for d, dirs, files in os.walk(self.root):
            dirs.sort()
            rel = os.path.relpath(d, self.root).replace(os.sep, "/")
            for fn in sorted(files):
                name = fn if rel == "." else f"{rel}/{fn}"
                if name.startswith(prefix):
                    try:
                        yield name, os.path.getsize(os.path.join(d, fn))
                    except FileNotFoundError:
                        continue  # removed while listing

    def put(self, local_path: str, name: str) -> None:
        dest = self.url_of(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(local_path, "rb") as src, open(dest + ".tmp", "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(dest + ".tmp", dest)

    def put_bytes(self, data: bytes, name: str) -> None:
        dest = self.url_of(name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest + ".tmp", "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(dest + ".tmp", dest)

    def delete(self, name: str) -> None:
        try:
            os.remove(self.url_of(name))
        except FileNotFoundError:
            pass


class S3Store(Store):
    """``s3://bucket/prefix``: every write is one atomic PUT or one completed multipart upload."""

    def __init__(self, url: str, opts: wio.IOOptions = wio.DEFAULT, part_bytes: int = PART_BYTES):
        self.bucket, key = s3_split(url.rstrip("/") + "/")
        self.prefix = key  # "" or "a/b/"
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.opts, self.part_bytes = opts, part_bytes

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _call(self, name: str, method: str, **kw):
        """One S3 request, retried on transient errors; permanent ones raise at once."""
        return s3_request(self.url_of(name), method, self.opts, **kw)

    def list(self, prefix: str = "") -> Iterator[Tuple[str, int]]:
        token: Optional[str] = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(prefix, "list_objects_v2", **kw)
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.prefix) :], int(obj["Size"])
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def put(self, local_path: str, name: str) -> None:
        size = os.path.getsize(local_path)
        if size <= self.part_bytes:
            with open(local_path, "rb") as f:
                self.put_bytes(f.read(), name)
            return
        self._multipart(local_path, name, size)

    def put_bytes(self, data: bytes, name: str) -> None:
        self._call(name, "put_object", Bucket=self.bucket, Key=self._key(name), Body=data)

    def _multipart(self, local_path: str, name: str, size: int) -> None:
        key = self._key(name)
        upload = self._call(name, "create_multipart_upload", Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = []
            with open(local_path, "rb") as f:
                for number, at in enumerate(range(0, size, self.part_bytes), start=1):
                    f.seek(at)
                    body = f.read(self.part_bytes)
                    r = self._call(
                        name,
                        "upload_part",
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload,
                        PartNumber=number,
                        Body=body,
                    )
                    parts.append({"PartNumber": number, "ETag": r["ETag"]})
            self._call(
                name,
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            try:
                self._call(name, "abort_multipart_upload", Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception as e:  # noqa: BLE001 - the first error is the one to report
                log.warning(
                    "%s: could not abort the unfinished upload: %s",
                    wio.redact(self.url_of(name)),
                    wio.scrub(str(e)),
                )
            raise

    def delete(self, name: str) -> None:
        self._call(name, "delete_object", Bucket=self.bucket, Key=self._key(name))

    def abort_uploads(self, prefix: str = "") -> int:
        page = self._call(prefix, "list_multipart_uploads", Bucket=self.bucket, Prefix=self._key(prefix))
        n = 0
        for up in page.get("Uploads", []):
            self._call(
                prefix, "abort_multipart_upload", Bucket=self.bucket, Key=up["Key"], UploadId=up["UploadId"]
            )
            n += 1
        return n


def open_store(url: str, opts: wio.IOOptions = wio.DEFAULT) -> Store:
    """The store at ``url``: ``s3://bucket/prefix`` or a local folder (HTTP is read-only)."""
    if url.startswith("s3://"):
        return S3Store(url, opts)
    if wio.is_remote(url):
        raise ValueError(f"{wio.redact(url)}: cannot write there (output goes to a local folder or s3://)")
    return LocalStore(url)
