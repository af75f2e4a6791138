"""Image-folder datasets read from the real S3 server: classes, hidden files, split, bad files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.exceptions import DatasetError
from shared.spec import ImageFolderDataset
from shared.storage import Storage
from worker.training.images import load_image_folder
from worker.training.sources import dataset_labels
from worker.training.split import class_counts
from worker.training.transforms import SeededTransform, build_transform


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
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8  # 8-bit images travel as uint8
    model_input = data.finish(image)
    assert model_input.dtype == torch.float32 and 0 <= model_input.min() <= model_input.max() <= 1


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
    images, labels = next(iter(torch.utils.data.DataLoader(everything, batch_size=len(full), collate_fn=data.collate)))
    assert images.shape == (len(full), 3, 8, 8) and labels.tolist().count(0) == 6
    by_name = {Path(path).name: data.finish(everything[i][0]) for i, (path, _) in enumerate(full.samples)}
    assert by_name["palette.png"][0].max() > 0.9  # the red palette entry survived as red
    assert by_name["cmyk.jpg"][0].mean() > 0.9 and by_name["cmyk.jpg"][1].mean() < 0.1  # CMYK (0,255,255,0) is red


def test_batches_finished_on_the_device_equal_the_whole_transform_per_image(tmp_path: Path, storage: Storage):
    # The workers send uint8 (a quarter of the bytes); the training process scales and normalizes.
    # A folder mixing 8-bit and 16-bit images must give the same values as the one-image pipeline.
    root = make_folder(tmp_path / "src", {"a": 3, "b": 3})
    Image.fromarray(np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).save(root / "a" / "deep.png")
    storage.upload_dir(root, "s3://trainq/tests/finish/")
    spec = ImageFolderDataset(
        uri="s3://trainq/tests/finish/", val_fraction=0.1, image_size=8, channels=3,
        train_transforms=[{"name": "random_resized_crop", "size": 8}, {"name": "horizontal_flip"}],
        normalize={"preset": "imagenet"},
    )
    data = load_image_folder(spec, storage, tmp_path / "cache", seed=3)
    data.set_epoch(2)
    samples = [data.train[i] for i in range(len(data.train))]
    assert {image.dtype for image, _ in samples} == {torch.uint8, torch.float32}  # the 16-bit one stays float
    batch, _ = data.collate(samples)
    assert batch.dtype == torch.float32  # mixed: scaled before stacking, never uint8 values beside floats
    only_8_bit, _ = data.collate([sample for sample in samples if sample[0].dtype == torch.uint8])
    assert only_8_bit.dtype == torch.uint8
    whole = build_transform(spec.train_transforms, spec)
    for position, model_input in enumerate(data.finish(batch)):
        index = data.train.indices[position]
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(hash((3, 2, index)) & (2**63 - 1))  # SeededTransform's draw for (seed, epoch, index)
        want = whole(data.train.base[index][0])
        generator.set_state(state)
        assert torch.equal(model_input, want), data.train.base.samples[index][0]


def test_separate_val_prefix_must_have_the_same_classes(tmp_path: Path, storage: Storage):
    storage.upload_dir(make_folder(tmp_path / "train", {"a": 2, "b": 2}), "s3://trainq/tests/tv/train/")
    storage.upload_dir(make_folder(tmp_path / "val", {"a": 1, "c": 1}), "s3://trainq/tests/tv/val/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/tv/train/", val_uri="s3://trainq/tests/tv/val/", image_size=8)
    # A class the training set lacks is refused in the words a CSV gets (issue 19); one the
    # validation set lacks ('b') is fine.
    with pytest.raises(DatasetError, match=r"tv/train/: 1 class\(es\) have no training sample.*: 'c' \(1 in validation\)"):
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
        ("x,y\n1,a\n2,b\n3,a\n4,b\n", {"task": "classification", "val_uri": "VAL"}, "secrets-val.csv line 3 (1 in validation)"),
    ],
)
def test_csv_errors_name_the_column_and_line_never_a_value(tmp_path: Path, storage: Storage, rows, dataset, message):
    # Issue 7: a dry run on a table of secrets echoed a password.
    from shared.spec import CsvDataset
    from worker.training.tables import load_csv

    (tmp_path / "t.csv").write_text(rows)
    (tmp_path / "v.csv").write_text("x,y\n1,a\n2,hunter2\n")
    uri = storage.upload_file(tmp_path / "t.csv", f"s3://trainq/tests/secrets-{abs(hash(rows))}.csv")
    if dataset.get("val_uri"):
        dataset["val_uri"] = storage.upload_file(tmp_path / "v.csv", "s3://trainq/tests/secrets-val.csv")
    spec = CsvDataset(type="csv", uri=uri, target="y", val_fraction=0.25, **dataset)
    with pytest.raises(DatasetError) as info:
        load_csv(spec, storage, tmp_path / "cache", seed=0)
    assert message in str(info.value) and "hunter2" not in str(info.value)


# -- image modes: every mode Pillow opens reaches the model in [0, 1], or is refused by name --

GRAY_SPEC = ImageFolderDataset(uri="s3://trainq/tests/modes/", image_size=4, channels=1)
RGB_SPEC = ImageFolderDataset(uri="s3://trainq/tests/modes/", image_size=4, channels=3)


def _model_input(image: Image.Image, spec: ImageFolderDataset) -> torch.Tensor:
    """What the model sees: to_mode, then the job's transform (a 4x4 image is not resized)."""
    from worker.training.decode import to_mode
    from worker.training.transforms import build_transform

    return build_transform([], spec)(to_mode(image, "L" if spec.channels == 1 else "RGB")).as_subclass(torch.Tensor)


