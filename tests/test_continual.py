"""Continual-learning bookkeeping on tiny hand-made tasks: task construction, the accuracy matrix, the regularisers."""
import copy

import pytest
import torch
from torch import nn

from mpe import fsd
from mpe.continual import permuted_tasks, regulariser, run_continual, split_tasks
from mpe.data import Data


def toy(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randn(n, 1, 2, 3, generator=g) + y.view(-1, 1, 1, 1).float()
    return Data("toy", x[:80], y[:80], x[80:], y[80:], tuple("abcd"))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_split_tasks_relabel_within_heads_and_permuted_tasks_share_labels():
    data = toy()
    tasks = split_tasks(data, ((0, 1), (2, 3)))
    assert [t.outputs for t in tasks] == [[0, 1], [2, 3]]
    assert set(tasks[1].y_train.tolist()) == {0, 1} and len(tasks[1].x_train) == int((data.y_train >= 2).sum())
    torch.testing.assert_close(tasks[1].x_train, data.x_train[data.y_train >= 2])
    perm = permuted_tasks(data, 3)
    assert perm[0].x_train.equal(data.x_train) and not perm[1].x_train.equal(data.x_train)
    assert perm[2].y_train.equal(data.y_train) and perm[1].outputs is None


def test_run_continual_fills_the_lower_triangle():
    tasks = split_tasks(toy(), ((0, 1), (2, 3)))
    R = run_continual(tasks, mlp(), "laftr", lam=1.0, optimizer="adam", lr=1e-2, epochs=3, batch_size=16, seed=0)
    Rk = run_continual(tasks, mlp(), "kfac", lam=1.0, optimizer="adam", lr=1e-2, epochs=3, batch_size=16, seed=0)
    assert not torch.isnan(Rk[1]).any()
    assert R.shape == (2, 2) and torch.isnan(R[0, 1]) and not torch.isnan(R[torch.tril_indices(2, 2).unbind()]).any()
    with pytest.raises(ValueError, match="valid choices"):
        run_continual(tasks, mlp(), "si")


@pytest.mark.parametrize("method", ["ewc", "kfac", "coreset", "laftr"])
def test_regularisers_vanish_at_the_old_parameters_and_grow_away(method):
    data = toy()
    task = split_tasks(data, ((0, 1, 2, 3),))[0]
    old = mlp()
    pen = regulariser(method, copy.deepcopy(old), task, n_samples=64)
    assert pen(old).item() == pytest.approx(0.0, abs=1e-10)
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert pen(new).item() > 1e-4


def test_coreset_regulariser_is_the_true_fsd_on_the_stored_examples():
    data = toy()
    task = split_tasks(data, ((0, 1, 2, 3),))[0]
    old, new = mlp(), mlp()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.2)
    pen = regulariser("coreset", copy.deepcopy(old), task, n_coreset=1000)  # all 80 examples
    torch.testing.assert_close(pen(new), fsd.fsd(old, new, task.x_train, "kl"))


def test_split_cifar_tasks_relabel_and_own_their_heads():
    from mpe.continual import split_cifar_tasks
    from mpe.models import get_model

    g = torch.Generator().manual_seed(0)

    def fake(name, n_classes, n):
        y = torch.arange(n) % n_classes
        return Data(name, torch.randn(n, 3, 32, 32, generator=g), y, torch.randn(n, 3, 32, 32, generator=g), y,
                    tuple(map(str, range(n_classes))))

    c10, c100 = fake("cifar10", 10, 40), fake("cifar100", 100, 400)
    tasks = split_cifar_tasks(c10, c100, n_tasks=3)
    assert [t.outputs for t in tasks] == [list(range(10)), list(range(10, 20)), list(range(20, 30))]
    assert torch.equal(tasks[0].y_train, c10.y_train)
    for k in (1, 2):
        keep = (c100.y_train >= 10 * (k - 1)) & (c100.y_train < 10 * k)
        torch.testing.assert_close(tasks[k].x_train, c100.x_train[keep])
        assert torch.equal(tasks[k].y_train, c100.y_train[keep] - 10 * (k - 1))
    with pytest.raises(ValueError, match="1 to 11 tasks"):
        split_cifar_tasks(c10, c100, n_tasks=12)
    small = [type(t)(t.x_train[:20], t.y_train[:20], t.x_test[:20], t.y_test[:20], t.outputs) for t in tasks[:2]]
    net = get_model("cifarnet", (3, 32, 32), 60, seed=0)
    R = run_continual(small, net, "laftr", lam=1.0, reg_kw=dict(n_samples=8), epochs=1, lr=1e-3, optimizer="adam",
                      batch_size=10)
    assert R.shape == (2, 2) and torch.isfinite(R[1]).all() and torch.isnan(R[0, 1])


