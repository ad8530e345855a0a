import math

import pytest
import torch

from pfedlora.algorithms.distillation import kl_divergence

LN3 = math.log(3.0)
# Row 0: student (1/2, 1/2), teacher (1/4, 3/4). Row 1: student (3/4, 1/4), teacher (1/2, 1/2).
STUDENT = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
TEACHER = torch.tensor([[0.0, LN3], [0.0, 0.0]])
ROW_0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # Σ p_t (log p_t − log p_s)
ROW_1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [("batchmean", (ROW_0 + ROW_1) / 2), ("mean", (ROW_0 + ROW_1) / 4)],
)
def test_kl_matches_the_hand_computed_value(reduction, expected):
    assert kl_divergence(STUDENT, TEACHER, reduction).item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_teacher_to_student_not_the_reverse():
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(row-0 student ‖ row-0 teacher)
    forward = kl_divergence(STUDENT[:1], TEACHER[:1]).item()
    assert forward == pytest.approx(ROW_0, rel=1e-6)
    assert forward != pytest.approx(reverse, rel=1e-3)


def test_kl_is_zero_for_equal_distributions_and_shift_invariant():
    logits = torch.tensor([[1.0, -2.0, 0.5]])
    assert kl_divergence(logits, logits + 7.0).item() == pytest.approx(0.0, abs=1e-6)


def test_only_the_student_gets_a_gradient():
    student = STUDENT.clone().requires_grad_()
    teacher = TEACHER.clone().requires_grad_()
    kl_divergence(student, teacher).backward()
    assert teacher.grad is None
    # d KL / d z_s = (p_s − p_t) / B for batchmean.
    p_s, p_t = torch.softmax(STUDENT, 1), torch.softmax(TEACHER, 1)
    torch.testing.assert_close(student.grad, (p_s - p_t) / 2)


def test_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="allowed: batchmean, mean"):
        kl_divergence(STUDENT, TEACHER, "sum")
