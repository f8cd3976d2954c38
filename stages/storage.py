"""Object storage for a URI that is a local path or ``s3://bucket/prefix``: objects (list,
read, write), pyarrow filesystems, and whole directories (a model checkpoint, say) copied to
and from a local one (``local_copy``, ``upload_dir``).

Storage options use Lance's keys (``access_key_id``, ``secret_access_key``, ``endpoint``,
``region``, ``allow_http``) so the same dict configures boto3, pyarrow and Lance. Keys that
are not given fall back to the ``AWS_*`` environment variables. Credentials are never logged,
put into an error message, or written anywhere.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

# Lance option key -> environment variables consulted (first set wins) when the key is absent.
_ENV_FALLBACK = {
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "allow_http": ("AWS_ALLOW_HTTP",),
}


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3 URI (always ``/`` for s3)."""
    if is_s3(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return os.path.join(uri, *parts)


def resolve_options(storage_options: dict[str, str] | None = None) -> dict[str, str]:
    """Storage options with the AWS_* environment filled in for keys that were not given."""
    opts = {k: str(v) for k, v in (storage_options or {}).items() if v is not None}
    for key, env_names in _ENV_FALLBACK.items():
        if key not in opts:
            value = next((os.environ[e] for e in env_names if os.environ.get(e)), None)
            if value is not None:
                opts[key] = value
    return opts


def _allow_http(opts: dict[str, str]) -> bool:
    return str(opts.get("allow_http", "false")).lower() in ("1", "true", "yes")


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def _s3_client(storage_options: dict[str, str] | None) -> Any:
    import boto3

    opts = resolve_options(storage_options)
    endpoint = opts.get("endpoint")
    if endpoint and "://" not in endpoint:
        endpoint = ("http://" if _allow_http(opts) else "https://") + endpoint
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=opts.get("access_key_id"),
        aws_secret_access_key=opts.get("secret_access_key"),
        aws_session_token=opts.get("session_token"),
        region_name=opts.get("region", "us-east-1"),
    )


def list_objects(uri: str, *, suffix: str = ".mcap",
                 storage_options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Objects under ``uri`` (recursively) whose name ends with ``suffix``, sorted by URI.

    Each item is ``{"uri", "size", "etag"}``. On s3 the etag is the server's; on a local
    disk it is ``"<size>-<mtime_ns>"`` in hex (a change detector, not a content hash).
    A missing prefix or directory lists as empty; a single file lists as itself. A local name
    that cannot be stat'ed (a dangling symlink, a file removed while listing) is listed with
    size 0 and etag ``"unstat-<error>"``: reading it fails, and that is its log's reject.
    """
    out: list[dict[str, Any]] = []
    if is_s3(uri):
        bucket, prefix = _split_s3(uri)
        client = _s3_client(storage_options)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(suffix):
                    out.append({"uri": f"s3://{bucket}/{obj['Key']}", "size": int(obj["Size"]),
                                "etag": obj["ETag"].strip('"')})
    else:
        paths = [uri] if os.path.isfile(uri) else [
            os.path.join(root, name) for root, _, names in os.walk(uri) for name in names]
        for path in paths:
            if path.endswith(suffix):
                try:
                    st = os.stat(path)
                except OSError as err:
                    out.append({"uri": path, "size": 0, "etag": f"unstat-{type(err).__name__}"})
                    continue
                out.append({"uri": path, "size": st.st_size,
                            "etag": f"{st.st_size:x}-{st.st_mtime_ns:x}"})
    return sorted(out, key=lambda o: o["uri"])


_SPECIAL = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
            stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def read_bytes(uri: str, storage_options: dict[str, str] | None = None) -> bytes:
    """The whole object at ``uri``; FileNotFoundError / OSError on both backends. A local path
    that is not a regular file (a FIFO, a socket, a device, a directory) is an OSError at once:
    it is opened without blocking and checked before any read."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = _split_s3(uri)
        try:
            return _s3_client(storage_options).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "404"):
                raise FileNotFoundError(f"{uri}: {code}") from exc
            raise OSError(f"{uri}: s3 error {code}") from exc
        except BotoCoreError as exc:
            raise OSError(f"{uri}: {type(exc).__name__}") from exc
    fd = os.open(uri, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO would block a plain open until a writer came
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(f"{uri} is {_SPECIAL.get(stat.S_IFMT(mode), 'special')}, not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def delete(uri: str, storage_options: dict[str, str] | None = None) -> None:
    """Remove the object or file at ``uri`` (nothing to do when it is absent)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client(storage_options).delete_object(Bucket=bucket, Key=key)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(uri)


def write_bytes(uri: str, data: bytes, storage_options: dict[str, str] | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (temp file + rename locally; one PUT on s3)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _s3_client(storage_options).put_object(Bucket=bucket, Key=key, Body=bytes(data))
        return
    directory = os.path.dirname(os.path.abspath(uri))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, uri)
    except BaseException:
        os.unlink(tmp)
        raise


def pyarrow_fs(uri: str | os.PathLike, storage_options: dict[str, str] | None = None
               ) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (``bucket/key`` on s3, absolute locally; no
    trailing ``/`` on either)."""
    uri = str(uri)
    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    opts = resolve_options(storage_options)
    endpoint = opts.get("endpoint")
    scheme = "http" if _allow_http(opts) else "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    fs = pafs.S3FileSystem(
        access_key=opts.get("access_key_id"), secret_key=opts.get("secret_access_key"),
        session_token=opts.get("session_token"), region=opts.get("region", "us-east-1"),
        endpoint_override=endpoint, scheme=scheme,
    )
    return fs, uri[len("s3://"):].rstrip("/")


@contextmanager
def local_copy(uri: str | os.PathLike, storage_options: dict[str, str] | None = None) -> Iterator[Path]:
    """The directory at ``uri`` as a local path while the context lasts (a local one is itself).

    An s3:// prefix is downloaded (everything under it) to a temporary directory first; a prefix
    holding nothing yields an empty directory.
    """
    fs, path = pyarrow_fs(uri, storage_options)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(tmp)


def upload_dir(local_dir: str | os.PathLike, uri: str | os.PathLike,
               storage_options: dict[str, str] | None = None) -> str:
    """Copy the files under the local directory ``local_dir`` to ``uri`` (a local directory or an
    s3:// prefix; existing files of the same names are replaced). Returns ``str(uri)``."""
    src = Path(local_dir).resolve()
    if not src.is_dir():
        raise NotADirectoryError(f"{local_dir} is not a directory")
    fs, path = pyarrow_fs(uri, storage_options)
    if isinstance(fs, pafs.LocalFileSystem) and Path(path) == src:
        return str(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return str(uri)
