"""Datasets from uploads: a checked ``.npz``, or a zip of class folders of PNG/JPEG turned into one.

Runs inside the sandbox (it decodes untrusted images). Nothing is extracted to disk: members are
read in memory after their declared and actual sizes are checked.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from search.data import load_npz
from search.errors import InvalidInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MAX_RATIO = 200
"""Largest accepted expansion of one zip member (a zip bomb expands thousands of times)."""
MAX_SIDE = 4096


def _members(archive: zipfile.ZipFile, max_expanded: int) -> list[zipfile.ZipInfo]:
    infos = archive.infolist()
    total = 0
    for info in infos:
        name = PurePosixPath(info.filename)
        if info.filename.startswith("/") or ".." in name.parts or "\\" in info.filename or ":" in info.filename:
            raise InvalidInputError(f"zip entry {info.filename!r} has an absolute path or '..': refused")
        total += info.file_size
        if total > max_expanded:
            raise InvalidInputError(f"the archive expands to more than {max_expanded} bytes: refused (zip bomb?)")
        if info.compress_size and info.file_size / info.compress_size > MAX_RATIO and info.file_size > 1 << 20:
            raise InvalidInputError(f"zip entry {info.filename!r} expands {info.file_size // info.compress_size}x: "
                                    "refused (zip bomb?)")
    return infos


def convert_dataset(path: Path, out: Path, max_expanded: int, max_images: int) -> dict[str, Any]:
    """Check an uploaded dataset and describe it; a zip of class folders is written to ``out`` as ``.npz``.

    Returns:
        ``{"format", "count", "shape" (H, W, C), "has_labels", "classes", "converted"}``.
    """
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InvalidInputError("not an .npz file or a zip of class folders of PNG/JPEG images") from None
    with archive:
        infos = _members(archive, max_expanded)
        files = [i for i in infos if not i.is_dir()]
        if files and all(i.filename.endswith(".npy") for i in files):
            images = load_npz(path, max_expanded)
            if len(images) > max_images:
                raise InvalidInputError(f"{len(images)} images, more than the limit of {max_images}")
            return {"format": "npz", "count": len(images), "shape": list(images.x.shape[1:]),
                    "has_labels": images.has_labels, "classes": None, "converted": False}
        return _class_folders(archive, files, out, max_images)


def _class_folders(archive: zipfile.ZipFile, files: list[zipfile.ZipInfo], out: Path, max_images: int) -> dict[str, Any]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_SIDE * MAX_SIDE
    entries: list[tuple[str, zipfile.ZipInfo]] = []
    for info in files:
        parts = PurePosixPath(info.filename).parts
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        if PurePosixPath(info.filename).suffix.lower() not in IMAGE_SUFFIXES:
            raise InvalidInputError(f"zip entry {info.filename!r} is not a .png/.jpg/.jpeg image")
        if len(parts) < 2:
            raise InvalidInputError(f"zip entry {info.filename!r} is not inside a class folder (class/image.png)")
        entries.append((parts[-2], info))
    if not entries:
        raise InvalidInputError("the zip holds no images (expected class folders of PNG/JPEG files)")
    if len(entries) > max_images:
        raise InvalidInputError(f"{len(entries)} images, more than the limit of {max_images}")
    classes = sorted({c for c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    xs, ys = [], []
    shape: tuple[int, ...] | None = None
    for cls, info in sorted(entries, key=lambda e: e[1].filename):
        data = archive.read(info)
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in ("PNG", "JPEG"):
                    raise InvalidInputError(f"{info.filename!r} is {img.format}, not PNG or JPEG")
                arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
        except InvalidInputError:
            raise
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad bytes
            raise InvalidInputError(f"{info.filename!r} is not a readable image ({type(exc).__name__})") from None
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise InvalidInputError(f"mixed image sizes: {info.filename!r} is {arr.shape[1]}x{arr.shape[0]}, "
                                    f"the first image was {shape[1]}x{shape[0]}; resize them to one size")
        xs.append(arr)
        ys.append(index[cls])
    np.savez(out, x=np.stack(xs), y=np.asarray(ys, dtype=np.int64))
    assert shape is not None
    return {"format": "zip", "count": len(xs), "shape": list(shape), "has_labels": True, "classes": classes,
            "converted": True}
