"""Every public routine keeps its results on the device of its inputs, on a CPU-only machine.

``tests/foreign_device.py`` gives the CPU a second device: tensors and models moved to ``FOREIGN`` compute on the CPU
but refuse what CUDA refuses (an op with a non-scalar CPU tensor, a CPU tensor indexed by them, a CPU generator drawing
for them, ``.numpy()``). Each routine runs with its model and data there and must neither mix devices nor return
CPU tensors unless documented (the pruning rules and FPC return CPU index sets). ``make smoke DEVICE=cuda`` is the
same check on a real GPU."""
import pytest
import torch

from mpe import continual, curvature, fsd, kernels, pruning, sensitivity
from mpe.models import get_model
from mpe.train import predict, train

from foreign_device import FOREIGN, Foreign, ForeignDevice, MixedDevices, transform_keeps_device


@pytest.fixture
def foreign(monkeypatch):
    for mod in (curvature, kernels):
        monkeypatch.setattr(mod, "vmap", transform_keeps_device(mod.vmap))
    with ForeignDevice():
        yield


def on_foreign(t):
    return isinstance(t, Foreign)


def test_the_second_device_refuses_what_cuda_refuses(foreign):
    a, cpu = torch.randn(4, 3).to(FOREIGN), torch.randn(4, 3)
    assert on_foreign(a + 1) and on_foreign(a * torch.tensor(2.0)) and a.device == FOREIGN  # CPU scalars are fine
    with pytest.raises(MixedDevices):
        a + cpu
    with pytest.raises(MixedDevices):
        cpu[torch.tensor([0, 1]).to(FOREIGN)]
    assert on_foreign(a[torch.tensor([0, 1])])  # CPU indices into a device tensor are fine
    with pytest.raises(MixedDevices):
        torch.bernoulli(torch.full((3,), 0.5).to(FOREIGN), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match="numpy"):
        a.numpy()
    assert not on_foreign(a.cpu()) and a.cpu().numpy().shape == (4, 3)
    net = get_model("mlp", (1, 8, 8), 10, hidden=(16,)).to(FOREIGN)
    assert all(on_foreign(p) for p in net.parameters())
    with pytest.raises(MixedDevices):
        net(torch.randn(2, 1, 8, 8))


def _setup(n=24, model="mlp", hidden=(16,)):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 3
    net = get_model(model, (1, 8, 8), 3, **({"hidden": hidden, "activation": "relu"} if model == "mlp" else {})).to(FOREIGN)
    return net, x, y


def test_sensitivity_routines(foreign):
    net, x, y = _setup()
    logits = predict(net, x)
    e = sensitivity.residuals(logits, y)  # the labels may stay on the CPU
    post = curvature.laplace_posterior("kfac", net, x, delta=1.0)
    V = curvature.predictive_covariance(net, x, post)
    p = torch.softmax(logits, 1)
    assert all(on_foreign(t) for t in (logits, e, V))
    for form in ("diag", "full", "newton"):
        assert on_foreign(sensitivity.sensitivity(p, V, e, form))
    assert on_foreign(sensitivity.leverage(p, V)) and on_foreign(sensitivity.loo_nll(logits, y.to(FOREIGN), V))
    for kind in ("diag", "full"):
        post = curvature.laplace_posterior(kind, net, x, delta=1.0)
        assert on_foreign(curvature.predictive_covariance(net, x, post))
    assert on_foreign(curvature.ggn_diag(net, x)) and on_foreign(curvature.per_example_grads(net, x, y))


def test_lpntk_routines(foreign):
    net, x, y = _setup()
    phi = kernels.features(net, x, y)
    K = kernels.gram(phi)
    assert on_foreign(phi) and on_foreign(K) and on_foreign(kernels.features(net, x, y, sketch=32))
    ks = kernels.kernel_statistics(phi, y, zero_threshold=0.1, top_k=3, block=5)
    assert not any(on_foreign(v) for v in ks.values())  # returned on the CPU, as documented
    clusters = kernels.fpc(K[:8, :8], 3)
    assert all(isinstance(h, int) for h, _ in clusters)
    for keep in (pruning.prune_clusters(phi, y, 0.5), pruning.prune_selfmax(phi, y, 0.5),
                 pruning.prune_single_linkage(phi, y, 0.5), pruning.prune_random(y, 0.5),
                 pruning.prune_lowest(pruning.average_similarity(phi, y), y, 0.5)):
        assert not on_foreign(keep) and len(keep) == 12  # index sets are CPU tensors, as documented


@pytest.mark.parametrize("name", fsd.ESTIMATORS)
def test_fsd_estimators(foreign, name):
    old, x, y = _setup()
    new = get_model("mlp", (1, 8, 8), 3, hidden=(16,), activation="relu", seed=1).to(FOREIGN)
    term = fsd.estimator(name, old, x.to(FOREIGN), y=y.to(FOREIGN), n_samples=8, n_coreset=8)
    assert on_foreign(term(new))
    mu, cov = fsd.input_gaussian(x.to(FOREIGN))
    probs = fsd.unit_probs(old, x.to(FOREIGN))
    assert on_foreign(fsd.laftr_bernoulli_exact(old, new, probs, mu.flatten(), cov))


@pytest.mark.parametrize("method", ["laftr", "ewc", "coreset"])
def test_continual_learning_with_tasks_on_the_cpu(foreign, method):
    net, x, y = _setup(n=32)
    tasks = [continual.Task(x, y, x, y, None), continual.Task(x.flip(0), y, x, y, None)]
    R = continual.run_continual(tasks, net, method, reg_kw=dict(n_samples=8, n_coreset=8), epochs=1, lr=0.1,
                                batch_size=16)
    assert R.shape == (2, 2)


def test_training_keeps_the_model_on_its_device(foreign):
    net, x, y = _setup()
    train(net, x, y, epochs=1, lr=0.1, batch_size=8)
    assert all(on_foreign(p) for p in net.parameters())
