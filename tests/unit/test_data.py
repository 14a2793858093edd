"""Tests of the data modules. Nothing here downloads anything (download=False everywhere)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lightning.data import (
    CIFAR10DataModule,
    DatasetCorruptError,
    DatasetError,
    DatasetNotFoundError,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageFolderDataModule,
    MNISTDataModule,
    read_cifar_batch,
    read_idx,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


def to_float(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float32)) / 127.5 - 1


# ---------------------------------------------------------------------------------------------------- Fashion-MNIST
@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        root=str(tmp_path_factory.mktemp("empty_root")), batch_size=64, num_workers=0, download=False
    )
    dm.prepare_data()
    dm.setup("fit")
    return dm


@needs_fmnist
def test_fashion_mnist_from_debian_package(fmnist):
    assert isinstance(fmnist, ImageDataModule)
    assert fmnist.channels == 1 and fmnist.num_classes == 10 and len(fmnist.class_names) == 10
    assert fmnist.image_size == 32
    assert len(fmnist.dataset("train")) == 60000
    assert len(fmnist.dataset("test")) == 10000
    assert len(fmnist.val_dataloader().dataset) == 1000
    assert len(fmnist.test_dataloader().dataset) == 10000
    assert fmnist.hparams["resize"] == "pad"

    images, labels = next(iter(fmnist.train_dataloader()))
    assert images.shape == (64, 1, 32, 32) and images.dtype == torch.float32
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    for border in (images[..., :2, :], images[..., -2:, :], images[..., :, :2], images[..., :, -2:]):
        assert torch.all(border == -1.0)
    assert labels.dtype == torch.int64 and labels.shape == (64,)
    all_labels = fmnist.dataset("test").labels
    assert all_labels.min() == 0 and all_labels.max() == 9 and len(all_labels.unique()) == 10

    # padding keeps the original pixels: compare with the raw IDX file
    raw = read_idx(FMNIST_DIR / "t10k-images-idx3-ubyte.gz", 0x803)
    image, label = fmnist.dataset("test")[3]
    torch.testing.assert_close(image[0, 2:30, 2:30], to_float(raw[3]))
    assert label.item() == int(read_idx(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", 0x801)[3])


@needs_fmnist
def test_fashion_mnist_resize_mode(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path), resize="resize", batch_size=16, num_workers=0, download=False)
    images, labels = next(iter(dm.test_dataloader()))  # setup() is called lazily
    assert images.shape == (16, 1, 32, 32)
    assert images.min() >= -1.0 and images.max() <= 1.0
    dm28 = FashionMNISTDataModule(root=str(tmp_path), image_size=28, batch_size=16, num_workers=0, download=False)
    assert next(iter(dm28.test_dataloader()))[0].shape == (16, 1, 28, 28)


# ---------------------------------------------------------------------------------------------------- IDX / MNIST
def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(raw: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict[str, np.ndarray]:
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        ext = ".gz" if gz else ""
        write_idx(raw / f"{prefix}-images-idx3-ubyte{ext}", images, 0x803)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{ext}", labels, 0x801)
        data[prefix] = images
    return data


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_root_raw(tmp_path, gz):
    data = write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    dm = MNISTDataModule(root=str(tmp_path), batch_size=2, num_workers=0, download=False, image_size=28)
    dm.prepare_data()
    assert len(dm.dataset("train")) == 6 and len(dm.dataset("test")) == 4
    image, label = dm.dataset("test")[1]
    assert image.shape == (1, 28, 28)
    torch.testing.assert_close(image[0], to_float(data["t10k"][1]))
    assert label.item() == 1 and label.dtype == torch.int64


def test_corrupt_idx_bad_magic(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    write_mnist(raw)
    write_idx(raw / "train-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8), 0x1234)
    dm = MNISTDataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(DatasetCorruptError, match=r"train-images-idx3-ubyte\.gz.*magic") as info:
        dm.prepare_data()
    assert isinstance(info.value, DatasetError)


def test_corrupt_idx_truncated(tmp_path):
    path = tmp_path / "t.gz"
    write_idx(path, np.zeros((6, 28, 28), np.uint8), 0x803)
    with gzip.open(path, "rb") as f:
        payload = f.read()
    with gzip.open(path, "wb") as f:
        f.write(payload[:-100])
    with pytest.raises(DatasetCorruptError, match="header says shape"):
        read_idx(path, 0x803)
    path.write_bytes(b"this is not gzip at all")
    with pytest.raises(DatasetCorruptError, match="cannot read"):
        read_idx(path)


def test_mnist_missing_without_download(tmp_path):
    dm = MNISTDataModule(root=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg
    assert "torchvision.datasets.MNIST(" in msg and "download=True" in msg
    assert "\n" not in msg
    with pytest.raises(DatasetNotFoundError):
        dm.setup()


def test_fashion_mnist_missing_message_names_apt(tmp_path, monkeypatch):
    dm = FashionMNISTDataModule(root=str(tmp_path), download=False)
    monkeypatch.setattr(dm, "system_dirs", (str(tmp_path / "no_debian"),))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "sudo apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "no_debian") in msg and str(tmp_path / "FashionMNIST" / "raw") in msg


def test_failed_download_becomes_dataset_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFUSION_LIGHTNING_OFFLINE", raising=False)  # conftest sets it for the other tests
    dm = MNISTDataModule(root=str(tmp_path), download=True)

    def offline():
        raise URLError("no network")

    monkeypatch.setattr(dm, "_download", offline)
    with pytest.raises(DatasetNotFoundError, match="download failed: URLError"):
        dm.prepare_data()
    monkeypatch.setenv("DIFFUSION_LIGHTNING_OFFLINE", "1")
    with pytest.raises(DatasetNotFoundError, match="download disabled"):
        dm.prepare_data()


def test_dataset_not_found_error_is_picklable_file_not_found():
    err = DatasetNotFoundError("X", ["/a/"], ["cmd"], "why", "hint")
    assert isinstance(err, FileNotFoundError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.paths == ["/a/"]


# ---------------------------------------------------------------------------------------------------- CIFAR-10
def cifar_image(seed: int) -> np.ndarray:
    """A (3, 32, 32) uint8 image, asymmetric left/right so a flip is detectable."""
    img = np.random.default_rng(seed).integers(0, 256, size=(3, 32, 32), dtype=np.uint8)
    img[:, :, 0] = 0
    img[:, :, -1] = 255
    return img


def write_cifar(root: Path, per_batch: int = 3, n_test: int = 4, str_keys: bool = False) -> dict:
    """CIFAR-10 python-format fixture: 5 data batches, test_batch and batches.meta in root/cifar-10-batches-py."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def key(k: str):
        return k if str_keys else k.encode()

    images = {"train": [], "test": []}
    labels = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    seed = 0
    for name in names:
        split = "test" if name == "test_batch" else "train"
        n = n_test if split == "test" else per_batch
        batch_images = [cifar_image(seed + j) for j in range(n)]
        batch_labels = [(seed + j) % 10 for j in range(n)]
        seed += n
        if name == "test_batch":
            batch_images[0][:, 0, 1] = (10, 20, 30)  # known RGB pixel at row 0, column 1
        data = np.stack([im.reshape(-1) for im in batch_images])  # (n, 3072): R plane, G plane, B plane
        batch = {key("batch_label"): key(name), key("labels"): batch_labels, key("data"): data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        images[split] += batch_images
        labels[split] += batch_labels
    meta = {key("label_names"): [key(c) for c in "abcdefghij"], key("num_vis"): 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return {"images": images, "labels": labels}


def test_cifar10_fixture_loads(tmp_path):
    fixture = write_cifar(tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4, num_workers=0, download=False, val_samples=2)
    assert dm.random_flip and dm.channels == 3 and dm.num_classes == 10
    dm.prepare_data()
    dm.setup("fit")
    assert dm.class_names == list("abcdefghij")
    assert len(dm.dataset("train")) == 15 and len(dm.dataset("test")) == 4
    assert len(dm.val_dataloader().dataset) == 2
    assert len(dm.train_dataloader()) == 3  # 15 // 4, last incomplete batch dropped

    test = dm.dataset("test")
    image, label = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    torch.testing.assert_close(image[:, 0, 1], torch.tensor([10, 20, 30]) / 127.5 - 1)  # RGB order
    assert image[0, 0, 1].item() == pytest.approx(10 / 127.5 - 1)
    for i in range(4):
        img, lab = test[i]
        torch.testing.assert_close(img, to_float(fixture["images"]["test"][i]))
        assert lab.item() == fixture["labels"]["test"][i]
    for i in (0, 7, 14):
        img, lab = dm.dataset("train")[i]
        torch.testing.assert_close(img, to_float(fixture["images"]["train"][i]))
        assert lab.item() == fixture["labels"]["train"][i]

    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert labels.tolist() == fixture["labels"]["test"]


def _training(dm, global_rank: int = 0, num_training_batches: int = 1):
    """Attach a stand-in for the Trainer attributes the data module reads while training."""
    dm.trainer = SimpleNamespace(training=True, world_size=1, global_rank=global_rank,
                                 num_training_batches=num_training_batches)
    return dm


def test_cifar10_flip_only_on_train(tmp_path):
    fixture = write_cifar(tmp_path, per_batch=1, n_test=2)
    dm = _training(CIFAR10DataModule(root=str(tmp_path), batch_size=5, num_workers=0, download=False))
    originals = torch.stack([to_float(im) for im in fixture["images"]["train"]])
    loader = dm.train_dataloader()
    flips = []
    for epoch in range(4):
        dm._sampler.set_epoch(epoch)
        images, labels = dm.on_after_batch_transfer(next(iter(loader)), 0)
        for img, lab in zip(images, labels, strict=True):
            match = originals[int(lab)]  # labels of this fixture are 0..4 == index
            flips.append(not torch.equal(img, match))
            assert torch.equal(img, match.flip(-1) if flips[-1] else match)
    assert any(flips) and not all(flips)
    # the flips are a function of (seed, epoch, batch): another module with the same seed repeats them
    batch = next(iter(loader))

    def flipped(seed: int) -> list[torch.Tensor]:
        other = _training(CIFAR10DataModule(root=str(tmp_path), batch_size=5, num_workers=0, download=False,
                                            seed=seed))
        other.train_dataloader()
        return [other.on_after_batch_transfer(batch, 0)[0] for _ in range(4)]

    same, other_seed = flipped(0), flipped(1)
    assert all(torch.equal(a, b) for a, b in zip(same, flipped(0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(same, other_seed, strict=True))
    dm.trainer.training = False  # validation batches pass through unchanged
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        for _ in range(3):
            images, _ = dm.on_after_batch_transfer(next(iter(loader)), 0)
            torch.testing.assert_close(images, torch.stack([to_float(im) for im in fixture["images"]["test"]]))
    for i in range(5):  # dataset("train") is the unaugmented view for evaluation code
        torch.testing.assert_close(dm.dataset("train")[i][0], originals[i])

    no_flip = _training(CIFAR10DataModule(root=str(tmp_path), batch_size=5, num_workers=0, download=False,
                                          random_flip=False))
    images, labels = no_flip.on_after_batch_transfer(next(iter(no_flip.train_dataloader())), 0)
    for img, lab in zip(images, labels, strict=True):
        assert torch.equal(img, originals[int(lab)])  # labels of this fixture are 0..4 == index


def test_cifar10_str_keys_and_workers(tmp_path):
    """Python-2 style pickles load with str keys; the loaders work with worker processes."""
    fixture = write_cifar(tmp_path, str_keys=True)
    images, labels = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_2")
    assert images.shape == (3, 3, 32, 32) and images.dtype == np.uint8 and labels.dtype == np.int64
    np.testing.assert_array_equal(images[1], fixture["images"]["train"][4])
    dm = CIFAR10DataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=2, download=False)
    batches = list(dm.train_dataloader())
    assert len(batches) == 3 and batches[0][0].shape == (4, 3, 16, 16)


def py2_cifar_pickle(image: np.ndarray, label: int) -> bytes:
    """The bytes Python 2 + numpy 1.x write for {'data': uint8 (1, 3072) array, 'labels': [label]} (protocol 2)."""
    raw = image.reshape(-1).tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
        b"(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
        b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<I", len(raw)) + raw + b"tb"
    )
    return b"\x80\x02}(U\x04data" + array + b"U\x06labels]K" + bytes([label]) + b"au."


def test_cifar_reader_python2_pickle(tmp_path):
    """The official files are Python 2 pickles (py2 str = bytes): they need encoding="latin1"."""
    image = cifar_image(3)
    path = tmp_path / "data_batch_1"
    path.write_bytes(py2_cifar_pickle(image, 7))
    images, labels = read_cifar_batch(path)
    np.testing.assert_array_equal(images[0], image)
    assert labels.tolist() == [7]


def test_cifar10_missing_raises_with_path_and_command(tmp_path):
    dm = CIFAR10DataModule(root=str(tmp_path / "data"), download=False)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py") in msg
    assert "torchvision.datasets.CIFAR10(" in msg and "cifar-10-python.tar.gz" in msg
    with pytest.raises(FileNotFoundError):
        dm.setup()


def test_cifar10_rejects_foreign_pickle(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Path("x"), b"labels": []}, f)  # a global that is not a numpy array
    dm = CIFAR10DataModule(root=str(tmp_path), num_workers=0, download=False)
    with pytest.raises(DatasetCorruptError, match="data_batch_3"):
        dm.setup()


# ---------------------------------------------------------------------------------------------------- image folder
def write_images(folder: Path, n: int = 10) -> None:
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        w, h = 20 + 3 * i, 24 + 2 * (i % 3)
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:, : w // 3] = (255, 0, 0)
        arr[:, w // 3 : 2 * w // 3] = (0, 255, 0)
        arr[:, 2 * w // 3 :] = (0, 0, 255)
        target = folder / "sub" / f"img{i}.jpg" if i == 0 else folder / f"img{i}.png"
        Image.fromarray(arr).save(target)
    (folder / "notes.txt").write_text("not an image")


def test_image_folder_random_split(tmp_path):
    write_images(tmp_path / "imgs")
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=16, batch_size=3, num_workers=0)
    dm.prepare_data()
    dm.setup()
    train, test = dm.dataset("train"), dm.dataset("test")
    assert len(train) == 9 and len(test) == 1 and dm.num_classes is None and dm.channels == 3
    assert not set(train.files) & set(test.files)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert labels.dtype == torch.int64 and torch.all(labels == 0)
    image = test[0][0]
    torch.testing.assert_close(image[:, 8, 8], torch.tensor([-1.0, 1.0, -1.0]), atol=0.05, rtol=0)  # green center
    # the split is reproducible
    again = ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=16, num_workers=0)
    assert again.dataset("test").files == test.files


def test_image_folder_grayscale_and_separate_dirs(tmp_path):
    write_images(tmp_path / "train", n=4)
    write_images(tmp_path / "test", n=2)
    dm = ImageFolderDataModule(
        root=str(tmp_path), train_dir="train", test_dir="test", image_size=8, channels=1, batch_size=2, num_workers=0
    )
    assert len(dm.dataset("train")) == 4 and len(dm.dataset("test")) == 2
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 1, 8, 8)


