"""The sample data generators (``trainq/sample_data.py``)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainq.sample_data import write_photo_folder


def test_photo_folder_holds_jpegs_around_the_size_in_class_folders(tmp_path: Path):
    assert write_photo_folder(tmp_path / "a", count=12, size=(500, 375)) == {"china": 6, "flower": 6}
    write_photo_folder(tmp_path / "b", count=12, size=(500, 375))
    files = sorted((tmp_path / "a").rglob("*"))
    files = [path for path in files if path.is_file()]
    assert len(files) == 12
    for path in files:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 450 <= image.width <= 550 and 337 <= image.height <= 413
        assert path.read_bytes() == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()  # seeded
