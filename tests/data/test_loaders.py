"""File-based loaders, fed with small files written in the real formats."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from fedtier.data import load_dataset
from fedtier.errors import DataError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _pixels(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Undo per-channel normalisation: back to 0..255."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * s + m) * 255).numpy()


# ---------------------------------------------------------------- MNIST / Fashion-MNIST (IDX)


def _idx(array: np.ndarray) -> bytes:
    return (
        bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes() + array.tobytes()
    )


def _write_idx(
    folder: Path, gz: bool = False, n_train: int = 6, n_test: int = 4
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        IDX_FILES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_FILES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_FILES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_FILES[3]: (np.arange(n_test)[::-1] % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / name).write_bytes(_idx(array))
    return arrays


@pytest.mark.parametrize(
    ("name", "subdir", "gz", "mean", "std"),
    [
        ("mnist", "", False, 0.1307, 0.3081),
        ("mnist", "MNIST/raw", True, 0.1307, 0.3081),
        ("fashion-mnist", "", True, 0.2860, 0.3530),
        ("fashion-mnist", "FashionMNIST/raw", False, 0.2860, 0.3530),
    ],
)
def test_idx_loaders(
    tmp_path: Path, name: str, subdir: str, gz: bool, mean: float, std: float
) -> None:
    arrays = _write_idx(tmp_path / subdir, gz=gz)
    train, test = load_dataset(name, str(tmp_path))
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.name == name and train.num_classes == 10
    assert train.y.tolist() == arrays[IDX_FILES[1]].tolist()
    assert test.y.tolist() == arrays[IDX_FILES[3]].tolist()
    np.testing.assert_allclose(
        _pixels(train.x, (mean,), (std,))[:, 0], arrays[IDX_FILES[0]], atol=1e-3
    )


def test_idx_root_not_set_says_how_to_get_the_data() -> None:
    with pytest.raises(DataError, match=r"data\.root is not set.*yann\.lecun\.com.*torchvision"):
        load_dataset("mnist")


def test_idx_root_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an existing folder"):
        load_dataset("fashion-mnist", str(tmp_path / "nowhere"))


def test_idx_missing_file_is_named(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    (tmp_path / IDX_FILES[3]).unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]") as err:
        load_dataset("mnist", str(tmp_path))
    assert "train-images" not in str(err.value).split("Download")[0]
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)


def test_idx_wrong_magic(tmp_path: Path) -> None:
    arrays = _write_idx(tmp_path)
    (tmp_path / IDX_FILES[1]).write_bytes(_idx(arrays[IDX_FILES[0]]))  # an images file as labels
    with pytest.raises(
        DataError, match=r"train-labels-idx1-ubyte is not an IDX file with 1 dimension.*0x00000803"
    ):
        load_dataset("mnist", str(tmp_path))


def test_idx_truncated(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    path = tmp_path / IDX_FILES[2]
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte is truncated"):
        load_dataset("mnist", str(tmp_path))


def test_idx_corrupt_gzip(tmp_path: Path) -> None:
    _write_idx(tmp_path, gz=True)
    (tmp_path / f"{IDX_FILES[0]}.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"cannot read .*train-images-idx3-ubyte\.gz"):
        load_dataset("mnist", str(tmp_path))


def test_idx_image_and_label_counts_must_match(tmp_path: Path) -> None:
    _write_idx(tmp_path)
    (tmp_path / IDX_FILES[1]).write_bytes(_idx(np.zeros(5, np.uint8)))
    with pytest.raises(DataError, match="holds 6 images but .* holds 5 labels"):
        load_dataset("mnist", str(tmp_path))


# ---------------------------------------------------------------- CIFAR-10 / CIFAR-100 (pickles)

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


def _batch(n: int, label_key: bytes, num_classes: int, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"fixture",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, num_classes, n)],
    }


def _dumps(batch: dict[bytes, object], protocol: int) -> bytes:
    """Pickle ``batch``; protocol 2 names numpy 1.x's module, as the original files do."""
    data = pickle.dumps(batch, protocol=protocol)
    return (
        data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        if protocol == 2
        else data
    )


