"""Tests for covidct.segmentation.losses.FocalTverskyLoss against hand-computed values.

Convention under test (the paper's, not MONAI's): alpha weights false NEGATIVES, beta false
positives; TI = (TP + s) / (TP + alpha FN + beta FP + s) with s = 1e-5; loss = (1 - TI) ** (1/gamma)
per image, then the mean over the batch.
"""

from __future__ import annotations

import math

import pytest
import torch

from covidct.segmentation.losses import FocalTverskyLoss

BIG = 30.0  # sigmoid(+-30) is 1 / 0 to float32 precision
SMOOTH = 1e-5


def _ftl(tp: float, fn: float, fp: float, alpha: float, beta: float, gamma: float) -> float:
    ti = (tp + SMOOTH) / (tp + alpha * fn + beta * fp + SMOOTH)
    return max(1.0 - ti, 1e-7) ** (1.0 / gamma)


def _t(rows: list[list[float]]) -> torch.Tensor:
    """One image, one channel: (1, 1, H, W)."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def test_hand_computed_hard_probabilities() -> None:
    # p = [[1, 0], [0, 1]], g = [[1, 1], [1, 0]]  ->  TP = 1, FN = 2, FP = 1
    logits = _t([[BIG, -BIG], [-BIG, BIG]])
    target = _t([[1, 1], [1, 0]])
    loss = FocalTverskyLoss(alpha=0.7, beta=0.3, gamma=1.3)(logits, target).item()
    # TI = 1 / (1 + 1.4 + 0.3) = 1 / 2.7; loss = (1.7 / 2.7) ** (1 / 1.3)
    expected = (1.7 / 2.7) ** (1 / 1.3)
    assert expected == pytest.approx(_ftl(1, 2, 1, 0.7, 0.3, 1.3), abs=1e-5)
    assert loss == pytest.approx(expected, abs=1e-4)
    assert loss == pytest.approx(0.70057, abs=1e-4)


def test_hand_computed_with_half_probability() -> None:
    # logit 0 -> p = 0.5. p = [[1, 0.5], [0, 1]], g = [[1, 1], [1, 0]]
    # TP = 1 + 0.5 = 1.5; FN = 0 + 0.5 + 1 = 1.5; FP = 1 (bottom-right)
    logits = _t([[BIG, 0.0], [-BIG, BIG]])
    target = _t([[1, 1], [1, 0]])
    loss = FocalTverskyLoss(alpha=0.7, beta=0.3, gamma=1.3)(logits, target).item()
    # TI = 1.5 / (1.5 + 1.05 + 0.3) = 1.5 / 2.85
    expected = (1 - 1.5 / 2.85) ** (1 / 1.3)
    assert loss == pytest.approx(expected, abs=1e-4)
    # MONAI's own alpha convention would give 1.5 / (1.5 + 0.45 + 0.7) = 1.5 / 2.65 instead
    assert loss != pytest.approx((1 - 1.5 / 2.65) ** (1 / 1.3), abs=1e-3)


def test_gamma_one_is_plain_tversky_loss() -> None:
    logits = _t([[BIG, 0.0, 0.0], [-BIG, BIG, -BIG]])
    target = _t([[1, 1, 0], [1, 0, 0]])
    # p = [1, .5, .5, 0, 1, 0]; g = [1, 1, 0, 1, 0, 0]
    # TP = 1 + 0.5 = 1.5; FN = 0.5 + 1 = 1.5; FP = 0.5 + 1 = 1.5
    loss = FocalTverskyLoss(alpha=0.6, beta=0.4, gamma=1.0)(logits, target).item()
    assert loss == pytest.approx(1 - 1.5 / (1.5 + 0.6 * 1.5 + 0.4 * 1.5), abs=1e-4)  # = 0.5
    assert loss == pytest.approx(0.5, abs=1e-4)


def test_exponent_is_one_over_gamma() -> None:
    logits = _t([[BIG, -BIG], [-BIG, -BIG]])
    target = _t([[1, 1], [0, 0]])  # TP = 1, FN = 1, FP = 0
    one_minus_ti = 1 - 1 / 1.7  # alpha = 0.7
    for gamma in (0.75, 1.3, 2.0):
        loss = FocalTverskyLoss(0.7, 0.3, gamma)(logits, target).item()
        assert loss == pytest.approx(one_minus_ti ** (1 / gamma), abs=1e-4)
    # gamma > 1 raises a loss below 1 (exponent < 1), as in Abraham & Khan's code
    assert FocalTverskyLoss(0.7, 0.3, 1.3)(logits, target).item() > one_minus_ti + 0.05


def _half_mask(k_fn: int = 0, k_fp: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 target with the top half (32 px) lung; prediction misses k_fn lung px or adds k_fp px."""
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1
    pred = target.clone()
    pred.view(-1)[:k_fn] = 0  # first k_fn lung pixels (row 0)
    pred.view(-1)[32 : 32 + k_fp] = 1  # first k_fp background pixels (row 4)
    logits = torch.where(pred > 0, torch.tensor(BIG), torch.tensor(-BIG))
    return logits, target