def _palette(mode: str) -> Image.Image:
    image = Image.new(mode, (4, 4), 1 if mode == "P" else (1, 80))
    image.putpalette([0, 0, 0, 255, 102, 0] + [0] * 762)
    return image


# (image, expected value of every pixel of the model input, per channel: gray, then RGB)
MODES = {
    "1": (lambda: Image.new("1", (4, 4), 1), [1.0], [1.0, 1.0, 1.0]),
    "L": (lambda: Image.new("L", (4, 4), 51), [0.2], [0.2, 0.2, 0.2]),
    "LA": (lambda: Image.new("LA", (4, 4), (51, 10)), [0.2], [0.2, 0.2, 0.2]),
    "P": (lambda: _palette("P"), [(255 * 299 + 102 * 587) / 1000 / 255], [1.0, 0.4, 0.0]),
    "PA": (lambda: _palette("PA"), [(255 * 299 + 102 * 587) / 1000 / 255], [1.0, 0.4, 0.0]),
    "RGB": (lambda: Image.new("RGB", (4, 4), (255, 102, 0)), [(255 * 299 + 102 * 587) / 1000 / 255], [1.0, 0.4, 0.0]),
    "RGBA": (lambda: Image.new("RGBA", (4, 4), (255, 102, 0, 7)), [(255 * 299 + 102 * 587) / 1000 / 255], [1.0, 0.4, 0.0]),
    "CMYK": (lambda: Image.new("CMYK", (4, 4), (0, 153, 255, 0)), [(255 * 299 + 102 * 587) / 1000 / 255], [1.0, 0.4, 0.0]),
    "YCbCr": (lambda: Image.new("YCbCr", (4, 4), (51, 128, 128)), [0.2], [0.2, 0.2, 0.2]),
    "HSV": (lambda: Image.new("HSV", (4, 4), (0, 0, 51)), [0.2], [0.2, 0.2, 0.2]),
    "LAB": (lambda: Image.new("LAB", (4, 4), (255, 128, 128)), [1.0], [1.0, 1.0, 1.0]),
    "I;16": (lambda: Image.new("I;16", (4, 4), 13107), [0.2], [0.2, 0.2, 0.2]),
    "I;16B": (lambda: Image.new("I;16B", (4, 4), 13107), [0.2], [0.2, 0.2, 0.2]),
    "I": (lambda: Image.new("I", (4, 4), 65535), [1.0], [1.0, 1.0, 1.0]),
    "F": (lambda: Image.new("F", (4, 4), 0.25), [0.25], [0.25, 0.25, 0.25]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_reaches_the_model_scaled_to_0_1(mode: str):
    make, gray, rgb = MODES[mode]
    image = make()
    assert image.mode == mode
    for spec, expected in ((GRAY_SPEC, gray), (RGB_SPEC, rgb)):
        tensor = _model_input(image, spec)
        assert tensor.shape == (spec.channels, 4, 4) and tensor.dtype == torch.float32
        want = torch.tensor(expected).view(-1, 1, 1).expand_as(tensor)
        assert torch.allclose(tensor, want, atol=2.5 / 255), f"{mode} → {spec.channels} channel(s): {tensor[:, 0, 0]}"


def test_a_16_bit_gradient_is_scaled_not_clipped():
    # The case: a 0..65535 gradient read through an 8-bit conversion was 94% white.
    import numpy as np

    gradient = Image.fromarray((np.arange(4096, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16))
    assert gradient.mode == "I;16"
    tensor = _model_input(gradient.resize((4, 4), Image.NEAREST), GRAY_SPEC)
    values = _model_input(gradient, ImageFolderDataset(uri="s3://trainq/t/", image_size=64, channels=1))
    assert values.min() == 0 and values.max() == pytest.approx(65520 / 65535) and values.mean() == pytest.approx(0.5, abs=0.01)
    assert (tensor == 1.0).float().mean() < 0.1


@pytest.mark.parametrize(
    ("mode", "value", "message"),
    [
        ("F", 3.5, r"mode 'F' pixel values span 3.5..3.5; expected 0..1"),
        ("F", -0.5, r"mode 'F' pixel values span -0.5..-0.5; expected 0..1"),
        ("I", 70000, r"mode 'I' pixel values span 70000..70000; expected 0..65535"),
        ("I", -1, r"mode 'I' pixel values span -1..-1; expected 0..65535"),
    ],
)
def test_values_that_cannot_be_scaled_are_refused_naming_file_and_mode(tmp_path: Path, mode: str, value: float, message: str):
    from worker.training.data import load_data
    from shared.spec import JobSpec

    root = tmp_path / "root"
    make_folder(root / "set", {"a": 2, "b": 2}, size=4)
    Image.new(mode, (4, 4), value).save(root / "set" / "b" / "odd.tif")
    spec = JobSpec.model_validate({"dataset": {"uri": "local://set", "image_size": 4}})
    with pytest.raises(DatasetError, match=rf"local://set/b/odd.tif \(ImageModeError: {message}"):
        load_data(spec, None, tmp_path / "cache", data_root=root)


# -- CSV rows ------------------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str) -> tuple[Path, "JobSpec"]:
    from shared.spec import JobSpec

    (tmp_path / "root").mkdir(exist_ok=True)
    (tmp_path / "root" / "t.csv").write_text(text)
    spec = JobSpec.model_validate({"dataset": {"type": "csv", "uri": "local://t.csv", "target": "y", "task": "classification"}})
    return tmp_path / "root", spec


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("5,6,a,secret", r"local://t.csv line 4 has 4 field\(s\); the header has 3"),  # extras used to shift silently
        ("5,6", r"local://t.csv line 4 has 2 field\(s\); the header has 3"),  # the target was None: TypeError, retried
        ("5,6,", r"local://t.csv line 4: column 'y' \(dataset.target\) is empty"),
    ],
)
def test_a_csv_row_that_does_not_fit_the_header_fails_naming_the_line(tmp_path: Path, row: str, message: str):
    from worker.training.data import load_data

    root, spec = _csv(tmp_path, f"x1,x2,y\n1,2,a\n3,4,b\n{row}\n7,8,a\n9,10,b\n")
    with pytest.raises(DatasetError, match=message) as info:
        load_data(spec, None, tmp_path / "cache", data_root=root)
    assert "secret" not in str(info.value)  # cell values are never echoed


def test_a_csv_at_the_top_of_data_root_is_read(tmp_path: Path):
    from worker.training.data import load_data

    root, spec = _csv(tmp_path, "x1,x2,y\n1,2,a\n3,4,b\n5,6,a\n7,8,b\n9,10,a\n")
    data = load_data(spec, None, tmp_path / "cache", data_root=root)
    assert data.classes == ["a", "b"] and len(data.train) + len(data.val) == 5


# -- the split: every class reaches training (issue 19, keras-team/keras#796) --------------------

RARE = {"a": 30, "b": 30, "rare": 2}


@pytest.mark.parametrize("seed", range(12))  # 1, 4 and 9 left `rare` out of training before
def test_every_class_of_2_or_more_images_is_in_both_splits(tmp_path: Path, storage: Storage, seed: int):
    storage.upload_dir(make_folder(tmp_path / "src", RARE), "s3://trainq/tests/rare/")
    spec = ImageFolderDataset(uri="s3://trainq/tests/rare/", val_fraction=0.3, image_size=8)
    data = load_image_folder(spec, storage, tmp_path / "cache", seed=seed)
    train, val = dataset_labels(data.train), dataset_labels(data.val)
    assert class_counts(data.classes, train) == {"a": 21, "b": 21, "rare": 1}
    assert class_counts(data.classes, val) == {"a": 9, "b": 9, "rare": 1}  # round(62 × 0.3) = 19 held out


@pytest.mark.parametrize("seed", [1, 4, 9])
def test_a_csv_of_the_same_classes_splits_the_same_way(tmp_path: Path, storage: Storage, seed: int):
    from shared.spec import CsvDataset
    from worker.training.tables import load_csv

    rows = [f"{i},{name}" for name, count in RARE.items() for i in range(count)]
    (tmp_path / "rare.csv").write_text("x,y\n" + "\n".join(rows) + "\n")
    uri = storage.upload_file(tmp_path / "rare.csv", "s3://trainq/tests/rare.csv")
    data = load_csv(CsvDataset(type="csv", uri=uri, target="y", task="classification", val_fraction=0.3), storage, tmp_path / "c", seed)
    assert class_counts(data.classes, dataset_labels(data.train)) == {"a": 21, "b": 21, "rare": 1}
    assert class_counts(data.classes, dataset_labels(data.val)) == {"a": 9, "b": 9, "rare": 1}


def test_a_class_with_no_training_sample_gets_the_same_words_from_both_types(tmp_path: Path, storage: Storage):
    from shared.spec import CsvDataset
    from worker.training.tables import load_csv

    storage.upload_dir(make_folder(tmp_path / "train", {"a": 2, "b": 2}), "s3://trainq/tests/words/train/")
    storage.upload_dir(make_folder(tmp_path / "val", {"a": 1, "b": 1, "c": 2}), "s3://trainq/tests/words/val/")
    (tmp_path / "t.csv").write_text("x,y\n1,a\n2,a\n3,b\n4,b\n")
    (tmp_path / "v.csv").write_text("x,y\n1,a\n2,b\n3,c\n4,c\n")
    train_csv = storage.upload_file(tmp_path / "t.csv", "s3://trainq/tests/words/t.csv")
    val_csv = storage.upload_file(tmp_path / "v.csv", "s3://trainq/tests/words/v.csv")
    image_spec = ImageFolderDataset(uri="s3://trainq/tests/words/train/", val_uri="s3://trainq/tests/words/val/", image_size=8)
    csv_spec = CsvDataset(type="csv", uri=train_csv, val_uri=val_csv, target="y", task="classification")
    with pytest.raises(DatasetError) as image_error:
        load_image_folder(image_spec, storage, tmp_path / "cache", seed=0)
    with pytest.raises(DatasetError) as csv_error:
        load_csv(csv_spec, storage, tmp_path / "cache", seed=0)
    words = "1 class(es) have no training sample, so the model could never learn them: "
    assert str(image_error.value) == f"s3://trainq/tests/words/train/: {words}'c' (2 in validation); " + ADVICE
    assert str(csv_error.value) == f"{train_csv}: {words}the target at {val_csv} line 4 (2 in validation); " + ADVICE


ADVICE = "add training samples of each class (with val_fraction, a class of 2 or more samples has one in each split)"
