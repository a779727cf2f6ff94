"""GTSRB (German Traffic Sign Recognition Benchmark) from its official image folders.

Training: ``GTSRB/Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` per class; test:
``GTSRB/Final_Test/Images/*.ppm`` with ``GT-final_test.csv`` (from GTSRB_Final_Test_GT.zip),
either next to the images or up to three folders above them. torchvision's on-disk layout
(``gtsrb/GTSRB/Training/...``) is accepted too. Each sign is cropped to its ROI and resized
to 32x32 (bilinear).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from fedtier.data.base import ArrayDataset, from_uint8
from fedtier.data.files import require_root
from fedtier.errors import DataError

GTSRB_HOW = (
    "Download GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip "
    "from https://benchmark.ini.rub.de/gtsrb_dataset.html (archive: "
    "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/published-archive.html), "
    "extract them into one folder, put GT-final_test.csv next to GTSRB/Final_Test/Images, "
    "and set data.root to the folder holding GTSRB/."
)
NUM_CLASSES = 43
SIZE = 32
Row = tuple[Path, tuple[int, int, int, int], int]  # image, ROI box (x1, y1, x2, y2), class
_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")
_TEST_CSV = "GT-final_test.csv"
# Per-channel statistics of the ROI-cropped 32x32 training images.
_MEAN, _STD = (0.3337, 0.3064, 0.3171), (0.2672, 0.2564, 0.2629)


def load_gtsrb(root: str | None) -> tuple[ArrayDataset, ArrayDataset]:
    """GTSRB, 39,209 train / 12,630 test, ``[N, 3, 32, 32]``, 43 classes, per-channel standardised."""
    base = require_root("gtsrb", root, GTSRB_HOW)
    train_dir, test_dir = _find_dirs(base)
    train = [row for d in _class_dirs(train_dir) for row in _read_csv(d / f"GT-{d.name}.csv", d)]
    test = _read_csv(_find_test_csv(test_dir), test_dir)
    return (
        from_uint8(*_read_images(train), NUM_CLASSES, "gtsrb", _MEAN, _STD),
        from_uint8(*_read_images(test), NUM_CLASSES, "gtsrb", _MEAN, _STD),
    )


def _find_dirs(root: Path) -> tuple[Path, Path]:
    """The training images folder (class sub-folders) and the test images folder."""
    for base in (root, root / "GTSRB", root / "gtsrb" / "GTSRB"):
        train = next(
            (d for d in (base / "Final_Training" / "Images", base / "Training") if d.is_dir()), None
        )
        test = base / "Final_Test" / "Images"
        if train is not None and test.is_dir():
            return train, test
    raise DataError(
        f"data set 'gtsrb': no GTSRB/Final_Training/Images and GTSRB/Final_Test/Images folders under {root}. {GTSRB_HOW}"
    )


def _class_dirs(train_dir: Path) -> list[Path]:
    dirs = sorted(d for d in train_dir.iterdir() if d.is_dir() and d.name.isdigit())
    if not dirs:
        raise DataError(
            f"data set 'gtsrb': {train_dir} holds no class folders (00000 .. 00042). {GTSRB_HOW}"
        )
    return dirs


def _find_test_csv(test_dir: Path) -> Path:
    candidates = [d / _TEST_CSV for d in (test_dir, *test_dir.parents[:3])]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        searched = ", ".join(str(c.parent) for c in candidates)
        raise DataError(
            f"data set 'gtsrb': test labels {_TEST_CSV} not found (searched {searched}); it comes in "
            f"GTSRB_Final_Test_GT.zip (the GT-final_test.test.csv inside the test images has no ClassId). {GTSRB_HOW}"
        )
    return found


def _read_csv(path: Path, image_dir: Path) -> list[Row]:
    """``(image path, ROI box, class)`` for every row of a semicolon-separated GTSRB annotation
    file whose file names are relative to ``image_dir``."""
    if not path.is_file():
        raise DataError(f"data set 'gtsrb': annotation file {path} is missing. {GTSRB_HOW}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {', '.join(missing)}; expected {';'.join(_COLUMNS)}"
            )
        return [_parse_row(path, reader.line_num, row, image_dir) for row in reader]


def _parse_row(path: Path, line: int, row: dict[str, str], image_dir: Path) -> Row:
    try:
        x1, y1, x2, y2, label = (int(row[c]) for c in _COLUMNS[1:])
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}, line {line}: expected integer ROI and ClassId, got {row}") from e
    if not 0 <= label < NUM_CLASSES:
        raise DataError(
            f"{path}, line {line}: ClassId must lie in 0..{NUM_CLASSES - 1}, got {label}"
        )
    return image_dir / row["Filename"], (x1, y1, x2, y2), label


def _read_images(rows: list[Row]) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 3, 32, 32]`` uint8 (ROI-cropped, resized) and labels ``[N]``."""
    images = (
        np.stack([_read_image(p, box) for p, box, _ in rows])
        if rows
        else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    )
    return images.transpose(0, 3, 1, 2), np.array([label for _, _, label in rows], dtype=np.int64)


def _read_image(path: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """One sign: the ROI ``(x1, y1, x2, y2)`` (right/bottom exclusive) resized to ``[32, 32, 3]``."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read GTSRB image {path}: {e}") from e
    x1, y1 = max(box[0], 0), max(box[1], 0)
    x2, y2 = min(box[2], rgb.width), min(box[3], rgb.height)
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{path}: ROI {box} is empty inside a {rgb.width}x{rgb.height} image")
    return np.asarray(rgb.crop((x1, y1, x2, y2)).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