def _write_cifar10(folder: Path, protocol: int = 2) -> dict[str, dict[bytes, object]]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": _batch(2, b"labels", 10, i) for i in range(1, 6)}
    batches["test_batch"] = _batch(3, b"labels", 10, 9)
    for name, batch in batches.items():
        (folder / name).write_bytes(_dumps(batch, protocol))
    return batches


@pytest.mark.parametrize(
    ("subdir", "protocol"), [("", 2), ("cifar-10-batches-py", pickle.HIGHEST_PROTOCOL)]
)
def test_cifar10(tmp_path: Path, subdir: str, protocol: int) -> None:
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", protocol)
    train, test = load_dataset("cifar10", str(tmp_path / subdir))
    assert train.x.shape == (10, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.y.tolist() == [
        v for i in range(1, 6) for v in batches[f"data_batch_{i}"][b"labels"]
    ]  # type: ignore[attr-defined]
    raw = batches["test_batch"][b"data"].reshape(3, 3, 32, 32)  # type: ignore[attr-defined]
    np.testing.assert_allclose(_pixels(test.x, *CIFAR10_STATS), raw, atol=1e-3)


def test_cifar100_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_batch = {**_batch(4, b"fine_labels", 100, 0), b"coarse_labels": [0, 1, 2, 3]}
    (folder / "train").write_bytes(_dumps(train_batch, 2))
    (folder / "test").write_bytes(pickle.dumps(_batch(2, b"fine_labels", 100, 1)))
    train, test = load_dataset("cifar100", str(tmp_path))
    assert train.num_classes == 100 and train.input_shape == (3, 32, 32) and len(test) == 2
    assert train.y.tolist() == train_batch[b"fine_labels"]


def test_cifar_missing_file(tmp_path: Path) -> None:
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_3 .*cs\.toronto\.edu"):
        load_dataset("cifar10", str(tmp_path))


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("a pickle ran code",))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            pickle.dumps({b"data": _Payload(), b"labels": []}),
            "refusing to load global builtins.print",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8)}),
            "expected a dict with keys b'data' and b'labels'",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 10), np.uint8), b"labels": [0]}),
            r"must be uint8 \[N, 3072\]",
        ),
        (
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}),
            r"labels must lie in 0\.\.9",
        ),
        (pickle.dumps(_batch(2, b"labels", 10, 0))[:-40], "cannot read"),
    ],
    ids=["code", "no-labels", "bad-shape", "bad-label", "truncated"],
)
def test_cifar_corrupt_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes, reason: str
) -> None:
    _write_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match=reason) as err:
        load_dataset("cifar10", str(tmp_path))
    assert "test_batch" in str(err.value)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------- SVHN (.mat)


def _write_svhn(folder: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    files = {
        "train": rng.integers(0, 256, (32, 32, 3, 3), dtype=np.uint8),
        "test": np.zeros((32, 32, 3, 2), np.uint8),
    }
    labels = {
        "train": np.array([[10], [1], [7]], np.uint8),
        "test": np.array([[2], [10]], np.uint8),
    }
    for split in files:
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": files[split], "y": labels[split]})
    return files


def test_svhn(tmp_path: Path) -> None:
    raw = _write_svhn(tmp_path)
    train, test = load_dataset("svhn", str(tmp_path))
    assert (
        train.x.shape == (3, 3, 32, 32)
        and train.y.tolist() == [0, 1, 7]
        and test.y.tolist() == [2, 0]
    )
    stats = ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))
    np.testing.assert_allclose(
        _pixels(train.x, *stats), raw["train"].transpose(3, 2, 0, 1), atol=1e-3
    )