def test_benchmarks_name_their_tasks_and_networks():
    from mpe.continual import benchmark
    from mpe.models import get_model

    label, tasks, net = benchmark("permuted_mnist", dataset="digits", hidden=(8,), n_tasks=2)
    assert label == "Permuted MNIST (2 tasks)" and len(tasks) == 2 and tasks[1].outputs is None
    assert get_model(**net)(tasks[1].x_test[:3]).shape == (3, 10)
    label, tasks, net = benchmark("split_mnist", dataset="digits")
    assert [t.outputs for t in tasks] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    label, tasks, net = benchmark("split_cifar", n_tasks=2, cifar_datasets=("synthetic-cifar10",) * 2)
    assert (label, net["name"], net["n_classes"], tasks[1].outputs) == ("Split CIFAR (2 tasks)", "cifarnet", 20,
                                                                         list(range(10, 20)))
    with pytest.raises(ValueError, match="valid choices: split_mnist"):
        benchmark("split_fmnist")


def test_validation_tasks_hold_out_training_examples_only():
    from mpe.continual import Task, validation_tasks

    x = torch.arange(50.0).reshape(50, 1)
    tasks = [Task(x, torch.arange(50) % 2, x[:5] + 100, torch.zeros(5, dtype=torch.long), [0, 1]),
             Task(x + 50, torch.arange(50) % 3, x[:5] + 200, torch.zeros(5, dtype=torch.long), None)]
    val = validation_tasks(tasks, frac=0.2, seed=1)
    for t, v in zip(tasks, val):
        assert len(v.x_test) == 10 and len(v.x_train) == 40 and v.outputs == t.outputs
        both = torch.cat([v.x_train, v.x_test]).flatten().sort().values
        assert torch.equal(both, t.x_train.flatten())  # a partition of the training examples; the test set unused
        rows = (v.x_test.flatten() - t.x_train[0, 0]).long()
        assert torch.equal(v.y_test, t.y_train[rows])  # labels travel with their inputs
    assert not torch.equal(val[0].x_test, validation_tasks(tasks, frac=0.2, seed=2)[0].x_test)
    with pytest.raises(ValueError, match="frac"):
        validation_tasks(tasks, frac=1.0)


def test_best_lambda_takes_the_best_mean_and_breaks_ties_low():
    from mpe.continual import best_lambda

    assert best_lambda([1.0, 10.0, 100.0, 1.0, 10.0, 100.0], [0.8, 0.9, 0.95, 0.9, 0.92, 0.7]) == 10.0
    assert best_lambda([30.0, 3.0], [0.9, 0.9]) == 3.0
    with pytest.raises(ValueError):
        best_lambda([], [])


def test_continual_job_rebuilds_the_run_from_its_description(tmp_path):
    """A job described by data gives the run that the notebook built from tensors, on the benchmark or on its
    validation tasks; run_specs caches it under its spec; a malformed spec is an error naming the keys."""
    from mpe.continual import benchmark, continual_job, validation_tasks
    from mpe.models import get_model
    from mpe.retrain import run_specs

    bench = dict(name="permuted_mnist", dataset="digits", hidden=[8], n_tasks=2)
    train = dict(optimizer="adam", lr=0.01, epochs=1, batch_size=64)
    spec = dict(benchmark=bench, validation=None, method="ewc", lam=10.0, reg=dict(n_samples=5, n_coreset=5), seed=3,
                train=train, device="cpu")
    _, tasks, net = benchmark(**bench)
    for validation, on in ((None, tasks), (dict(frac=0.25, seed=7), validation_tasks(tasks, 0.25, seed=7))):
        want = run_continual(on, get_model(**net, seed=3), "ewc", lam=10.0, reg_kw=dict(n_samples=5, n_coreset=5),
                             seed=3, **train)
        torch.testing.assert_close(continual_job(dict(spec, validation=validation)), want, rtol=0, atol=0, equal_nan=True)
    (got,) = run_specs(continual_job, [spec], tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    torch.testing.assert_close(got, continual_job(spec), rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="unknown \\['lr'\\]"):
        continual_job(dict(spec, lr=0.1))
    with pytest.raises(ValueError, match="remove 'seed'"):
        continual_job(dict(spec, train=dict(train, seed=1)))
