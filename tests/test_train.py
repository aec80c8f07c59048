"""The training loop's conventions, callbacks, and resumable retraining jobs."""
import copy

import pytest
import torch
from torch import nn

from mpe.retrain import job_key, run_jobs
from mpe.train import PerExampleRecorder, flat_params, l2_objective, predict, stop_after, train


def data(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 1, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_sgd_step_uses_mean_loss_plus_delta_over_n_l2():
    x, y = data()
    m = model()
    theta = flat_params(m)
    m_ref = model()
    loss = nn.functional.cross_entropy(m_ref(x), y) + 0.5 * (3.0 / 12) * sum((p ** 2).sum() for p in m_ref.parameters())
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(m_ref.parameters()))])
    train(m, x, y, optimizer="sgd", lr=0.1, epochs=1, batch_size=None, delta=3.0, momentum=0.0)
    torch.testing.assert_close(flat_params(m), theta - 0.1 * grad)


def test_lbfgs_reaches_the_minimiser(f64):
    x, y = data()
    m = model().double()
    train(m, x.double(), y, optimizer="lbfgs", lr=1, epochs=500, delta=1.0, tol=1e-12)
    g = torch.autograd.grad(l2_objective(m, x.double(), y, 1.0, 12), list(m.parameters()))
    assert max(t.abs().max().item() for t in g) < 1e-8


def test_decoupled_and_ivon_weight_decay_is_delta_over_n():
    x, y = data()
    st = train(model(), x, y, optimizer="adamw", lr=1e-3, epochs=1, delta=6.0)
    assert st.optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.5)
    st = train(model(), x, y, optimizer="ivon", lr=1e-2, epochs=1, delta=6.0, batch_size=4)
    group = st.optimizer.param_groups[0]
    assert group["weight_decay"] == pytest.approx(0.5) and group["ess"] == 12


def test_callbacks_see_every_example_once_per_epoch():
    x, y = data()

    class Seen:
        def __init__(self):
            self.idx = []

        def on_batch_end(self, state, idx, logits, yb):
            assert torch.equal(yb, y[idx]) and logits.shape == (len(idx), 3)
            self.idx.append(idx)

    seen, rec = Seen(), PerExampleRecorder(x, y)
    train(model(), x, y, optimizer="sgd", lr=0.1, epochs=3, batch_size=5, callbacks=[seen, rec])
    per_epoch = [torch.cat(seen.idx[i * 3:(i + 1) * 3]).sort().values for i in range(3)]
    assert all(torch.equal(e, torch.arange(12)) for e in per_epoch)
    assert rec.result()["correct"].shape == (3, 12) and rec.result()["loss"].shape == (3, 12)


def test_bad_arguments_fail_clearly():
    x, y = data()
    with pytest.raises(ValueError, match="valid choices: sgd, adam"):
        train(model(), x, y, optimizer="rmsprop", lr=0.1, epochs=1)
    with pytest.raises(ValueError, match="lr > 0"):
        train(model(), x, y, lr=0.0, epochs=1)


def test_jobs_resume_after_interruption(tmp_path):
    calls = []

    def job(i, fail=False):
        def run():
            calls.append(i)
            if fail:
                raise KeyboardInterrupt
            return torch.tensor([i])
        return run

    keys = [job_key(i=i) for i in range(3)]
    with pytest.raises(KeyboardInterrupt):
        run_jobs({keys[0]: job(0), keys[1]: job(1), keys[2]: job(2, fail=True)}, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.pt" for k in keys[:2])
    out = run_jobs({k: job(i) for i, k in enumerate(keys)}, tmp_path, progress=False)
    assert calls == [0, 1, 2, 2] and [int(out[k]) for k in keys] == [0, 1, 2]
    assert job_key(i=1, a=2) == job_key(a=2, i=1) != job_key(i=1, a=3)


def test_warm_retrain_specs_change_with_the_probe_the_data_and_theta(tmp_path, monkeypatch):
    """The stash names what a warm-started retrain computes from: equal contents, equal names; another probe, other
    data or another θ_*, other names (the stale-cache case); unstash gives the module back as a new copy."""
    from mpe.retrain import stash, unstash

    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path))
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    x = torch.randn(8, 1, 1, 3)
    name = stash(net)
    assert stash(x[:4]) == stash(x[:4].clone()) and stash(copy.deepcopy(net)) == name  # same values, same names
    assert stash(x[:4]) != stash(x[:5]) and stash(x) != stash(x + 1)
    with torch.no_grad():
        net[1].bias += 1
    assert stash(net) != name
    back = unstash(name)
    assert back is not unstash(name) and not torch.equal(back[1].bias, net[1].bias)
    torch.testing.assert_close(back[1].bias + 1, net[1].bias, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="MPE_RESULTS_DIR"):
        unstash("t0000")
    with pytest.raises(TypeError, match="tensors and modules"):
        stash([1, 2])