def test_svhn_errors(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"missing train_32x32\.mat, test_32x32\.mat .*ufldl\.stanford\.edu"
    ):
        load_dataset("svhn", str(tmp_path))
    _write_svhn(tmp_path)
    test_file = tmp_path / "test_32x32.mat"
    test_file.write_bytes(test_file.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cannot read .*test_32x32\.mat"):
        load_dataset("svhn", str(tmp_path))
    scipy.io.savemat(test_file, {"images": np.zeros((32, 32, 3, 1), np.uint8)})
    with pytest.raises(DataError, match=r"expected variables 'X' and 'y', found \['images'\]"):
        load_dataset("svhn", str(tmp_path))


# ---------------------------------------------------------------- GTSRB (ppm + csv)

HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
BLUE = (0, 0, 255)


def _sign(path: Path) -> None:
    """A 40x36 red image whose ROI (5, 5)-(35, 31) is solid blue."""
    image = np.zeros((36, 40, 3), np.uint8)
    image[..., 0] = 255
    image[5:31, 5:35] = BLUE
    Image.fromarray(image).save(path)


def _write_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    lines = [HEADER] + [f"{name};40;36;5;5;35;31;{label}" for name, label in rows]
    path.write_text("\n".join(lines) + "\n")


def _write_gtsrb(root: Path, test_csv_dir: str = "GTSRB") -> None:
    for label in (0, 2):
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{label:05d}"
        folder.mkdir(parents=True)
        names = [f"00000_{i:05d}.ppm" for i in range(2)]
        for name in names:
            _sign(folder / name)
        _write_csv(folder / f"GT-{label:05d}.csv", [(n, label) for n in names])
    test = root / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    for name in ("00000.ppm", "00001.ppm", "00002.ppm"):
        _sign(test / name)
    _write_csv(
        root / test_csv_dir / "GT-final_test.csv",
        [("00000.ppm", 42), ("00001.ppm", 2), ("00002.ppm", 0)],
    )


@pytest.mark.parametrize("test_csv_dir", ["GTSRB", "GTSRB/Final_Test/Images"])
def test_gtsrb(tmp_path: Path, test_csv_dir: str) -> None:
    _write_gtsrb(tmp_path, test_csv_dir)
    train, test = load_dataset("gtsrb", str(tmp_path))
    assert train.x.shape == (4, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert (
        train.num_classes == 43
        and train.y.tolist() == [0, 0, 2, 2]
        and test.y.tolist() == [42, 2, 0]
    )
    stats = ((0.3337, 0.3064, 0.3171), (0.2672, 0.2564, 0.2629))
    pixels = _pixels(train.x, *stats)  # the ROI crop leaves only blue
    np.testing.assert_allclose(
        pixels,
        np.broadcast_to(np.array(BLUE, np.float32).reshape(1, 3, 1, 1), pixels.shape),
        atol=1e-3,
    )


def test_gtsrb_root_may_be_the_gtsrb_folder(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    train, _ = load_dataset("gtsrb", str(tmp_path / "GTSRB"))
    assert len(train) == 4


def test_gtsrb_missing_folders_and_test_labels(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"no GTSRB/Final_Training/Images .*GTSRB_Final_Training_Images\.zip"
    ):
        load_dataset("gtsrb", str(tmp_path))
    _write_gtsrb(tmp_path)
    (tmp_path / "GTSRB" / "GT-final_test.csv").unlink()
    with pytest.raises(DataError, match=r"GT-final_test\.csv not found.*GTSRB_Final_Test_GT\.zip"):
        load_dataset("gtsrb", str(tmp_path))


def test_gtsrb_bad_annotations_and_images(tmp_path: Path) -> None:
    _write_gtsrb(tmp_path)
    class_csv = tmp_path / "GTSRB" / "Final_Training" / "Images" / "00002" / "GT-00002.csv"
    class_csv.write_text("Filename,ClassId\nx.ppm,2\n")
    with pytest.raises(DataError, match=r"GT-00002\.csv: missing column\(s\) Filename, Roi\.X1"):
        load_dataset("gtsrb", str(tmp_path))
    _write_csv(class_csv, [("00000_00000.ppm", 43)])
    with pytest.raises(
        DataError, match=r"GT-00002\.csv, line 2: ClassId must lie in 0\.\.42, got 43"
    ):
        load_dataset("gtsrb", str(tmp_path))
    _write_csv(class_csv, [("00000_00000.ppm", 2)])
    (class_csv.parent / "00000_00000.ppm").write_bytes(b"P6\n40 36\n255\n" + b"\0" * 10)
    with pytest.raises(DataError, match=r"cannot read GTSRB image .*00000_00000\.ppm"):
        load_dataset("gtsrb", str(tmp_path))
