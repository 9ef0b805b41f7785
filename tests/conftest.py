from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models import build_zoo_model
from search.loading import BaseModel, export_program_bytes, from_module

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def zoo_pt2() -> Callable[[str], bytes]:
    """``.pt2`` bytes of a zoo net (exported once per session)."""
    cache: dict[str, bytes] = {}

    def get(name: str) -> bytes:
        if name not in cache:
            module, shape = build_zoo_model(name)
            cache[name] = export_program_bytes(module, shape)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo_model() -> Callable[[str], BaseModel]:
    cache: dict[str, BaseModel] = {}

    def get(name: str) -> BaseModel:
        if name not in cache:
            module, shape = build_zoo_model(name)
            cache[name] = from_module(module, shape, name=name)
        return cache[name]

    return get


def rewrite_archive(data: bytes, edit: Callable[[dict[str, bytes]], None]) -> bytes:
    """Rebuild a zip after ``edit`` changes its members (a dict of name -> bytes, edited in place)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    members = {i.filename: src.read(i) for i in src.infolist()}
    edit(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for name, body in members.items():
            dst.writestr(name, body)
    return out.getvalue()


def root_of(members: dict[str, bytes]) -> str:
    return next(iter(members)).split("/", 1)[0]


def edit_json(members: dict[str, bytes], rel: str, change: Callable[[dict], None]) -> None:
    name = f"{root_of(members)}/{rel}"
    doc = json.loads(members[name])
    change(doc)
    members[name] = json.dumps(doc).encode()


@pytest.fixture
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (48, 16, 16, 3), generator=gen, dtype=torch.uint8)
