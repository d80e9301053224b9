"""Where outputs go: fsspec URLs (local paths, ``s3://``, ``gs://``, ``memory://``) and their options.

Credentials never pass through here: they come from the environment (``AWS_ACCESS_KEY_ID``, ...),
and :func:`scrub_url` removes any ``user:password@`` before a URL is stored.
"""
from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.config
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError

__all__ = ["StorageConfig", "check_writable", "open_fs", "join_url", "scrub_url", "write_bytes_atomic", "parquet_bytes"]


@dataclass(frozen=True)
class StorageConfig:
    """Object-storage options (never credentials: those come from the environment, e.g.
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, and are never written anywhere).

    Attributes
    ----------
    endpoint_url : str or None
        S3-compatible endpoint (``http://127.0.0.1:9000`` for MinIO/moto); default the
        ``FSSPEC_S3_ENDPOINT_URL`` environment variable, else AWS.
    anon : bool
        Anonymous access (public buckets).
    """

    endpoint_url: str | None = None
    anon: bool = False

    def apply_defaults(self) -> None:
        """Make ``endpoint_url`` fsspec's default for ``s3://`` in this process, so that code which
        opens URLs without storage options (e.g. :func:`galgan_ray.checkpoint.load_checkpoint` for a
        checkpoint on S3) reaches the same store."""
        if self.endpoint_url:
            fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = self.endpoint_url

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec storage options for ``url`` (only ``s3://`` takes these)."""
        if not str(url).startswith(("s3://", "s3a://")):
            return {}
        opts: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.anon:
            opts["anon"] = True
        return opts


def scrub_url(url: str) -> str:
    """A URL without user:password@ (never store credentials)."""
    return re.sub(r"(//)[^/@]+@", r"\1", str(url))


def join_url(url: str, *parts: str) -> str:
    """``url/part/part`` with single slashes."""
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def open_fs(url: str, storage: StorageConfig):
    """``(filesystem, path)`` with listings re-read: fsspec caches directory listings per process
    (s3fs), and other processes (Ray workers) write the files we look for."""
    fs, path = fsspec.core.url_to_fs(url, **storage.options_for(url))
    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - filesystems without a cache
        pass
    return fs, path


def write_bytes_atomic(url: str, data: bytes, storage: StorageConfig) -> None:
    """Write ``data`` to a temporary name beside ``url``, then move it into place."""
    fs, path = open_fs(url, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as zstd-compressed Parquet bytes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def check_writable(url: str, storage: StorageConfig = StorageConfig(), *, key: str = "output",
                   folder: bool = True) -> str:
    """Check before any work that ``url`` can be written: a folder (``folder``) or a file in one.

    A local path (relative ones made absolute) must be, or lie in, a folder that can be created and
    written: not a regular file, nor below one (a file's own path must not be a folder). On object
    storage a probe object is written and removed with few retries, so a wrong endpoint, missing
    bucket or missing credentials give one line at once instead of retries for minutes mid-run.

    Returns
    -------
    str
        The URL to write (an absolute path for local outputs).

    Raises
    ------
    ConfigError
        Naming ``key`` and what is wrong with the location.
    """
    url = str(url)
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        path = os.path.abspath(os.path.expanduser(url.split("://", 1)[1] if protocol else url))
        if not folder and os.path.isdir(path):
            raise ConfigError(key, f"{path} is a folder, not a file")
        where = path if folder else os.path.dirname(path)
        above = where
        while not os.path.lexists(above):
            above = os.path.dirname(above)
        if not os.path.isdir(above):
            raise ConfigError(key, f"{where} is a regular file, not a folder" if above == where
                                   else f"{where} lies below {above}, a regular file, not a folder")
        try:
            os.makedirs(where, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=where)
            os.close(fd)
            os.remove(probe)
        except OSError as exc:
            raise ConfigError(key, f"{where} cannot be written: {exc.strerror or exc}") from None
        return path
    options = dict(storage.options_for(url))
    if protocol in ("s3", "s3a"):  # one attempt, short timeouts: an unreachable endpoint fails in seconds
        options["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 1}}
    try:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs retries each call 5 times on its own, with backoff
        stripped = fs._strip_protocol(url).rstrip("/")
        probe = posixpath.join(stripped if folder else posixpath.dirname(stripped),
                               f".write-probe-{uuid.uuid4().hex}")
        with fs.open(probe, "wb") as fh:
            fh.write(b"")
        fs.rm(probe)
    except Exception as exc:  # noqa: BLE001 - botocore, gcsfs, fsspec raise many kinds
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(key, f"{scrub_url(url)} cannot be written ({type(exc).__name__}: {text})") from None
    return url
