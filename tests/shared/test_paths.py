"""Names from outside becoming local paths: S3 keys under the download cache (against the real S3
server) and ``local://`` paths under DATA_ROOT, symlinks included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from shared.exceptions import DatasetError
from shared.paths import MAX_NAME_BYTES, cache_path, check_tree_inside, key_problem, local_name, resolve_inside
from shared.storage import Storage

#: Every form of key that must never become a path: (relative key, what the error says).
BAD_KEYS = [
    ("/ABS/outside.png", "starts with '/'"),
    ("cat//x.png", "empty segment"),
    ("cat/../../outside.png", "'.' or '..' segment"),
    ("../outside.png", "'.' or '..' segment"),
    ("cat/./x.png", "'.' or '..' segment"),
    ("cat\\..\\..\\outside.png", "backslash"),
    ("cat/x\x00.png", "control character"),
    ("cat/x\x1b[31m.png", "control character"),
    ("cat/x\n.png", "control character"),
]


@pytest.mark.parametrize(("key", "problem"), [*BAD_KEYS, ("", "is empty")])
def test_keys_that_are_not_plain_relative_paths_are_refused(tmp_path: Path, key: str, problem: str):
    key = key.replace("/ABS", str(tmp_path))
    assert problem in key_problem(key)
    with pytest.raises(DatasetError) as info:
        cache_path(tmp_path / "cache", key, source=f"s3://b/p/{key}")
    assert problem in str(info.value) and "refused object s3://b/p/" in str(info.value)
    assert "\x1b" not in str(info.value) and "\n" not in str(info.value)  # control characters escaped
    assert list(tmp_path.iterdir()) == []


def test_long_names_are_shortened_keeping_their_extension():
    assert local_name("cat.png") == "cat.png" and local_name("x" * MAX_NAME_BYTES) == "x" * MAX_NAME_BYTES
    long_png, other_png = "a" * 900 + ".png", "a" * 899 + "b.png"
    assert local_name(long_png).endswith(".png") and len(local_name(long_png).encode()) <= MAX_NAME_BYTES
    assert local_name(long_png) != local_name(other_png)
    accented = "é" * 300 + ".jpeg"  # 2 bytes a character: never cut in the middle of one
    assert local_name(accented).endswith(".jpeg") and len(local_name(accented).encode()) <= MAX_NAME_BYTES
    assert local_name(".hidden" + "x" * 300).startswith(".hidden")  # hidden stays hidden
    # room for a download's temporary suffix within the 255-byte limit
    assert len((local_name(long_png) + f".{4194304}.part").encode()) < 255


@pytest.mark.parametrize(("key", "problem"), BAD_KEYS[:6])
def test_a_bad_key_under_a_prefix_writes_nothing_and_is_named(tmp_path: Path, storage: Storage, key: str, problem: str):
    # Issue 7's attack: s3://trainq/datasets/x//tmp/elsewhere/file.png was written to /tmp/elsewhere.
    outside = tmp_path / "outside"
    key = key.replace("/ABS", str(outside))
    prefix = f"tests/evil-{abs(hash(key))}/"
    image = tmp_path / "img.png"
    Image.new("RGB", (4, 4)).save(image)
    for good in ("cat/1.png", "dog/1.png"):
        storage.client.upload_file(str(image), "trainq", prefix + good)
    storage.client.upload_file(str(image), "trainq", prefix + key)
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(DatasetError) as info:
        storage.download_prefix(f"s3://trainq/{prefix}", cache)
    assert f"s3://trainq/{prefix}{key}" in str(info.value) and problem in str(info.value)
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written == [image], written  # not outside the cache, and nothing half-written inside it


@pytest.mark.parametrize("key", ["tables/x\x1bname.csv", "tables//x.csv", "tables/../x.csv"])
def test_a_single_object_with_a_bad_key_is_refused(tmp_path: Path, storage: Storage, key: str):
    with pytest.raises(DatasetError, match="refused object s3://trainq/tables/"):
        storage.download_cached(f"s3://trainq/{key}", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_object_that_shadows_a_folder_is_refused_naming_both_keys(tmp_path: Path, storage: Storage):
    # Issue 8: `prefix/cat` beside `prefix/cat/1.png` was an IsADirectoryError naming a cache path.
    image = tmp_path / "img.png"
    Image.new("RGB", (4, 4)).save(image)
    for key in ("tests/shadow/cat", "tests/shadow/cat/1.png", "tests/shadow/dog/1.png"):
        storage.client.upload_file(str(image), "trainq", key)
    with pytest.raises(DatasetError) as info:
        storage.download_prefix("s3://trainq/tests/shadow/", tmp_path / "cache")
    message = str(info.value)
    assert "object s3://trainq/tests/shadow/cat has the name of a folder" in message
    assert "s3://trainq/tests/shadow/cat/1.png" in message and str(tmp_path) not in message
    assert not (tmp_path / "cache").exists()


def test_keys_up_to_the_s3_limit_download_under_short_names(tmp_path: Path, storage: Storage):
    image = tmp_path / "img.png"
    Image.new("RGB", (4, 4)).save(image)
    prefix = "tests/long-keys/"
    long_folder = "f" * 250
    name = "n" * (1024 - len(prefix) - len("cat/") - len(long_folder) - 1 - len(".png")) + ".png"
    key = f"{prefix}cat/{long_folder}/{name}"
    assert len(key.encode()) == 1024  # S3's limit
    storage.client.upload_file(str(image), "trainq", key)
    storage.client.upload_file(str(image), "trainq", prefix + "dog/1.png")
    folder = storage.download_prefix(f"s3://trainq/{prefix}", tmp_path / "cache")
    files = sorted(path.relative_to(folder) for path in folder.rglob("*.png"))
    assert len(files) == 2 and all(len(part.encode()) <= MAX_NAME_BYTES for path in files for part in path.parts)
    assert files[0].parts[0] == "cat" and files[0].suffix == ".png"
    assert storage.download_cached(f"s3://trainq/{key}", tmp_path / "single").read_bytes() == image.read_bytes()


# -- DATA_ROOT ----------------------------------------------------------------------------------


def test_outside_and_missing_read_the_same(tmp_path: Path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (tmp_path / "secret.csv").write_text("a,b\n1,2\n")
    (root / "data" / "link.csv").symlink_to(tmp_path / "secret.csv")
    (root / "data" / "dangling.csv").symlink_to(root / "gone.csv")
    assert resolve_inside(root, "data", source="local://data") == (root / "data").resolve()
    messages = set()
    for name in ("data/link.csv", "data/dangling.csv", "data/missing.csv"):
        with pytest.raises(DatasetError) as info:
            resolve_inside(root, name, source="local://x")
        messages.add(str(info.value))
    assert messages == {"local://x: no such file or folder under DATA_ROOT"}


def test_every_entry_of_a_local_tree_must_stay_inside_the_root(tmp_path: Path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "set" / "cat").mkdir(parents=True)
    (root / "shared").mkdir()
    elsewhere.mkdir()
    (root / "set" / "cat" / "1.png").write_bytes(b"png")
    (root / "shared" / "2.png").write_bytes(b"png")
    (root / "set" / "cat" / "2.png").symlink_to(root / "shared" / "2.png")  # inside: fine
    (root / "set" / ".hidden").symlink_to("/etc")  # hidden: never read
    check_tree_inside(root / "set", root, source="local://set")

    (root / "set" / "dog").symlink_to(elsewhere)  # a class folder linked out
    with pytest.raises(DatasetError, match=r"^local://set/dog: no such file or folder under DATA_ROOT$"):
        check_tree_inside(root / "set", root, source="local://set")
    os.unlink(root / "set" / "dog")
    (root / "set" / "cat" / "3.png").symlink_to(elsewhere / "x.png")  # dangling, and outside
    with pytest.raises(DatasetError, match=r"^local://set/cat/3.png: no such file or folder under DATA_ROOT$"):
        check_tree_inside(root / "set", root, source="local://set")
    os.unlink(root / "set" / "cat" / "3.png")
    (root / "set" / "cat" / "loop").symlink_to(root / "set")
    with pytest.raises(DatasetError, match="local://set/cat/loop: a symlink loop"):
        check_tree_inside(root / "set", root, source="local://set")
