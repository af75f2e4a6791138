"""Image-folder datasets read from the real S3 server: classes, hidden files, split, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from shared.exceptions import DatasetError
from shared.spec import ImageFolderDataset
from shared.storage import Storage
from worker.training.data import SeededTransform, load_image_folder


def make_folder(root: Path, counts: dict[str, int], size: int = 12) -> Path:
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            Image.new("RGB", (size, size), (index * 20 % 255, 0, 0)).save(root / name / f"{index}.png")
    return root


def test_hidden_folders_and_files_are_not_classes(tmp_path: Path, storage: Storage):
    # pytorch/vision#2831: ImageFolder makes `.ipynb_checkpoints` a class.
    root = make_folder(tmp_path / "src", {"cat": 3, "dog": 2})
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (12, 12)).save(root / ".ipynb_checkpoints" / "copy.png")
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    storage.upload_dir(root, "s3://trainq/tests/hidden/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/hidden/", val_fraction=0.2, image_size=8, channels=3)
    data = load_image_folder(spec, storage, tmp_path / "cache", seed=0)
    assert data.classes == ["cat", "dog"]
    assert len(data.train) + len(data.val) == 5 and len(data.val) == 1
    image, label = data.train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1


def test_split_is_seeded_and_the_download_is_cached(tmp_path: Path, storage: Storage):
    root = make_folder(tmp_path / "src", {"a": 10, "b": 10})
    storage.upload_dir(root, "s3://trainq/tests/split/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/split/", val_fraction=0.25, image_size=8, channels=1)
    first = load_image_folder(spec, storage, tmp_path / "cache", seed=7)
    again = load_image_folder(spec, storage, tmp_path / "cache", seed=7)
    other = load_image_folder(spec, storage, tmp_path / "cache", seed=8)
    assert first.val.indices == again.val.indices != other.val.indices
    assert len(first.val) == 5 and not set(first.val.indices) & set(first.train.indices)
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one download for unchanged content


def test_unreadable_images_fail_before_training_naming_each_file(tmp_path: Path, storage: Storage):
    # pytorch/vision#138: never train silently on gray pixels. Policy: the job fails, naming them.
    root = tmp_path / "src"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for index in range(25):
            Image.new("RGB", (16, 16), (index * 9, 40, 90)).save(root / cls / f"{index}.jpg", quality=90)
    whole = (root / "b" / "0.jpg").read_bytes()
    (root / "b" / "half.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "empty.jpg").write_bytes(b"")
    storage.upload_dir(root, "s3://trainq/tests/broken/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/broken/", image_size=8)
    with pytest.raises(DatasetError) as info:
        load_image_folder(spec, storage, tmp_path / "cache", seed=0)
    message = str(info.value)
    assert message.startswith("2 unreadable image(s) in s3://trainq/tests/broken/: ")
    assert "s3://trainq/tests/broken/b/empty.jpg (UnidentifiedImageError: cannot identify image file it)" in message
    assert "s3://trainq/tests/broken/b/half.jpg (OSError: Truncated File Read)" in message
    assert str(tmp_path) not in message  # no worker-local paths


def test_every_image_mode_becomes_three_channels_and_batches_stack(tmp_path: Path, storage: Storage):
    root = tmp_path / "src"
    (root / "mixed").mkdir(parents=True)
    (root / "plain").mkdir()
    Image.new("RGB", (20, 14), (200, 10, 10)).save(root / "mixed" / "rgb.jpg")
    Image.new("L", (9, 9), 128).save(root / "mixed" / "gray.png")
    palette = Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(root / "mixed" / "palette.png", transparency=0)
    Image.new("RGBA", (10, 10), (0, 255, 0, 100)).save(root / "mixed" / "rgba.png")
    Image.new("CMYK", (10, 10), (0, 255, 255, 0)).save(root / "mixed" / "cmyk.jpg")
    Image.new("1", (10, 10), 1).save(root / "mixed" / "bits.png")
    make_folder(root, {"plain": 2})
    storage.upload_dir(root, "s3://trainq/tests/modes/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/modes/", val_fraction=0.1, image_size=8, channels=3)
    data = load_image_folder(spec, storage, tmp_path / "cache", seed=0)
    full = data.train.base
    assert {Path(path).name for path, _ in full.samples} >= {"rgb.jpg", "gray.png", "palette.png", "rgba.png", "cmyk.jpg", "bits.png"}
    everything = SeededTransform(full, list(range(len(full))), data.train.transform, seed=0)
    images, labels = next(iter(torch.utils.data.DataLoader(everything, batch_size=len(full))))
    assert images.shape == (len(full), 3, 8, 8) and labels.tolist().count(0) == 6
    by_name = {Path(path).name: everything[i][0] for i, (path, _) in enumerate(full.samples)}
    assert by_name["palette.png"][0].max() > 0.9  # the red palette entry survived as red
    assert by_name["cmyk.jpg"][0].mean() > 0.9 and by_name["cmyk.jpg"][1].mean() < 0.1  # CMYK (0,255,255,0) is red


def test_separate_val_prefix_must_have_the_same_classes(tmp_path: Path, storage: Storage):
    storage.upload_dir(make_folder(tmp_path / "train", {"a": 2, "b": 2}), "s3://trainq/tests/tv/train/")
    storage.upload_dir(make_folder(tmp_path / "val", {"a": 1, "c": 1}), "s3://trainq/tests/tv/val/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/tv/train/", val_uri="s3://trainq/tests/tv/val/", image_size=8)
    with pytest.raises(DatasetError, match=r"classes of s3://trainq/tests/tv/val/ \['a', 'c'\] differ"):
        load_image_folder(spec, storage, tmp_path / "cache", seed=0)


@pytest.mark.parametrize("empty", ["marker", "ds_store_only", "text_only"])
def test_a_class_folder_without_images_is_refused_naming_it(tmp_path: Path, storage: Storage, empty: str):
    # pytorch/vision#4925: an empty class must not silently vanish from the label set.
    uri = f"s3://trainq/tests/empty-class-{empty}/"
    storage.upload_dir(make_folder(tmp_path / "src", {"cat": 2, "dog": 2}), uri)
    bucket, key = uri[5:].split("/", 1)
    body, name = {"marker": (b"", "bird/"), "ds_store_only": (b"\0Bud1", "bird/.DS_Store"), "text_only": (b"hi", "bird/notes.txt")}[empty]
    storage.client.put_object(Bucket=bucket, Key=key + name, Body=body)
    spec = ImageFolderDataset(uri=uri, image_size=8)
    with pytest.raises(DatasetError, match=rf"{uri}: Found no valid file for the classes bird\. Images must end in \.jpg"):
        load_image_folder(spec, storage, tmp_path / "cache", seed=0)


def test_one_class_is_refused(tmp_path: Path, storage: Storage):
    storage.upload_dir(make_folder(tmp_path / "src", {"only": 4}), "s3://trainq/tests/one-class/")
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) \['only'\]; classification needs at least 2"):
        load_image_folder(ImageFolderDataset(uri="s3://trainq/tests/one-class/", image_size=8), storage, tmp_path / "c", seed=0)


def test_local_datasets_are_read_under_data_root_only(tmp_path: Path, storage: Storage):
    from shared.spec import JobSpec
    from worker.training.data import load_data

    root = tmp_path / "data-root"
    make_folder(root / "shapes", {"round": 3, "square": 3})
    spec = JobSpec.model_validate({"dataset": {"uri": "local://shapes", "image_size": 8, "val_fraction": 0.34}})
    data = load_data(spec, storage, tmp_path / "cache", data_root=root)
    assert data.classes == ["round", "square"] and len(data.train) == 4 and len(data.val) == 2
    assert not (root / "shapes" / ".verified").exists()  # nothing written into the user's folder
    (tmp_path / "secret").mkdir()
    for uri, message in [
        ("local://shapes/../../secret", "the path has a '.' or '..' segment"),
        ("local://missing", "no such file or folder under DATA_ROOT"),
    ]:
        outside = JobSpec.model_validate({"dataset": {"uri": uri, "image_size": 8}})
        with pytest.raises(DatasetError, match=message):
            load_data(outside, storage, tmp_path / "cache", data_root=root)
    with pytest.raises(DatasetError, match="no DATA_ROOT"):
        load_data(spec, storage, tmp_path / "cache", data_root=None)


def test_dog_empty_and_bird_text_only_are_both_named(tmp_path: Path, storage: Storage):
    # The case 2: cat/ with images, dog/ empty, bird/ holding only .txt.
    uri = "s3://trainq/tests/cat-dog-bird/"
    storage.upload_dir(make_folder(tmp_path / "src", {"cat": 3}), uri)
    storage.client.put_object(Bucket="trainq", Key="tests/cat-dog-bird/dog/", Body=b"")
    storage.client.put_object(Bucket="trainq", Key="tests/cat-dog-bird/bird/readme.txt", Body=b"tweet")
    with pytest.raises(DatasetError, match=rf"{uri}: Found no valid file for the classes bird, dog\."):
        load_image_folder(ImageFolderDataset(uri=uri, image_size=8), storage, tmp_path / "cache", seed=0)


# -- names from outside (issue 7 items 1, 4, 5; issue 8 item 1) ---------------------------------


def test_long_keys_train_and_errors_name_the_key_not_the_cache(tmp_path: Path, storage: Storage):
    # Keys up to S3's 1,024 bytes: Errno 36 ("File name too long") on the cache used to be retried.
    uri = "s3://trainq/tests/long-names/"
    long_name = "l" * 400 + ".png"
    root = make_folder(tmp_path / "src", {"cat": 2, "dog": 2})
    (root / "cat" / "0.png").unlink()  # no local file can have the long name: upload it directly
    storage.upload_dir(root, uri)
    storage.client.upload_file(str(root / "cat" / "1.png"), "trainq", f"tests/long-names/cat/{long_name}")
    spec = ImageFolderDataset(uri=uri, image_size=8, val_fraction=0.25)
    data = load_image_folder(spec, storage, tmp_path / "cache", seed=0)
    assert data.classes == ["cat", "dog"] and len(data.train) + len(data.val) == 4
    storage.client.put_object(Bucket="trainq", Key=f"tests/long-names/dog/{'b' * 300}.png", Body=b"not a png")
    with pytest.raises(DatasetError) as info:
        load_image_folder(spec, storage, tmp_path / "cache", seed=0)
    assert f"{uri}dog/{'b' * 300}.png (UnidentifiedImageError" in str(info.value)
    assert str(tmp_path) not in str(info.value)


def test_local_symlinks_out_of_data_root_are_refused_like_missing_files(tmp_path: Path, storage: Storage):
    from shared.spec import JobSpec
    from worker.training.data import load_data

    root, elsewhere = tmp_path / "data-root", tmp_path / "elsewhere"
    make_folder(root / "shapes", {"round": 3, "square": 3})
    make_folder(elsewhere, {"stolen": 3})
    (root / "tables").mkdir()
    (tmp_path / "shadow.csv").write_text("x,y\n1,2\n3,4\n")
    (root / "tables" / "link.csv").symlink_to(tmp_path / "shadow.csv")

    def error(uri: str, **dataset) -> str:
        spec = JobSpec.model_validate({"dataset": {"uri": uri, **dataset}})
        with pytest.raises(DatasetError) as info:
            load_data(spec, storage, tmp_path / "cache", data_root=root)
        return str(info.value)

    csv = {"type": "csv", "target": "y", "task": "regression"}
    (root / "shapes" / "stolen").symlink_to(elsewhere / "stolen")  # a class folder linked out
    assert error("local://shapes", image_size=8) == "local://shapes/stolen: no such file or folder under DATA_ROOT"
    os.unlink(root / "shapes" / "stolen")
    (root / "shapes" / "round" / "9.png").symlink_to(elsewhere / "stolen" / "0.png")  # one file linked out
    assert error("local://shapes", image_size=8) == "local://shapes/round/9.png: no such file or folder under DATA_ROOT"
    # The same words whether the file exists elsewhere or nowhere.
    assert error("local://tables/link.csv", **csv) == "local://tables/link.csv: no such file or folder under DATA_ROOT"
    assert error("local://tables/none.csv", **csv) == "local://tables/none.csv: no such file or folder under DATA_ROOT"
    assert error("local://tables/../../shadow.csv", **csv).startswith("local://tables/../../shadow.csv: the path has a '.' or '..'")
    (root / "tables" / "folder.csv").mkdir()
    assert error("local://tables/folder.csv", **csv) == "local://tables/folder.csv is not a file"  # was IsADirectoryError, retried


@pytest.mark.parametrize(
    ("rows", "dataset", "message"),
    [
        ("x,y\n1,0\nhunter2,1\n3,0\n4,1\n", {"task": "classification"}, "line 3: column 'x' is not a number"),
        ("x,y\n1,1.5\n2,hunter2\n3,0.5\n4,1\n", {"task": "regression"}, "line 3: target 'y' is not a finite number"),
        ("x,y\n1,a\n2,b\n3,a\n4,b\n", {"task": "classification", "val_uri": "VAL"}, "line 3: the value of target 'y' is not a class"),
    ],
)
def test_csv_errors_name_the_column_and_line_never_a_value(tmp_path: Path, storage: Storage, rows, dataset, message):
    # Issue 7: a dry run on a table of secrets echoed a password.
    from shared.spec import CsvDataset
    from worker.training.data import load_csv

    (tmp_path / "t.csv").write_text(rows)
    (tmp_path / "v.csv").write_text("x,y\n1,a\n2,hunter2\n")
    uri = storage.upload_file(tmp_path / "t.csv", f"s3://trainq/tests/secrets-{abs(hash(rows))}.csv")
    if dataset.get("val_uri"):
        dataset["val_uri"] = storage.upload_file(tmp_path / "v.csv", "s3://trainq/tests/secrets-val.csv")
    spec = CsvDataset(type="csv", uri=uri, target="y", val_fraction=0.25, **dataset)
    with pytest.raises(DatasetError) as info:
        load_csv(spec, storage, tmp_path / "cache", seed=0)
    assert message in str(info.value) and "hunter2" not in str(info.value)