def test_step_and_constant_schedules():
    x, y = torch.randn(16, 1, 1, 3), torch.randint(0, 2, (16,))
    for schedule, want in (("step", 0.1 * 0.5 ** 2), ("constant", 0.1), ("cosine", 0.0)):
        net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
        state = train(net, x, y, optimizer="sgd", lr=0.1, epochs=4, batch_size=8, schedule=schedule, step_size=2,
                      gamma=0.5)
        assert abs(state.optimizer.param_groups[0]["lr"] - want) < 1e-12
    with pytest.raises(ValueError, match="valid choices: cosine, step, multistep, constant"):
        train(net, x, y, lr=0.1, epochs=1, schedule="linear")


def test_stop_after_gives_the_first_epochs_of_the_long_run():
    x, y = data()
    full = train(model(), x, y, lr=0.1, epochs=6, batch_size=4, schedule="cosine")
    head = train(net := model(), x, y, lr=0.1, epochs=6, batch_size=4, schedule="cosine", callbacks=[stop_after(2)])
    assert head.epoch == 2 and head.losses == full.losses[:2]
    assert abs(head.optimizer.param_groups[0]["lr"] - 0.1 * (1 + torch.cos(torch.tensor(torch.pi / 3))) / 2) < 1e-7
    short = train(model(), x, y, lr=0.1, epochs=2, batch_size=4, schedule="cosine")  # its own, faster schedule
    assert not torch.equal(flat_params(short.model), flat_params(net))
    with pytest.raises(ValueError, match="epochs >= 1"):
        stop_after(0)


def test_predict_keeps_no_graph():
    x, _ = data()
    out = predict(model(), x, batch_size=5)
    assert out.shape == (12, 3) and not out.requires_grad


def test_penalty_is_added_to_every_minibatch_loss():
    """An L2 penalty passed as a function gives the same run as the built-in prior precision delta."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 1, 4, generator=g), torch.randint(0, 3, (30,), generator=g)

    def run(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        train(net, x, y, optimizer="sgd", lr=0.1, epochs=3, batch_size=10, seed=0, **kw)
        return flat_params(net)

    delta = 3.0
    builtin = run(delta=delta)
    penalised = run(penalty=lambda m: 0.5 * (delta / 30) * sum((p * p).sum() for p in m.parameters()))
    torch.testing.assert_close(penalised, builtin)
    assert not torch.allclose(run(), builtin)


def test_squared_loss_step_by_hand():
    """One full-batch SGD step on ½‖Wx + b − y‖² (mean over examples) equals the hand-written gradient step."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    net = nn.Linear(3, 2)
    w, b = net.weight.detach().clone(), net.bias.detach().clone()
    train(net, x, y, loss="squared", optimizer="sgd", lr=0.1, momentum=0.0, epochs=1, batch_size=None,
          schedule="constant", shuffle=False)
    r = x @ w.T + b - y
    torch.testing.assert_close(net.weight.detach(), w - 0.1 * r.T @ x / 8)
    torch.testing.assert_close(net.bias.detach(), b - 0.1 * r.mean(0))
    with pytest.raises(ValueError, match="valid choices"):
        train(net, x, y, loss="hinge", epochs=1, lr=0.1)


def test_multistep_schedule_and_nesterov():
    """MultiStepLR multiplies by gamma after each milestone epoch; Nesterov momentum reaches torch's SGD flag."""
    x, y = torch.randn(16, 1, 1, 3), torch.randint(0, 2, (16,))
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    state = train(net, x, y, optimizer="sgd", lr=0.1, epochs=5, batch_size=8, schedule="multistep", milestones=(2, 4),
                  gamma=0.2, nesterov=True)
    assert abs(state.optimizer.param_groups[0]["lr"] - 0.1 * 0.2 ** 2) < 1e-12
    assert state.optimizer.param_groups[0]["nesterov"]
    with pytest.raises(ValueError, match="SGD option"):
        train(net, x, y, optimizer="adam", lr=0.1, epochs=1, nesterov=True)


