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


def test_deferral_loss_is_the_negative_log_of_the_system_being_right() -> None:
    from roadwork.models.losses import deferral_loss

    out = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -2.0]])  # two class logits and a gate logit per row
    y = torch.tensor([0, 0])
    p_large = torch.tensor([0.9, 0.6])
    g = torch.sigmoid(out[:, 2])
    ps = torch.softmax(out[:, :2], 1)[torch.arange(2), y]
    system = -torch.log(g * ps + (1 - g) * p_large)
    want = (system + 0.3 * (1 - g) - 0.5 * torch.log(ps)).mean()
    got = deferral_loss(out, y, p_large, cost=0.3, aux_weight=0.5)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_deferral_gate_learns_to_answer_where_the_small_model_is_right() -> None:
    """Row 0: the small model is right and sure; row 1: it is wrong and the large model is right. Gradient
    descent on the gate alone must open it for row 0 and close it for row 1."""
    from roadwork.models.losses import deferral_loss

    gate = torch.zeros(2, requires_grad=True)
    cls = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    y = torch.tensor([0, 1])
    opt = torch.optim.SGD([gate], lr=1.0)
    for _ in range(500):
        opt.zero_grad()
        deferral_loss(torch.cat([cls, gate[:, None]], 1), y, torch.tensor([0.95, 0.95]), cost=0.05).backward()
        opt.step()
    g = torch.sigmoid(gate)
    assert g[0] > 0.85 and g[1] < 0.1
