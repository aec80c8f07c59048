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


def test_resnet9_is_dattris_cifar2_network():
    """Parameter count of dattri's ResNet9(num_classes=2), and, where dattri is installed, the same function: its
    weights and batch-norm statistics copied in order give the same logits."""
    net = get_model("resnet9", (3, 32, 32), 2, seed=0)
    assert n_params(net) == 4_825_154
    assert n_params(get_model("resnet9", (3, 32, 32), 2, width=4)) < 30_000
    resnet9 = pytest.importorskip("dattri.benchmark.models.resnet9.resnet9")
    theirs = resnet9.ResNet9(num_classes=2, dropout_rate=0.0)
    ours, their_state = net.state_dict(), theirs.state_dict()
    assert [v.shape for v in ours.values()] == [v.shape for v in their_state.values()]
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v) for k, v in ours.items()}
    net.load_state_dict(state)
    theirs.load_state_dict(dict(zip(their_state, state.values())))
    x = torch.randn(3, 3, 32, 32, generator=g)
    torch.testing.assert_close(net.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="norm must be"):
        get_model("resnet9", (3, 32, 32), 2, norm="layer")
