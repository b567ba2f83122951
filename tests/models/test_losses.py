"""The Gatekeeper loss: its value by hand, and what its gradient does to right and wrong answers."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from roadwork.models.losses import gatekeeper_loss  # noqa: E402


def test_value_matches_the_formula() -> None:
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0]])
    y = torch.tensor([0, 0, 1])  # row 0 right, rows 1 and 2 wrong
    p = torch.softmax(z, 1)
    ce0 = -math.log(p[0, 0])
    kl = [float((p[i] * p[i].log()).sum()) + math.log(2) for i in (1, 2)]
    want = (0.3 * ce0 + 0.7 * (kl[0] + kl[1])) / 3
    assert float(gatekeeper_loss(z, y, 0.3)) == pytest.approx(want, rel=1e-6)
    assert float(gatekeeper_loss(z, y, 1.0)) == pytest.approx(ce0 / 3, rel=1e-6)


def test_gradient_sharpens_right_answers_and_flattens_wrong_ones() -> None:
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    y = torch.tensor([0, 0])  # row 0 right (margin 1), row 1 wrong (confidently)
    gatekeeper_loss(z, y, 0.5).backward()
    step = -z.grad  # gradient descent direction
    assert step[0, 0] > 0 > step[0, 1]  # the right answer's margin grows
    assert step[1, 1] < 0 < step[1, 0]  # the wrong answer moves towards uniform
