"""Storage URIs: local paths and s3:// (moto) behave the same."""
from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from stages import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(root URI, storage options) on a tmp dir and on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "landing"), None
    _, options = request.getfixturevalue("s3_server")
    return f"s3://lake/storage-test-{os.urandom(4).hex()}", options


def test_write_read_list(root):
    uri, options = root
    storage.write_bytes(storage.join(uri, "b", "two.mcap"), b"22", options)
    storage.write_bytes(storage.join(uri, "a", "one.mcap"), b"1", options)
    storage.write_bytes(storage.join(uri, "a", "notes.txt"), b"x", options)
    listed = storage.list_objects(uri, storage_options=options)
    assert [o["uri"] for o in listed] == [storage.join(uri, "a", "one.mcap"),
                                          storage.join(uri, "b", "two.mcap")]
    assert [o["size"] for o in listed] == [1, 2] and all(o["etag"] for o in listed)
    assert storage.read_bytes(listed[1]["uri"], options) == b"22"
    assert len(storage.list_objects(uri, suffix=".txt", storage_options=options)) == 1
    assert storage.list_objects(storage.join(uri, "nothing-here"), storage_options=options) == []


def test_missing_object_is_file_not_found(root):
    uri, options = root
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(uri, "absent.mcap"), options)


def test_etag_changes_with_content(root):
    uri, options = root
    target = storage.join(uri, "ep.mcap")
    storage.write_bytes(target, b"first", options)
    before = storage.list_objects(uri, storage_options=options)[0]["etag"]
    storage.write_bytes(target, b"second!", options)
    assert storage.list_objects(uri, storage_options=options)[0]["etag"] != before


def test_pyarrow_fs_round_trip(root):
    uri, options = root
    target = storage.join(uri, "table.bin")
    storage.write_bytes(target, b"hello", options)
    fs, path = storage.pyarrow_fs(target, options)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"hello"
    assert isinstance(fs, pafs.S3FileSystem if storage.is_s3(uri) else pafs.LocalFileSystem)


def test_join_and_is_s3():
    assert storage.join("s3://b/p/", "x", "/y.mcap") == "s3://b/p/x/y.mcap"
    assert storage.join("/tmp/lake", "t.lance") == "/tmp/lake/t.lance"
    assert storage.is_s3("s3://b") and not storage.is_s3("/data/s3")


def test_env_fallback_and_explicit_options_win(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    resolved = storage.resolve_options({"access_key_id": "given"})
    assert resolved["access_key_id"] == "given"
    assert resolved["region"] == "eu-west-1" and resolved["endpoint"] == "http://127.0.0.1:9"


def test_s3_uri_needs_a_bucket():
    with pytest.raises(ValueError, match="bucket"):
        storage.read_bytes("s3:///key")


def test_pyarrow_fs_paths():
    fs, path = storage.pyarrow_fs("relative/dir")
    assert isinstance(fs, pafs.LocalFileSystem) and path.endswith("relative/dir") and path.startswith("/")
    fs, path = storage.pyarrow_fs("s3://bucket/a/b/", {"endpoint": "http://127.0.0.1:9", "region": "eu-west-1",
                                                        "access_key_id": "k", "secret_access_key": "s"})
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b" and fs.region == "eu-west-1"


def test_upload_dir_and_local_copy(root, tmp_path):
    """A directory copied up and back holds the same files; a local directory is its own copy."""
    uri, options = root
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"a")
    (src / "sub" / "b.bin").write_bytes(b"\x00b")
    with storage.local_copy(src) as local:
        assert local == src
    target = storage.join(uri, "dir")
    assert storage.upload_dir(src, target, options) == target
    with storage.local_copy(target, options) as local:
        assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == ["a.txt",
                                                                                                   "sub/b.bin"]
        assert (local / "sub" / "b.bin").read_bytes() == b"\x00b"
    (src / "a.txt").write_bytes(b"A")  # a second upload replaces the files of the same names
    storage.upload_dir(src, target, options)
    assert storage.read_bytes(storage.join(target, "a.txt"), options) == b"A"
    with pytest.raises(NotADirectoryError):
        storage.upload_dir(tmp_path / "absent", target, options)


@pytest.mark.timeout(30)
def test_special_local_files_are_errors_not_crashes_or_hangs(tmp_path):
    """A dangling symlink lists (its read is the error); a FIFO or a directory named like a log is
    an OSError at once instead of a read that blocks forever."""
    (tmp_path / "good.mcap").write_bytes(b"abc")
    os.symlink(tmp_path / "gone.mcap", tmp_path / "dangling.mcap")
    os.mkfifo(tmp_path / "pipe.mcap")
    (tmp_path / "dir.mcap").mkdir()
    (tmp_path / "dir.mcap" / "x.txt").write_text("x")
    listed = {o["uri"].rsplit("/", 1)[-1]: o for o in storage.list_objects(str(tmp_path))}
    assert set(listed) == {"good.mcap", "dangling.mcap", "pipe.mcap"}
    assert listed["dangling.mcap"]["etag"] == "unstat-FileNotFoundError" and listed["dangling.mcap"]["size"] == 0
    assert storage.read_bytes(str(tmp_path / "good.mcap")) == b"abc"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "dangling.mcap"))
    with pytest.raises(OSError, match="a FIFO, not a regular file"):
        storage.read_bytes(str(tmp_path / "pipe.mcap"))
    with pytest.raises(OSError, match="a directory, not a regular file"):
        storage.read_bytes(str(tmp_path / "dir.mcap"))
