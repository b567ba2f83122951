from __future__ import annotations

import hashlib

import numpy as np

from roadwork.config import SplitConfig
from roadwork.data.splits import SPLITS, assign_splits


def _hashes(n: int, start: int = 0) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n)]


def test_a_file_keeps_its_split_when_files_are_added():
    cfg = SplitConfig()
    before = assign_splits(_hashes(1000), cfg)
    after = assign_splits(_hashes(1000) + _hashes(500, start=5000), cfg)
    assert after[:1000] == before


def test_proportions_match_per_class_within_binomial_noise():
    cfg = SplitConfig(train=0.5, val=0.1, calib=0.2, test=0.2)
    for cls_offset in (0, 10**6):  # two "classes" with disjoint hashes
        n = 4000
        got = np.array(assign_splits(_hashes(n, cls_offset), cfg))
        for split, frac in zip(SPLITS, (0.5, 0.1, 0.2, 0.2), strict=True):
            share = float((got == split).mean())
            assert abs(share - frac) < 4 * np.sqrt(frac * (1 - frac) / n), (split, share)


def test_salt_reshuffles():
    h = _hashes(500)
    assert assign_splits(h, SplitConfig(salt="a")) != assign_splits(h, SplitConfig(salt="b"))
