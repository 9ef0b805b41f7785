"""Image sets for calibration, validation and held-out scoring: ``.npz`` with uint8 NHWC ``x``, optional ``y``."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search.errors import InvalidInputError

MAX_NPZ_BYTES = 2 << 30


@dataclass
class ImageSet:
    """uint8 images ``(N, H, W, C)`` and optional integer labels ``(N,)``."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    name: str = "data"

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def has_labels(self) -> bool:
        return self.y is not None

    def head(self, n: int) -> ImageSet:
        return ImageSet(self.x[:n], None if self.y is None else self.y[:n], self.name)


def load_npz(path: str | os.PathLike[str], max_bytes: int = MAX_NPZ_BYTES) -> ImageSet:
    """Read an ``.npz`` of images without unpickling anything (``allow_pickle=False``).

    Raises:
        InvalidInputError: missing file, not an npz, wrong dtype or shape, labels that do not match.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(i.file_size for i in archive.infolist())
    except zipfile.BadZipFile:
        raise InvalidInputError(f"{path.name}: not an .npz file") from None
    if expanded > max_bytes:
        raise InvalidInputError(f"{path.name}: expands to {expanded} bytes, more than {max_bytes}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise InvalidInputError(f"{path.name}: needs an array 'x' (uint8 images N,H,W,C)")
            x = data["x"]
            y = data["y"] if "y" in data.files else None
    except InvalidInputError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidInputError(f"{path.name}: cannot read arrays: {exc}") from None
    return make_image_set(x, y, path.stem)


def make_image_set(x: np.ndarray, y: np.ndarray | None, name: str = "data") -> ImageSet:
    """Check arrays and wrap them (see ``load_npz``)."""
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[0] < 1 or x.shape[3] not in (1, 3, 4):
        raise InvalidInputError(
            f"{name}: 'x' must be uint8 images (N,H,W,C) with C in 1,3,4; got {x.dtype} {x.shape}"
        )
    labels = None
    if y is not None:
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            raise InvalidInputError(f"{name}: 'y' must be N integer labels; got {y.dtype} {y.shape}")
        if y.size and (y.min() < 0 or y.max() > 100_000):
            raise InvalidInputError(f"{name}: labels must be class ids >= 0")
        labels = torch.from_numpy(y.astype(np.int64))
    return ImageSet(torch.from_numpy(np.ascontiguousarray(x)), labels, name)


def check_fits(images: ImageSet, input_shape: tuple[int, int, int]) -> None:
    """Refuse images whose size or channels do not match the model's input."""
    c, h, w = input_shape
    if tuple(images.x.shape[1:]) != (h, w, c):
        raise InvalidInputError(
            f"{images.name}: images are {tuple(images.x.shape[1:])} (H,W,C) but the model takes {(h, w, c)}"
        )
