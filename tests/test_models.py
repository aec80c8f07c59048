import pytest
import torch

from mpe.models import get_model, n_params

COUNTS = {"small_mlp": ((1, 28, 28), 25_818), "large_mlp": ((1, 28, 28), 545_810), "lenet5": ((1, 28, 28), 61_706),
          "cnn_3c3d": ((3, 32, 32), 895_210), "resnet20_frn": ((3, 32, 32), 274_042),
          "mnist_example_cnn": ((1, 28, 28), 1_199_882), "toneva_mnist_cnn": ((1, 28, 28), 21_840),
          "jiang_mlp": ((1, 28, 28), 535_818),
          "resnet18": ((3, 32, 32), 11_173_962), "resnet18_nobn": ((3, 32, 32), 11_164_362),
          "wrn28_10": ((3, 32, 32), 36_479_194), "laftr_mlp": ((1, 28, 28), 89_610)}


def test_cifarnet_matches_the_notes():
    from mpe.fsd import memory

    net = get_model("cifarnet", (3, 32, 32), 60, seed=0)
    assert n_params(net) == 1_276_508 and net(torch.randn(2, 3, 32, 32)).shape == (2, 60)
    assert memory(net, (3, 32, 32))["LAFTR Bernoulli probabilities"] == 87_296


@pytest.mark.parametrize("name", COUNTS)
def test_parameter_counts_match_the_paper(name):
    shape, count = COUNTS[name]
    model = get_model(name, shape, 10, seed=0)
    assert n_params(model) == count
    assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_small_models_run_on_digits():
    for name in ("softmax_regression", "mlp", "small_cnn"):
        assert get_model(name, (1, 8, 8), 10)(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="valid choices: .*lenet5"):
        get_model("lenet", (1, 28, 28))


def test_seed_fixes_initialisation():
    a, b = get_model("lenet5", (1, 28, 28), seed=3), get_model("lenet5", (1, 28, 28), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
