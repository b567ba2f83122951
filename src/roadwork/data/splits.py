"""Stable, stratified-in-expectation splits keyed on content hashes.

A file's split is a pure function of ``(salt, sha256 of its bytes)``: it keeps its split across runs,
renames and additions of other files, and exact duplicates always land in the same split (no leakage
between train and test). Within each class the hash is uniform, so every class is split in the
configured proportions up to binomial noise; a strict per-class rank split would move files between
splits whenever a file is added, which is worse for a calibration split that must stay unseen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from roadwork.config import SplitConfig

__all__ = ["SPLITS", "assign_splits", "split_uniform"]

SPLITS = ("train", "val", "calib", "test")
"""The four splits, in the order of their fractions."""


def split_uniform(sha256s: Sequence[str], salt: str) -> np.ndarray:
    """Map each content hash to a uniform number in [0, 1) that depends only on ``(salt, hash)``."""
    out = np.empty(len(sha256s), dtype=np.float64)
    for i, h in enumerate(sha256s):
        d = hashlib.blake2b(f"{salt}:{h}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(d, "big") / 2.0**64
    return out


def assign_splits(sha256s: Sequence[str], cfg: SplitConfig) -> list[str]:
    """The split of every image, from its sha256 and ``cfg.salt``: stable when images are added."""
    u = split_uniform(sha256s, cfg.salt)
    edges = np.cumsum([cfg.train, cfg.val, cfg.calib])
    idx = np.searchsorted(edges, u, side="right")
    return [SPLITS[i] for i in idx]
