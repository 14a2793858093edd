"""A small reader for the IDX format of MNIST / Fashion-MNIST (``*-ubyte`` and ``*-ubyte.gz`` files).

Layout (all integers big-endian): two zero bytes, one byte with the element type (0x08 = uint8, ...), one byte with
the number of dimensions ``n``, then ``n`` uint32 sizes, then the data in C order. Image files therefore start with
the magic number 2051 (``00 00 08 03``) and label files with 2049 (``00 00 08 01``).
"""

from __future__ import annotations

import gzip
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetCorruptError

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _parse_header(path: Path, head: bytes, expected_magic: int | None) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(head) < 4:
        raise DatasetCorruptError(path, f"file too short ({len(head)} bytes) for an IDX header")
    (magic,) = struct.unpack(">I", head[:4])
    if expected_magic is not None and magic != expected_magic:
        raise DatasetCorruptError(path, f"bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES:
        raise DatasetCorruptError(path, f"bad IDX magic number 0x{magic:08x}")
    ndim = head[3]
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DatasetCorruptError(path, "file too short for its IDX header")
    shape = struct.unpack(f">{ndim}I", head[4:header_len])
    return _IDX_DTYPES[head[2]], tuple(shape), header_len


def check_idx_header(path: str | Path, expected_magic: int | None = None) -> tuple[int, ...]:
    """Read only the header of an IDX file (cheap) and return the array shape; raises DatasetCorruptError."""
    path = Path(path)
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * 255)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetCorruptError(path, f"cannot read it ({e})") from e
    return _parse_header(path, head, expected_magic)[1]


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read a whole IDX file (gzip-compressed if it ends with ``.gz``) into a numpy array in native byte order.

    Raises :class:`DatasetCorruptError` on a bad magic number, a truncated file or an unreadable gzip stream.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetCorruptError(path, f"cannot read it ({e})") from e
    dtype, shape, header_len = _parse_header(path, raw[: 4 + 4 * 255], expected_magic)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_len != expected:
        raise DatasetCorruptError(
            path, f"header says shape {shape} ({expected} data bytes) but the file holds {len(raw) - header_len}"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=False)


@lru_cache(maxsize=8)
def _read_idx_tensor_cached(path: str, expected_magic: int | None, _mtime_ns: int, _size: int) -> torch.Tensor:
    arr = read_idx(path, expected_magic)
    return torch.from_numpy(np.array(arr, copy=True))


def read_idx_tensor(path: str | Path, expected_magic: int | None = None) -> torch.Tensor:
    """:func:`read_idx` as a torch tensor, cached by (path, mtime, size): treat the result as read-only."""
    st = Path(path).stat()
    return _read_idx_tensor_cached(str(Path(path).resolve()), expected_magic, st.st_mtime_ns, st.st_size)
