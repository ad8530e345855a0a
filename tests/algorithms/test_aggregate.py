import pytest
import torch

from pfedlora.algorithms import weighted_average


def test_weighted_average_exact_numbers_with_clients_of_different_sizes():
    # Three clients with 10, 30 and 60 samples: weights 0.1, 0.3, 0.6.
    states = [
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[10.0]])},
        {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([[0.0]])},
        {"a": torch.tensor([5.0, 0.5]), "b": torch.tensor([[-5.0]])},
    ]
    out = weighted_average(states, [10, 30, 60])
    # a[0] = 0.1*1 + 0.3*3 + 0.6*5 = 4.0 ; a[1] = 0.1*2 - 0.3*2 + 0.6*0.5 = -0.1 ; b = 1 - 3 = -2
    torch.testing.assert_close(out["a"], torch.tensor([4.0, -0.1]), rtol=0, atol=1e-7)
    torch.testing.assert_close(out["b"], torch.tensor([[-2.0]]), rtol=0, atol=0)
    assert out["a"].dtype == torch.float32


def test_weighted_average_differs_from_the_plain_mean():
    states = [{"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}]
    assert weighted_average(states, [1, 3])["w"].item() == 0.75
    assert weighted_average(states, [1, 1])["w"].item() == 0.5


def test_weighted_average_refuses_bad_weights():
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [0])
    with pytest.raises(ValueError):
        weighted_average([{"w": torch.zeros(1)}], [1, 2])
