"""Run dirs and artifacts on object storage (``s3://bucket/prefix``, ``gs://...``) or a local path,
through one pyarrow file system.

Object stores have no rename, so an artifact is published by pointer: its files are uploaded under a
fresh attempt prefix (``<name>.attempts/<id>/``) and it becomes visible only when the small pointer
``<name>.pointer.json`` naming that attempt (and the artifact's digest) is written last. A reader
resolves the pointer, so it never sees half an artifact; a writer killed mid-upload leaves only an
unreferenced attempt prefix, which :meth:`Store.clean_attempts` removes on the next run. Readers
download an artifact once per digest into a local cache (:func:`local_copy`), wherever they run: the
driver, Ray workers, evaluation tasks, Serve replicas.

Credentials and endpoints come from the environment only (``AWS_*`` including ``AWS_ENDPOINT_URL``,
instance roles, ``GOOGLE_*``); nothing here reads them from configs or writes them to logs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

POINTER = ".pointer.json"
ATTEMPTS = ".attempts"
_URI = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


class StorageError(ValueError):
    """A storage location that cannot be used: unknown scheme, missing bucket, denied access."""


def is_uri(location: str | Path | None) -> bool:
    """Whether ``location`` names object storage (``scheme://...``) rather than a local path."""
    return isinstance(location, str) and bool(_URI.match(location))


def join(location: str, *parts: str) -> str:
    """``location`` (a URI or a local path) with ``parts`` appended, ``/``-separated."""
    return "/".join([location.rstrip("/"), *(p.strip("/") for p in parts if p)])


def cache_root() -> Path:
    """Where fetched artifacts and run-dir scratch copies live (``GREENCODE_CACHE``, else ~/.cache/greencode)."""
    return Path(os.environ.get("GREENCODE_CACHE") or Path.home() / ".cache" / "greencode")


def scratch_dir(uri: str) -> Path:
    """The local working copy of run dir ``uri``: stages write here, then publish to ``uri``."""
    return cache_root() / "runs" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def _filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    scheme = _URI.match(uri)["scheme"].lower()
    try:
        if scheme == "s3":
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            rest = uri.split("://", 1)[1]
            options: dict[str, Any] = {}
            if endpoint:
                options["endpoint_override"] = endpoint
                options["scheme"] = "http" if endpoint.startswith("http://") else "https"
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            if region:
                options["region"] = region
            return pafs.S3FileSystem(**options), rest.rstrip("/")
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for unusable URIs
        raise StorageError(f"{uri}: no file system for {scheme}:// ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class Store:
    """A location (URI or local path) and the pyarrow file system that reaches it."""

    def __init__(self, location: str | Path) -> None:
        import pyarrow.fs as pafs

        self.location = str(location)
        if is_uri(self.location):
            self.fs, self.root = _filesystem(self.location)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(self.location).absolute())
        self.scheme = _URI.match(self.location)["scheme"].lower() if is_uri(self.location) else "file"

    def _path(self, rel: str = "") -> str:
        return join(self.root, rel) if rel else self.root

    def _ready(self, path: str) -> str:
        """``path``, its parent dir made on a local file system (object stores have no dirs)."""
        if self.scheme == "file":
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        return path

    def uri(self, rel: str = "") -> str:
        return join(self.location, rel) if rel else self.location

    def _fail(self, rel: str, operation: str, err: BaseException) -> StorageError:
        return StorageError(f"{self.uri(rel)}: cannot {operation} ({_reason(err)})")

    # ------------------------------------------------------------------ objects

    def exists(self, rel: str = "") -> bool:
        import pyarrow.fs as pafs

        try:
            return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound
        except OSError as err:
            raise self._fail(rel, "look it up", err) from None

    def read_bytes(self, rel: str) -> bytes | None:
        """The object's contents, or None when there is none."""
        try:
            with self.fs.open_input_stream(self._path(rel)) as src:
                return src.read()
        except FileNotFoundError:
            return None
        except OSError as err:
            if not self.exists(rel):
                return None
            raise self._fail(rel, "read it", err) from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one object (on a local path through a temp file and a rename)."""
        try:
            if self.scheme == "file":
                from greencode.atomic import write_atomic

                write_atomic(self._path(rel), data)
                return
            with self.fs.open_output_stream(self._path(rel)) as out:
                out.write(data)
        except OSError as err:
            raise self._fail(rel, "write it", err) from None

    def delete(self, rel: str) -> None:
        """Remove an object or everything under a prefix; nothing when there is none."""
        import pyarrow.fs as pafs

        path = self._path(rel)
        try:
            kind = self.fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(path)
        except OSError as err:
            raise self._fail(rel, "delete it", err) from None

    def children(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty when it does not exist)."""
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        except OSError as err:
            raise self._fail(rel, "list it", err) from None
        return sorted(i.base_name for i in infos)

    def upload(self, local: Path, rel: str) -> None:
        """Copy a local file or dir to ``rel`` (a dir's files keep their relative paths)."""
        import pyarrow.fs as pafs

        try:
            if local.is_dir():
                pafs.copy_files(str(local), self._path(rel), source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
            else:
                with local.open("rb") as src, self.fs.open_output_stream(self._ready(self._path(rel))) as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except OSError as err:
            raise self._fail(rel, f"upload {local} to it", err) from None

    def download(self, rel: str, local: Path) -> None:
        """Copy the file or dir at ``rel`` to the (absent) local path ``local``."""
        import pyarrow.fs as pafs

        path = self._path(rel)
        try:
            kind = self.fs.get_file_info(path).type
            if kind == pafs.FileType.NotFound:
                raise FileNotFoundError(f"{self.uri(rel)} does not exist")
            if kind == pafs.FileType.Directory:
                local.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(path, str(local), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            else:
                local.parent.mkdir(parents=True, exist_ok=True)
                with self.fs.open_input_stream(path) as src, local.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except FileNotFoundError:
            raise
        except OSError as err:
            raise self._fail(rel, "download it", err) from None

    def check(self) -> None:
        """Write, read back and delete a probe object under the location: a missing bucket, denied access
        or an unreachable endpoint is one StorageError naming the location, before any work starts."""
        probe = f".greencode-probe-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open_output_stream(self._ready(self._path(probe))) as out:
                out.write(b"probe")
        except OSError as err:
            raise self._fail("", "write to it", err) from None
        try:
            with self.fs.open_input_stream(self._path(probe)) as src:
                src.read()
            self.fs.delete_file(self._path(probe))
        except OSError as err:
            raise self._fail("", "read from or delete in it", err) from None

    # ------------------------------------------------------------------ publish by pointer

    def pointer(self, rel: str) -> dict[str, Any] | None:
        """The published version of artifact ``rel`` (``{"attempt", "digest", "kind"}``), or None."""
        raw = self.read_bytes(rel + POINTER)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            log.warning("%s is unreadable: treating %s as unpublished", self.uri(rel + POINTER), self.uri(rel))
            return None
        return record if isinstance(record, dict) and isinstance(record.get("attempt"), str) else None

    def publish(self, local: Path, rel: str, digest: str) -> str:
        """Upload ``local`` under a new attempt prefix of ``rel``, then point ``rel`` at it; returns the attempt."""
        attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.upload(local, f"{rel}{ATTEMPTS}/{attempt}")
        record = {"attempt": attempt, "digest": digest, "kind": "dir" if local.is_dir() else "file",
                  "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        self.write_bytes(rel + POINTER, json.dumps(record, indent=2).encode())
        self.clean_attempts(rel)
        return attempt

    def attempt_path(self, rel: str, record: dict[str, Any]) -> str:
        return f"{rel}{ATTEMPTS}/{record['attempt']}"

    def clean_attempts(self, rel: str) -> list[str]:
        """Delete the attempt prefixes of ``rel`` that its pointer does not name (uploads that were cut off)."""
        record = self.pointer(rel)
        current = record["attempt"] if record else None
        dropped = [name for name in self.children(rel + ATTEMPTS) if name != current]
        for name in dropped:
            log.info("%s: removing the unpublished upload %s", self.uri(rel), name)
            self.delete(f"{rel}{ATTEMPTS}/{name}")
        return dropped

    def unpublish(self, rel: str) -> None:
        """Withdraw artifact ``rel``: the pointer first (readers stop seeing it), then its uploads."""
        self.delete(rel + POINTER)
        self.delete(rel + ATTEMPTS)

    def fetch(self, rel: str, local: Path) -> dict[str, Any]:
        """Download the published version of ``rel`` to the (absent) local path ``local``; returns its pointer."""
        record = self.pointer(rel)
        if record is None:
            raise FileNotFoundError(f"{self.uri(rel)} is not published (no {self.uri(rel + POINTER)})")
        self.download(self.attempt_path(rel, record), local)
        return record

    # ------------------------------------------------------------------ conditional writes (the run-dir lock)

    def create_if_absent(self, rel: str, data: bytes) -> bool:
        """Write ``rel`` only if it does not exist; False when it does. S3 only (``If-None-Match: *``)."""
        client, bucket, key = self._s3(rel)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except client.exceptions.ClientError as err:
            if _code(err) in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise self._fail(rel, "create it", err) from None

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(contents, ETag) of ``rel``, or None. S3 only."""
        client, bucket, key = self._s3(rel)
        try:
            got = client.get_object(Bucket=bucket, Key=key)
            return got["Body"].read(), got["ETag"]
        except client.exceptions.ClientError as err:
            if _code(err) in ("NoSuchKey", "404"):
                return None
            raise self._fail(rel, "read it", err) from None

    def replace_if_unchanged(self, rel: str, data: bytes, etag: str) -> str | None:
        """Overwrite ``rel`` only if its ETag is still ``etag``; returns the new ETag, or None when it changed."""
        client, bucket, key = self._s3(rel)
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=data, IfMatch=etag)["ETag"]
        except client.exceptions.ClientError as err:
            if _code(err) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404"):
                return None
            raise self._fail(rel, "replace it", err) from None

    def _s3(self, rel: str) -> tuple[Any, str, str]:
        if self.scheme != "s3":
            raise StorageError(f"{self.uri(rel)}: {self.scheme}:// offers GreenCode no conditional write, so a run "
                               "dir there cannot be locked against a second pipeline; use an s3:// run dir or a "
                               "shared file system")
        try:
            import boto3
        except ImportError:
            raise StorageError(f"{self.uri(rel)}: locking a run dir on s3:// needs boto3 (pip install "
                               "'greencode[s3]')") from None
        bucket, _, prefix = self.root.partition("/")
        return boto3.client("s3"), bucket, join(prefix, rel) if prefix else rel


def _code(err: Any) -> str:
    return str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))


class ObjectLock:
    """One pipeline per run dir on object storage: a lock object created only if absent, holding a lease
    that its holder renews while it runs. A successor takes over a lease that expired (its holder died);
    while it is live, a second pipeline is refused naming the holder."""

    def __init__(self, store: Store, rel: str = "pipeline.lock", lease_s: float = 60.0) -> None:
        self.store, self.rel, self.lease_s = store, rel, lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "expires_at": time.time() + self.lease_s}).encode()

    def acquire(self) -> None:
        from greencode.locks import RunDirBusy

        if self.store.create_if_absent(self.rel, self._record()):
            self._etag = self.store.read_versioned(self.rel)[1]
        else:
            current = self.store.read_versioned(self.rel)
            if current is None:  # released between the two calls
                return self.acquire()
            raw, etag = current
            try:
                held = json.loads(raw)
                expires = float(held["expires_at"])
            except (ValueError, KeyError, TypeError):
                held, expires = {}, 0.0
            if expires > time.time():
                raise RunDirBusy(f"{self.store.location} is in use by pipeline pid {held.get('pid')} on "
                                 f"{held.get('host')} (lease {self.store.uri(self.rel)} renewed until "
                                 f"{time.strftime('%H:%M:%S', time.localtime(expires))})")
            self._etag = self.store.replace_if_unchanged(self.rel, self._record(), etag)
            if self._etag is None:
                raise RunDirBusy(f"{self.store.location}: another pipeline took over the expired lock first")
            log.info("%s: took over the lock of pipeline pid %s on %s (its lease expired)", self.store.location,
                     held.get("pid"), held.get("host"))
        self._thread = threading.Thread(target=self._renew, name="greencode-lock-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                etag = self.store.replace_if_unchanged(self.rel, self._record(), self._etag or "")
            except StorageError as err:  # the store is briefly unreachable: try again at the next renewal
                log.warning("%s: could not renew the run-dir lock: %s", self.store.location, err)
                continue
            if etag is None:
                log.error("%s: lost the run-dir lock (another pipeline took it over)", self.store.location)
                return
            self._etag = etag

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.store.read_versioned(self.rel)
        if current is not None and current[1] == self._etag:
            self.store.delete(self.rel)

    def __enter__(self) -> ObjectLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def local_copy(location: str | Path) -> Path:
    """A local path for artifact ``location``: itself when local, else its published version downloaded
    once per digest into the cache (concurrent fetchers on one host download it once)."""
    if not is_uri(location):
        return Path(location)
    from greencode.locks import FileLock

    parent, _, name = str(location).rstrip("/").rpartition("/")
    store = Store(parent)
    record = store.pointer(name)
    if record is None:
        raise FileNotFoundError(f"{location} is not published (no {store.uri(name + POINTER)})")
    key = hashlib.sha256(f"{record.get('digest')}|{location}|{record['attempt']}".encode()).hexdigest()[:24]
    target = cache_root() / "artifacts" / key / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / ".lock"):
        if not target.exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".fetch-"))
            try:
                store.download(store.attempt_path(name, record), tmp / name)
                os.rename(tmp / name, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("fetched %s (%s) into %s", location, record.get("digest", "")[:19], target)
    return target


def published_digest(location: str) -> str | None:
    """The digest a URI artifact was published with (no download), or None when it is not published."""
    parent, _, name = location.rstrip("/").rpartition("/")
    record = Store(parent).pointer(name)
    return record.get("digest") if record else None


def artifact_digest(location: str | Path) -> str | None:
    """The content digest of an artifact: a local file or dir hashed (greencode.digests), a URI's read from
    its pointer (it was hashed when published), so a run's identity is the same wherever its inputs live."""
    if is_uri(location):
        return published_digest(str(location))
    from greencode.digests import tree_digest

    return tree_digest(location)