def test_augmentation_is_seeded_and_reaches_the_callbacks():
    """With augment="none" nothing changes; crop+flip changes the run, reproducibly, and callbacks see the logits of
    the augmented batch (Toneva's online statistics)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 3, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)

    class Logits:
        def __init__(self):
            self.seen = []

        def on_batch_end(self, state, idx, logits, yb):
            self.seen.append(logits)

    def run(**kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
        cb = Logits()
        train(net, x, y, optimizer="sgd", lr=0.1, epochs=2, batch_size=8, seed=3, callbacks=[cb], **kw)
        return flat_params(net), cb.seen

    plain, seen_plain = run()
    torch.testing.assert_close(run(augment="none")[0], plain)
    aug, seen = run(augment="crop_flip")
    torch.testing.assert_close(run(augment="crop_flip")[0], aug)
    assert not torch.allclose(aug, plain)
    torch.manual_seed(0)
    first = nn.Sequential(nn.Flatten(), nn.Linear(192, 3))
    assert not torch.allclose(seen[0], first(x[torch.randperm(24, generator=torch.Generator().manual_seed(3))[:8]]))
    with pytest.raises(ValueError, match="valid choices: none, crop_flip"):
        train(first, x, y, lr=0.1, epochs=1, augment="rotate")


def test_the_ledger_counts_runs_steps_and_examples_by_hand():
    """12 examples at batch 5: 3 steps per epoch; stop_after ends a 4-epoch run after 2; L-BFGS iterations are
    full-batch steps; train_many logs one row per model; a model from the registry is counted by its name; a run
    inside a sweep's job counts as a job."""
    from mpe.models import get_model
    from mpe.train import WORK, train_many, work

    x, y = data()
    WORK.clear()
    train(model(), x, y, epochs=3, lr=0.1, batch_size=5)
    train(model(), x, y, epochs=4, lr=0.1, batch_size=5, callbacks=[stop_after(2)])
    assert work() == {"Sequential @ 5": dict(runs=2, steps=3 * 3 + 2 * 3, examples=3 * 12 + 2 * 12, jobs=0)}
    state = train(model(), x, y, epochs=5, lr=1.0, optimizer="lbfgs")
    assert work()["Sequential @ full"] == dict(runs=1, steps=state.step, examples=12 * state.step, jobs=0)
    assert 0 < state.step <= 5
    nets = [get_model("softmax_regression", (1, 1, 4), 3, seed=s) for s in range(3)]
    train_many(nets, x, y, [torch.arange(10)] * 3, epochs=2, lr=0.1, batch_size=4)
    assert work()["softmax_regression @ 4"] == dict(runs=3, steps=3 * 2 * 3, examples=3 * 2 * 10, jobs=0)
    assert [r["vectorised"] for r in WORK[-3:]] == [3, 3, 3]
    from mpe.retrain import run_jobs

    run_jobs({"one": lambda: train(model(), x, y, epochs=1, lr=0.1, batch_size=5).step}, None, progress=False)
    train(model(), x, y, epochs=1, lr=0.1, batch_size=5)  # after the sweep: not a job
    assert work()["Sequential @ 5"] == dict(runs=4, steps=3 * 3 + 2 * 3 + 2 * 3, examples=5 * 12 + 2 * 12, jobs=1)
    WORK.clear()
    assert work() == {}


def test_conv_nets_train_in_channels_last_and_give_back_the_default_layout():
    """On a CPU a conv net trains with NHWC images and parameters (faster); the steps are the same SGD steps as in the
    default layout, checked against a hand-written loop, and the parameters come back contiguous."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)

    def conv():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 3))

    seen = []

    class Layout:
        def on_batch_start(self, state, idx):
            seen.append(state.batch[0].is_contiguous(memory_format=torch.channels_last))

    m, ref = conv(), conv()
    train(m, x, y, optimizer="sgd", lr=0.1, momentum=0.9, epochs=2, batch_size=8, shuffle=False, schedule="constant",
          callbacks=[Layout()])
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for s in (0, 8):
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x[s:s + 8]), y[s:s + 8]).backward()
            opt.step()
    assert seen == [True] * 4
    assert all(p.is_contiguous() for p in m.parameters())
    torch.testing.assert_close(flat_params(m), flat_params(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer, dropout", [("ivon", 0.0), ("sgd", 0.5)])
def test_a_run_depends_on_its_seed_not_on_the_global_generator(optimizer, dropout):
    """IVON's weight noise and dropout masks come from torch's global generator: train seeds it from ``seed`` and
    restores it, so a run is the same whatever ran before it (a skipped cached run), and the caller's stream is kept."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)

    def run(seed, burn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, 3))
        torch.rand(burn)  # what ran before: another position in the global stream
        expected_next = torch.get_rng_state()
        train(model, x, y, optimizer=optimizer, lr=0.05, epochs=3, batch_size=10, seed=seed)
        assert torch.equal(torch.get_rng_state(), expected_next)  # the caller's stream is where training found it
        return flat_params(model)

    a, b, c = run(0, 0), run(0, 7), run(1, 0)
    assert torch.equal(a, b)  # the stream's position before the run does not matter
    assert not torch.equal(a, c)  # the seed does
