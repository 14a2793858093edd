"""LightningDataModules for image diffusion: Fashion-MNIST (default), MNIST, CIFAR-10 and any folder of images.

Every data module yields batches ``(images, labels)``: float32 images ``(B, C, H, W)`` in ``[-1, 1]`` and int64
labels (zeros for unlabelled data). Missing data raises :class:`DatasetNotFoundError` from ``prepare_data()``.
"""

from .base import OFFLINE_ENV_VAR, ImageDataModule, TensorImageDataset
from .cifar import CIFAR10DataModule, load_cifar_pickle, read_cifar_batch
from .errors import DatasetCorruptError, DatasetError, DatasetNotFoundError
from .folder import IMAGE_EXTENSIONS, ImageFileDataset, ImageFolderDataModule, list_images
from .idx import read_idx
from .mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = [
    "CIFAR10DataModule",
    "DatasetCorruptError",
    "DatasetError",
    "DatasetNotFoundError",
    "FashionMNISTDataModule",
    "IMAGE_EXTENSIONS",
    "ImageDataModule",
    "ImageFileDataset",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "OFFLINE_ENV_VAR",
    "TensorImageDataset",
    "list_images",
    "load_cifar_pickle",
    "read_cifar_batch",
    "read_idx",
]
