"""vgg_seed and the shared CIFAR-10, as the fixed-plan benchmarks load them: calibration = train_0,
validation = first 5,000 of test.npz (the held-out last 5,000 are never read here)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from search import BaseModel, find_sites, load_pt2
from search.sites import Site

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
SHARED = str(Path(__file__).resolve().parents[2] / "shared")
"""Where ``--shared`` points by default: ``../shared`` beside the checkout."""


@dataclass
class VggData:
    base: BaseModel
    sites: list[Site]
    calib_x: torch.Tensor
    """train_0, normalised NCHW."""
    calib_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def load_vgg(shared: str | Path) -> VggData:
    shared = Path(shared)
    base = load_pt2(shared / "models" / "vgg_seed.pt2", "3,32,32", MEAN, STD)
    train = np.load(shared / "data" / "cifar10" / "train_0.npz")
    test = np.load(shared / "data" / "cifar10" / "test.npz")
    sites, _ = find_sites(base.module, base.input_shape)
    return VggData(
        base, sites,
        base.normalise(torch.from_numpy(train["x"])), torch.from_numpy(train["y"]).long(),
        base.normalise(torch.from_numpy(test["x"][:5000])), torch.from_numpy(test["y"][:5000]).long(),
    )


def parse_and_load(parser: argparse.ArgumentParser, threads: bool = True) -> tuple[argparse.Namespace, VggData]:
    """Add ``--shared`` (and ``--threads``, default 2, set for torch) to ``parser``, parse the
    command line and load the data."""
    parser.add_argument("--shared", default=SHARED)
    if threads:
        parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if threads:
        torch.set_num_threads(args.threads)
    return args, load_vgg(args.shared)