def test_image_folder_empty_or_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetNotFoundError, match="holds no images") as info:
        ImageFolderDataModule(root=str(tmp_path / "empty")).prepare_data()
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing")).setup()


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch_and_splits_across_ranks():
    from diffusion_lightning.data.base import EpochSampler

    data = list(range(23))
    one = EpochSampler(data, seed=3)
    epoch0 = list(one)
    torch.manual_seed(0)
    assert list(EpochSampler(data, seed=3)) == epoch0  # torch's global generator plays no part
    torch.manual_seed(1)
    assert list(EpochSampler(data, seed=3)) == epoch0
    assert sorted(epoch0) == data and epoch0 != data
    one.set_epoch(1)
    assert list(one) != epoch0 and list(one) == list(EpochSampler(data, seed=3, epoch=1))
    assert list(EpochSampler(data, seed=4)) != epoch0

    ranks = [list(EpochSampler(data, num_replicas=3, rank=r, seed=3)) for r in range(3)]
    assert all(len(r) == 7 for r in ranks)  # 23 // 3: the tail is dropped so ranks stay in step
    assert len(set().union(*ranks)) == 21
    # with batches: rank r's i-th batch is the r-th part of the i-th batch of one process with the global batch
    one_process = list(EpochSampler(data, seed=3, batch_size=6))
    assert len(one_process) == 18  # 3 whole global batches of 6
    ranks = [list(EpochSampler(data, num_replicas=3, rank=r, seed=3, batch_size=2)) for r in range(3)]
    for i in range(3):
        assert sum((r[2 * i : 2 * i + 2] for r in ranks), []) == one_process[6 * i : 6 * i + 6]

    resumed = EpochSampler(data, seed=3)
    resumed.skip = 8
    assert list(resumed) == epoch0[8:]  # a resumed epoch continues where it stopped ...
    assert list(resumed) == epoch0  # ... once: the next pass is whole again
    assert len(resumed) == 23  # the loader's length (batches per epoch) does not change