@pytest.mark.parametrize("k", [1, 4, 8])
def test_missed_lung_costs_more_than_extra_lung(k: int) -> None:
    fn_logits, target = _half_mask(k_fn=k)
    fp_logits, _ = _half_mask(k_fp=k)
    paper = FocalTverskyLoss(alpha=0.7, beta=0.3, gamma=1.3)
    loss_fn_case, loss_fp_case = paper(fn_logits, target).item(), paper(fp_logits, target).item()
    assert loss_fn_case > loss_fp_case
    # exact values: FN case TP = 32 - k, FN = k; FP case TP = 32, FP = k
    assert loss_fn_case == pytest.approx(_ftl(32 - k, k, 0, 0.7, 0.3, 1.3), abs=1e-4)
    assert loss_fp_case == pytest.approx(_ftl(32, 0, k, 0.7, 0.3, 1.3), abs=1e-4)

    swapped = FocalTverskyLoss(alpha=0.3, beta=0.7, gamma=1.3)
    assert swapped(fn_logits, target).item() < swapped(fp_logits, target).item()

    even = FocalTverskyLoss(alpha=0.5, beta=0.5, gamma=1.3)
    # with equal weights the FN case still loses TP, so it costs slightly more, but only slightly
    assert even(fn_logits, target).item() == pytest.approx(_ftl(32 - k, k, 0, 0.5, 0.5, 1.3), abs=1e-4)
    assert even(fp_logits, target).item() == pytest.approx(_ftl(32, 0, k, 0.5, 0.5, 1.3), abs=1e-4)


def test_perfect_prediction_is_near_zero_with_finite_gradient() -> None:
    logits, target = _half_mask()
    logits = logits.clone().requires_grad_(True)
    loss = FocalTverskyLoss(0.7, 0.3, 1.3)(logits, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    loss.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()


def test_empty_target_and_empty_prediction_is_zero_with_finite_gradient() -> None:
    logits = torch.full((2, 1, 4, 4), -BIG, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4)
    loss = FocalTverskyLoss()(logits, target)
    assert loss.item() == pytest.approx(0.0, abs=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_gradient_finite_and_nonzero_for_imperfect_prediction() -> None:
    logits = torch.zeros(1, 1, 4, 4, requires_grad=True)  # p = 0.5 everywhere
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :] = 1
    loss = FocalTverskyLoss()(logits, target)
    loss.backward()
    grad = logits.grad[0, 0]
    assert torch.isfinite(grad).all()
    # raising lung logits lowers the loss, raising background logits raises it
    assert (grad[:2] < 0).all() and (grad[2:] > 0).all()


def test_all_missed_lung_is_about_one() -> None:
    logits, target = _half_mask(k_fn=32)
    assert FocalTverskyLoss()(logits, target).item() == pytest.approx(1.0, abs=1e-4)


def test_batch_loss_is_mean_of_per_image_losses() -> None:
    a_logits, target = _half_mask(k_fn=8)
    b_logits, _ = _half_mask(k_fp=2)
    c_logits = torch.zeros(1, 1, 8, 8)  # p = 0.5
    ftl = FocalTverskyLoss(0.7, 0.3, 1.3)
    singles = [ftl(x, target).item() for x in (a_logits, b_logits, c_logits)]
    batch = ftl(torch.cat([a_logits, b_logits, c_logits]), target.expand(3, -1, -1, -1)).item()
    assert batch == pytest.approx(sum(singles) / 3, abs=1e-5)
    # hand values of the three images
    assert singles[0] == pytest.approx(_ftl(24, 8, 0, 0.7, 0.3, 1.3), abs=1e-4)
    assert singles[1] == pytest.approx(_ftl(32, 0, 2, 0.7, 0.3, 1.3), abs=1e-4)
    assert singles[2] == pytest.approx(_ftl(16, 16, 16, 0.7, 0.3, 1.3), abs=1e-4)
    # per-image, not pooled: pooling the pixels of the batch gives a different number
    pooled = _ftl(24 + 32 + 16, 8 + 0 + 16, 0 + 2 + 16, 0.7, 0.3, 1.3)
    assert not math.isclose(batch, pooled, abs_tol=1e-3)


def test_loss_is_scalar_and_in_unit_interval() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6, 6) * 3
    target = (torch.rand(3, 1, 6, 6) > 0.5).float()
    loss = FocalTverskyLoss()(logits, target)
    assert loss.shape == ()
    assert 0.0 <= loss.item() <= 1.0
