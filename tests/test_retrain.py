"""The retraining engine: many small models in one vectorised program, cached jobs, atomic results, Dask fan-out.

Truth here is the plain training loop: ``train_many`` must give what one ``train`` per model gives, and every
executor must give what running the jobs one after another gives."""
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mpe.models import get_model
from mpe.regularity import LearningDifficulty, VisitRecorder
from mpe.retrain import (
    _CLIENTS,
    JobsFailed,
    code_closure,
    code_fingerprint,
    fit_subset,
    job_key,
    run_jobs,
    run_specs,
    spec_key,
    subset_fits,
    subset_runs,
    vectorise_pays,
)
from mpe.train import _laid_out_as_gradients, predict, stop_after, train, train_many, vectorisable


def data(n=60, shape=(1, 8, 8), k=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, k, (n,), generator=g)


def subsets(n=60, sizes=(40, 40, 40, 30)):
    g = torch.Generator().manual_seed(1)
    return [torch.randperm(n, generator=g)[:s] for s in sizes]


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


RECIPES = {
    "sgd nesterov, L2, cosine": ("mlp", dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, delta=3.0)),
    "adam, L2, step": ("mlp", dict(optimizer="adam", lr=0.01, delta=1.0, schedule="step", step_size=1, gamma=0.5)),
    "adamw, crop+flip, multistep": ("small_cnn", dict(optimizer="adamw", lr=0.01, delta=2.0, augment="crop_flip",
                                                      schedule="multistep", milestones=[2], gamma=0.1)),
    "sgd full batch, no shuffle": ("mlp", dict(optimizer="sgd", lr=0.1, batch_size=None, shuffle=False)),
}


@pytest.mark.parametrize("name", RECIPES)
def test_train_many_equals_one_train_per_model(name):
    arch, kw = RECIPES[name]
    kw = dict(dict(epochs=3, batch_size=16), **kw)
    x, y = data()
    subs, seeds = subsets(), [5, 6, 7, 8]
    one = [get_model(arch, (1, 8, 8), 3, seed=s) for s in seeds]
    many = [get_model(arch, (1, 8, 8), 3, seed=s) for s in seeds]
    before = params(many[0]).clone()
    losses = [train(m, x[i], y[i], seed=s, **kw).losses for m, i, s in zip(one, subs, seeds)]
    got = train_many(many, x, y, subs, seeds, **kw)
    assert not torch.allclose(params(many[0]), before)  # it trained
    for a, b in zip(one, many):  # the two sizes (40 and 30) are two groups with their own step counts and δ/n
        torch.testing.assert_close(params(b), params(a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, torch.tensor(losses), rtol=1e-5, atol=1e-6)


def test_train_many_callbacks_see_what_train_callbacks_see():
    x, y = data()
    subs, seeds = subsets(sizes=(40, 40)), [1, 2]
    rec_one, rec_many = [[VisitRecorder(40), LearningDifficulty(40)] for _ in seeds], \
        [[VisitRecorder(40), LearningDifficulty(40)] for _ in seeds]
    kw = dict(epochs=4, lr=0.1, batch_size=16)
    for s, i, cb in zip(seeds, subs, rec_one):
        train(get_model("mlp", (1, 8, 8), 3, seed=s), x[i], y[i], seed=s, callbacks=cb + [stop_after(3)], **kw)
    losses = train_many([get_model("mlp", (1, 8, 8), 3, seed=s) for s in seeds], x, y, subs, seeds,
                        callbacks=[cb + [stop_after(3)] for cb in rec_many], **kw)
    assert losses.shape == (2, 3)  # stopped after 3 of 4 epochs, as train does
    for a, b in zip(rec_one, rec_many):
        assert torch.equal(torch.stack(a[0].history), torch.stack(b[0].history))
        torch.testing.assert_close(a[1].total, b[1].total)


def test_train_many_refuses_to_stop_only_the_models_with_callbacks():
    """A model without callbacks keeps training while another's stop_after fires: train_many cannot split them."""
    x, y = data()
    nets = [get_model("mlp", (1, 8, 8), 3, seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match="stopped some models but not all"):
        train_many(nets, x, y, subsets(sizes=(40, 40)), [1, 2], callbacks=[[stop_after(1)], []], epochs=3, lr=0.1)


def test_stacked_parameters_are_laid_out_as_their_gradients():
    """A vmapped Linear's weight gradient comes out transposed; the re-laid parameters keep their values and take the
    gradient's strides, so the backward hands the gradient over without a copy (its strides match the leaf's)."""
    from torch.func import functional_call, stack_module_state, vmap

    nets = [get_model("mlp", (1, 8, 8), 3, seed=s) for s in (1, 2, 3)]
    stacked, _ = stack_module_state(nets)
    base = get_model("mlp", (1, 8, 8), 3).to("meta")
    x = torch.randn(3, 5, 1, 8, 8)

    def total(p):
        return vmap(lambda q, xb: functional_call(base, q, (xb,)))(p, x).square().sum()

    laid = _laid_out_as_gradients(stacked, total)
    assert laid["1.weight"].stride() != stacked["1.weight"].stride()  # (3, 32, 64) is re-laid as a transpose
    for k in stacked:
        assert torch.equal(laid[k], stacked[k]) and laid[k].is_leaf and laid[k].requires_grad
    grads = torch.autograd.grad(total(laid), list(laid.values()))  # the raw gradients, before any layout copy
    for p, g in zip(laid.values(), grads):
        assert g.stride() == p.stride()


def test_vectorise_pays_for_small_steps_on_a_cpu():
    x1 = torch.zeros(1, 1, 28, 28)
    assert vectorise_pays(get_model("mlp", (1, 28, 28), 10), x1, 64, 1000)  # 3.3 MFLOP per step
    assert not vectorise_pays(get_model("jiang_mlp", (1, 28, 28), 10), x1, 64, 1000)  # 68 MFLOP
    assert vectorise_pays(get_model("lpntk_cnn", (1, 28, 28), 10), x1, 128, 10)  # the batch is the 10-example subset


def test_train_many_refuses_what_it_cannot_vectorise():
    x, y = data()
    assert vectorisable(get_model("mlp", (1, 8, 8), 3)) is None
    assert "BatchNorm" in vectorisable(nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3)))
    assert "dropout" in vectorisable(nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(64, 3)))
    assert "ivon" in vectorisable(get_model("mlp", (1, 8, 8), 3), optimizer="ivon")
    with pytest.raises(ValueError, match="BatchNorm"):
        train_many([nn.Sequential(nn.Flatten(), nn.Linear(64, 3), nn.BatchNorm1d(3))], x, y, epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="one architecture"):
        train_many([get_model("mlp", (1, 8, 8), 3), get_model("softmax_regression", (1, 8, 8), 3)], x, y,
                   epochs=1, lr=0.1)
    with pytest.raises(ValueError, match="one subset"):
        train_many([get_model("mlp", (1, 8, 8), 3)], x, y, subsets(), epochs=1, lr=0.1)
    with pytest.raises(TypeError, match="unexpected.*momentun"):
        train_many([get_model("mlp", (1, 8, 8), 3)], x, y, epochs=1, lr=0.1, penalty=None, momentun=0.9)
    with pytest.raises(ValueError, match="penalty"):
        train_many([get_model("mlp", (1, 8, 8), 3)], x, y, epochs=1, lr=0.1, penalty=lambda m: 0.0)
    with pytest.raises(FloatingPointError, match=r"models \[1\]"):
        train_many([get_model("mlp", (1, 8, 8), 3), get_model("mlp", (1, 8, 8), 3)], x, y, [range(60)] * 2,
                   [0, 1], epochs=1, lr=0.1, callbacks=[[], [SimpleNamespace(on_batch_start=poison)]])


class Buffered(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.register_buffer("one", torch.ones(()))

    def forward(self, x):
        return self.net(x) * self.one


def poison(state, idx):  # makes this model's minibatch non-finite
    state.batch[0].fill_(float("nan"))


def _fit_and_score(x, y, kw):
    def fit(kept, seed):
        net = get_model("mlp", (1, 8, 8), 3, seed=seed)
        train(net, x[kept], y[kept], seed=seed, **kw)
        return predict(net, x).softmax(1)
    return fit


def test_subset_fits_equals_subset_runs_and_caches(tmp_path):
    x, y = data()
    kw = dict(epochs=2, lr=0.1, batch_size=16)
    runs = [(i, s) for i, s in zip(subsets(sizes=(40, 30, 40, 40)), [3, 4, 5, 3])] + [(subsets()[0], 3)]  # a repeat
    tag = dict(study="test")
    ref = subset_runs(_fit_and_score(x, y, kw), runs, tag, tmp_path / "seq", progress=False)
    got = subset_fits(lambda s: get_model("mlp", (1, 8, 8), 3, seed=s), x, y, runs, kw,
                      lambda net: predict(net, x).softmax(1), tag, tmp_path / "vec", chunk=2, progress=False)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "seq").iterdir()) == sorted(p.name for p in (tmp_path / "vec").iterdir())
    assert len(list((tmp_path / "vec").iterdir())) == 4  # the repeated run is one job
    # a second call trains nothing: make_model would raise
    again = subset_fits(lambda s: 1 / 0, x, y, runs, kw, None, tag, tmp_path / "vec", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    # a model train_many refuses (one with a buffer) falls back to one train per run, with the same results
    seq = subset_fits(lambda s: Buffered(get_model("mlp", (1, 8, 8), 3, seed=s)), x, y, runs[:2], kw,
                      lambda net: predict(net, x).softmax(1), tag, None, progress=False)
    for a, b in zip(ref, seq):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


DIGITS = dict(name="digits", n_train=120, n_test=60, seed=0)
KW = dict(epochs=2, lr=0.1, batch_size=16, momentum=0.9)


def digit_specs(evaluate="test_probs"):
    g = torch.Generator().manual_seed(2)
    runs = [(torch.sort(torch.randperm(120, generator=g)[:n]).values.tolist(), s) for n, s in [(80, 1), (80, 2), (60, 3)]]
    return [dict(data=DIGITS, model=dict(name="mlp", hidden=[8]), seed=s, kept=k, train=KW, evaluate=evaluate)
            for k, s in runs]


def test_a_sweep_is_cut_into_a_share_per_slot_of_the_cluster(monkeypatch):
    """On a cluster, a group that trains together is cut into at least one unit per slot (a worker's thread), so no
    worker idles while another trains the whole group; here it stays one unit of up to ``chunk``."""
    import mpe.retrain as retrain

    class Cluster:  # all that run_specs asks of a Dask client before it submits: its workers' threads
        def nthreads(self):
            return {"tcp://a": 1, "tcp://b": 1, "tcp://c": 1}

    def units_of(executor, chunk=32):
        seen = []

        def execute(units, paths, results, *rest):
            seen.extend(len(keys) for keys, *_ in units)
            results.update(dict.fromkeys(paths))
        monkeypatch.setattr(retrain, "_execute", execute)
        run_specs(fit_subset, specs, None, executor=executor, progress=False, chunk=chunk)
        return seen

    monkeypatch.setattr(retrain, "_client", lambda executor: Cluster() if executor == "cluster" else None)
    good = digit_specs()[0]
    specs = [dict(good, seed=s) for s in range(7)]  # one group that trains together
    assert units_of(None) == [7] and units_of(None, chunk=2) == [2, 2, 2, 1]
    assert units_of("cluster") == [3, 3, 1] and units_of("cluster", chunk=2) == [2, 2, 2, 1]
    specs = specs[:2]
    assert units_of("cluster") == [1, 1]


def test_a_group_that_does_not_train_together_is_run_and_cached_spec_by_spec(tmp_path):
    """Specs that train one by one (L-BFGS) are units of their own: a failing spec costs only itself, and each run
    is cached as it finishes. A vectorised group is one unit, and shares its fate."""
    from mpe.retrain import _fit_together

    good, other = digit_specs()[:2]  # one group: 80 kept examples each
    bad = dict(other, kept=other["kept"][:-1] + [10 ** 6])  # an index out of range: fails where it trains
    for recipe, cached in [(dict(KW, optimizer="lbfgs", lr=1.0), 1), (KW, 0)]:
        with pytest.raises(JobsFailed, match=f"{2 - cached} job"):
            run_specs(fit_subset, [dict(good, train=recipe), dict(bad, train=recipe)], tmp_path / str(cached),
                      progress=False)
        assert len(list((tmp_path / str(cached)).iterdir())) == cached
    # where the specs would train together: a big minibatch does not pay on a CPU, but always on a GPU, which the
    # process that makes the specs need not have; L-BFGS never vectorises
    big = dict(good, model=dict(name="large_mlp"), train=dict(KW, batch_size=80))
    assert not _fit_together(big) and _fit_together(dict(big, device="cuda")) and _fit_together(good)
    assert not _fit_together(dict(big, device="cuda", train=dict(KW, optimizer="lbfgs", lr=1.0)))


def test_spec_jobs_rebuild_what_subset_fits_is_given_and_resume(tmp_path, monkeypatch):
    from mpe.data import from_spec

    d = from_spec(DIGITS)
    specs = digit_specs()
    ref = subset_fits(lambda s: get_model("mlp", d.shape, d.n_classes, seed=s, hidden=[8]), d.x_train, d.y_train,
                      [(torch.tensor(sp["kept"]), sp["seed"]) for sp in specs], KW,
                      lambda net: predict(net, d.x_test).softmax(1), {}, None, progress=False)
    got = run_specs(fit_subset, specs + specs[:1], tmp_path, progress=False)  # a repeated spec runs once
    for a, b in zip(ref + ref[:1], got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert len(list(tmp_path.iterdir())) == 3
    # "removed" names the complement of "kept": the same run
    removed = dict(specs[0], removed=sorted(set(range(120)) - set(specs[0]["kept"])))
    del removed["kept"]
    torch.testing.assert_close(fit_subset(removed), ref[0], rtol=1e-6, atol=1e-7)
    # a second sweep trains nothing: every result comes from the cache
    monkeypatch.setattr(fit_subset, "batched", lambda specs: 1 / 0)
    assert all(torch.equal(a, b) for a, b in zip(run_specs(fit_subset, specs, tmp_path, progress=False), got))


def test_a_job_key_depends_on_the_code_the_job_runs_and_no_other(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n\ndef job(spec):\n    from pkg import c\n    return f(spec)\n")
    (pkg / "b.py").write_text("from . import d as D\nimport pkg.e\ndef f(spec):\n    return spec\n")
    for m in "cde":
        (pkg / f"{m}.py").write_text("x = 1\n")
    (pkg / "unrelated.py").write_text("x = 1\n")
    (pkg / "harness.py").write_text("x = 1\n")  # presentation: never part of a fingerprint
    assert code_closure("a", pkg) == ["__init__", "a", "b", "c", "d", "e"]
    job = SimpleNamespace(__module__="pkg.a")

    def fp():
        return code_fingerprint(job, pkg)

    before = fp()
    (pkg / "unrelated.py").write_text("x = 2\n")
    (pkg / "harness.py").write_text("x = 2\n")
    assert fp() == before
    (pkg / "e.py").write_text("x = 2\n")  # reached through b's `import pkg.e`
    assert fp() != before
    # in this package: fit_subset runs the training code, not the kernels or the plots
    assert {"retrain", "train", "data", "models"} <= set(code_closure("retrain"))
    assert not {"kernels", "fsd", "harness", "plots"} & set(code_closure("retrain"))


def test_a_job_is_a_top_level_function_and_a_json_spec(tmp_path):
    spec = digit_specs()[0]
    assert spec_key(fit_subset, spec) == spec_key(fit_subset, dict(reversed(list(spec.items()))))  # order-free
    assert spec_key(fit_subset, spec) != spec_key(fit_subset, dict(spec, seed=9))
    assert spec_key(fit_subset, spec) != spec_key(fit_subset, dict(spec, device="meta"))  # the device type
    assert spec_key(fit_subset, spec, code_fingerprint(fit_subset)) == spec_key(fit_subset, spec)  # a sweep's one hash
    assert spec_key(fit_subset, spec, "other code") != spec_key(fit_subset, spec)
    with pytest.raises(ValueError, match="top-level function"):
        spec_key(lambda s: s, spec)
    with pytest.raises(ValueError, match="must be JSON"):
        spec_key(fit_subset, dict(spec, kept=torch.arange(3)))
    with pytest.raises(ValueError, match="must be JSON"):
        spec_key(fit_subset, dict(spec, train=dict(KW, lr=float("nan"))))
    # a bad spec is refused before anything trains
    with pytest.raises(ValueError, match="unknown evaluation 'accuracy'"):
        run_specs(fit_subset, [spec, dict(spec, evaluate="accuracy")], tmp_path, progress=False)
    with pytest.raises(ValueError, match="one of kept/removed"):
        run_specs(fit_subset, [dict(spec, removed=[0])], tmp_path, progress=False)
    assert not list(tmp_path.iterdir())
    # a job that fails where it runs is named with its spec; the others finish and are cached
    with pytest.raises(JobsFailed, match="unknown dataset 'nope'(.|\n)*'name': 'nope'"):
        run_specs(fit_subset, [spec, dict(spec, data=dict(DIGITS, name="nope"))], tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [f"{spec_key(fit_subset, spec)}.pt"]
    big = dict(spec, data=dict(DIGITS, name="nope"), kept=list(range(100)))  # the message stays short
    with pytest.raises(JobsFailed, match=r"'name': 'nope'(.|\n)*characters\)") as err:
        run_specs(fit_subset, [big], tmp_path, progress=False)
    assert len(str(err.value)) < 800


def test_a_failed_job_is_named_and_the_others_are_kept(tmp_path):
    def job(i):
        def run():
            if i == 1:
                raise RuntimeError("boom")
            return torch.tensor([i])
        return run

    keys = [job_key(study="fail-test", i=i) for i in range(3)]
    with pytest.raises(JobsFailed, match=r"1 job\(s\) failed, 2 finished(.|\n)*boom(.|\n)*'i': 1") as err:
        run_jobs({k: job(i) for i, k in enumerate(keys)}, tmp_path, progress=False)
    assert list(err.value.failed) == [keys[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{k}.pt" for k in (keys[0], keys[2]))


WRITER = textwrap.dedent("""
    import io, sys, time, torch
    from mpe.retrain import save_result
    real_save = torch.save

    def slow_save(obj, f):  # a write that takes a while, so that the two writers overlap
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            time.sleep(0.02)
            fh.write(data[len(data) // 2:])

    torch.save = slow_save
    path, value = sys.argv[1], float(sys.argv[2])
    for _ in range(25):
        save_result(path, torch.full((100_000,), value))
""")


SHARER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mpe.retrain import run_jobs
    cache, log, go = map(Path, sys.argv[1:])

    def job(name):  # records who trains it, then waits for the test's go
        def run():
            with open(log, "a") as f:
                f.write(f"{name}:{os.getpid()}\\n")
            while not go.exists():
                time.sleep(0.05)
            return name
        return run
    print("ready", flush=True)
    out = run_jobs({name: job(name) for name in ("a", "b")}, cache, progress=False)
    print(out["a"], out["b"], flush=True)
""")


def test_two_processes_that_need_one_sweep_share_it_and_train_each_job_once(tmp_path):
    """Two notebooks that share a cache (make -j) and need the same two runs: while the first trains one, the second
    takes the other; then each reads the other's result. No claim file is left behind."""
    cache, log, go = tmp_path / "cache", tmp_path / "log", tmp_path / "go"

    def start():
        return subprocess.Popen([sys.executable, "-c", SHARER, str(cache), str(log), str(go)], stdout=subprocess.PIPE,
                                text=True)

    first = start()
    while not log.exists():  # the first is training its first job
        assert first.poll() is None
        time.sleep(0.05)
    second = start()
    deadline = time.time() + 60
    while len(log.read_text().split()) < 2 and time.time() < deadline:  # the second takes the job left
        time.sleep(0.05)
    go.touch()
    assert [p.communicate(timeout=60)[0].split()[-2:] for p in (first, second)] == [["a", "b"]] * 2
    trained = dict(line.split(":") for line in log.read_text().split())
    assert len(log.read_text().split()) == 2 and trained["a"] == str(first.pid) and trained["b"] == str(second.pid)
    assert sorted(p.name for p in cache.iterdir()) == ["a.pt", "b.pt"]


def test_a_claim_is_void_once_its_process_is_gone(tmp_path, monkeypatch):
    import socket

    from mpe import retrain

    path = tmp_path / "job.pt"
    file = tmp_path / "job.pt.claim"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for text, void in [(f"{socket.gethostname()} {gone.pid}", True), (f"{socket.gethostname()} {alive.pid}", False),
                           (f"{socket.gethostname()} {os.getpid()}", True),  # this process's, but not held: left over
                           ("another-machine 123", False)]:
            file.write_text(text)
            assert retrain._void(file) == void, text
            assert retrain._claim(path) == void and (file.read_text() == f"{socket.gethostname()} {os.getpid()}") == void
            retrain._unclaim(path)
            assert file.exists() != void  # given up where it was ours; another's is left alone
        old = time.time() - retrain.CLAIM_STALE_S - 1
        os.utime(file, (old, old))  # another machine's claim that nobody refreshed: its process is gone
        assert retrain._void(file)
        # a claim whose process gives up without a result: the job is trained here once the claim is gone
        file.write_text(f"{socket.gethostname()} {alive.pid}")
        monkeypatch.setattr(retrain, "CLAIM_POLL_S", 0.05)
        threading.Timer(0.5, file.unlink).start()
        assert run_jobs({"job": lambda: 7}, tmp_path, progress=False) == {"job": 7}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["job.pt"]
    finally:
        alive.kill()


def _claims_held(queue):
    from mpe import retrain

    queue.put(len(retrain._HELD))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_holds_none_of_its_parents_claims(tmp_path):
    import multiprocessing

    from mpe import retrain

    assert retrain._claim(tmp_path / "job.pt")
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_claims_held, args=(queue,))
        child.start()
        child.join(30)
        assert queue.get(timeout=5) == 0 and len(retrain._HELD) >= 1
    finally:
        retrain._unclaim(tmp_path / "job.pt")


def test_run_jobs_returns_its_results_in_the_order_of_its_jobs(tmp_path):
    run_jobs({"b": lambda: 2}, tmp_path, progress=False)  # cached first: it would come first in finishing order
    assert list(run_jobs({"a": lambda: 1, "b": lambda: 1 / 0}, tmp_path, progress=False).items()) == [("a", 1), ("b", 2)]


def test_two_writers_of_one_key_never_install_a_corrupt_result(tmp_path):
    path = tmp_path / "key.pt"
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(v)], stderr=subprocess.PIPE)
             for v in (1.0, 2.0)]
    seen = set()
    while any(p.poll() is None for p in procs):
        if path.exists():
            t = torch.load(path)  # never half-written: one writer's whole tensor
            assert t.shape == (100_000,) and t.unique().numel() == 1
            seen.add(float(t[0]))
    assert [p.wait() for p in procs] == [0, 0], [p.stderr.read().decode() for p in procs]
    assert float(torch.load(path)[0]) in (1.0, 2.0) and seen <= {1.0, 2.0}
    assert [p.name for p in tmp_path.iterdir()] == ["key.pt"]  # no temporary files left behind


def _square(i):
    return torch.tensor([float(i) ** 2])


def _where(i):
    return i ** 2, os.getpid()


def _mmap_threshold_checked():
    from mpe.retrain import _restore_mmap_threshold

    return _restore_mmap_threshold.cache_info().currsize


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc thresholds")
def test_the_mmap_threshold_is_restored_only_where_a_trim_threshold_turned_it_off():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_, which turns glibc's dynamic mmap threshold off; the worker side
    sets the mmap threshold back to glibc's ceiling, unless the user set one, and does nothing otherwise."""
    code = "from mpe.retrain import _restore_mmap_threshold as r; print(r(), r.cache_info().currsize)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    for extra, want in [({}, "False 1"), ({"MALLOC_TRIM_THRESHOLD_": "65536"}, "True 1"),
                        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "1048576"}, "False 1")]:
        out = subprocess.run([sys.executable, "-c", code], env=dict(env, **extra), capture_output=True, text=True,
                             check=True).stdout.split()
        assert " ".join(out) == want, extra


def test_a_worker_that_sees_several_gpus_says_that_it_uses_one(monkeypatch):
    from mpe.retrain import _check_one_gpu, _on_worker

    for count, warns in [(1, False), (2, True)]:
        _check_one_gpu.cache_clear()
        monkeypatch.setattr(torch.cuda, "device_count", lambda count=count: count)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert _on_worker(_square, 3).item() == 9.0
        assert any("dask-cuda" in str(w.message) for w in seen) == warns
    _check_one_gpu.cache_clear()


def test_dask_local_cluster_gives_the_local_results(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from mpe.retrain import retrained_outputs

    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path / "results"))  # the stash: the workers inherit where it is
    x, y = data()
    kw = dict(epochs=2, lr=0.1, batch_size=16)
    runs = list(zip(subsets(sizes=(40, 30, 40)), [3, 4, 5]))
    local = subset_runs(_fit_and_score(x, y, kw), runs, dict(study="dask"), tmp_path / "local", progress=False)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        remote = subset_runs(_fit_and_score(x, y, kw), runs, dict(study="dask"), tmp_path / "dask", executor=client,
                             progress=False)
        keys = [job_key(study="dask-fail", i=i) for i in range(3)]
        jobs = {k: (lambda i=i: _square(i) if i != 2 else 1 / 0) for i, k in enumerate(keys)}
        with pytest.raises(JobsFailed, match="ZeroDivisionError"):
            run_jobs(jobs, tmp_path / "fail", executor=client, progress=False)
        assert len(list((tmp_path / "fail").iterdir())) == 2  # the finished jobs are cached
        # a scheduler address in $MPE_DASK_SCHEDULER sends every sweep there, with no change to the caller
        monkeypatch.setenv("MPE_DASK_SCHEDULER", cluster.scheduler_address)
        keys = [job_key(study="dask-env", i=i) for i in range(4)]
        out = run_jobs({k: (lambda i=i: _where(i)) for i, k in enumerate(keys)}, None, progress=False)
        assert {out[k][0] for k in keys} == {i ** 2 for i in range(4)}
        assert all(out[k][1] != os.getpid() for k in keys)  # computed in the workers' processes
        _CLIENTS.pop(cluster.scheduler_address).close()
        monkeypatch.delenv("MPE_DASK_SCHEDULER")
        specs = digit_specs("test_correct")  # jobs as data: each worker rebuilds the data and models from the spec
        spec_remote = run_specs(fit_subset, specs, tmp_path / "spec-dask", executor=client, progress=False)
        # warm-started retrains: the workers read the trained network and the data from the stash by name
        net = get_model("mlp", (1, 8, 8), 3, seed=0, hidden=[8]).double()
        warm = (net, x.double(), y, [[0], [1, 2]], x[:5].double(), dict(optimizer="lbfgs", lr=1.0, epochs=5, delta=1.0))
        warm_remote = retrained_outputs(*warm, tmp_path / "warm-dask", executor=client)
        # every unit ran through _on_worker, which restored glibc's mmap threshold once in the worker's process
        assert 1 in client.run(_mmap_threshold_checked).values()
    spec_local = run_specs(fit_subset, specs, tmp_path / "spec-local", progress=False)
    warm_local = retrained_outputs(*warm, tmp_path / "warm-local")
    for a, b in zip([warm_local[0], *warm_local[1]], [warm_remote[0], *warm_remote[1]]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(warm_local[1][1], warm_local[0])  # the removals move the outputs
    assert all(torch.equal(a, b) for a, b in zip(spec_local, spec_remote))
    assert sorted(p.name for p in (tmp_path / "spec-local").iterdir()) == \
        sorted(p.name for p in (tmp_path / "spec-dask").iterdir())
    for a, b in zip(local, remote):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == \
        sorted(p.name for p in (tmp_path / "dask").iterdir())


def test_vectorised_warm_started_retrains_equal_one_by_one_retrains(tmp_path, monkeypatch):
    """retrained_outputs: the vmapped removal retrains give the one-by-one jobs' outputs, leave θ_* in place, and
    write the same cache keys (a second call, one by one, loads every result)."""
    from mpe.retrain import retrained_outputs

    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path / "results"))  # the stash
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(40, 1, 1, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    theta = [p.detach().clone() for p in net.parameters()]
    kw = dict(optimizer="sgd", lr=0.1, epochs=3, batch_size=16, delta=1.0, seed=4)
    groups = [[0], [5, 6], [39]]
    fast = retrained_outputs(net, x, y, groups, x[:7], kw, tmp_path / "v", chunk=2)  # vectorise_pays: a tiny net
    slow = retrained_outputs(net, x, y, groups, x[:7], kw, tmp_path / "s", vectorise=False)
    for a, b in zip([fast[0], *fast[1]], [slow[0], *slow[1]]):
        torch.testing.assert_close(a, b)
    assert all(torch.equal(p, t) for p, t in zip(net.parameters(), theta))
    assert not torch.allclose(fast[1][0], fast[0])  # removing an example moves the outputs
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == sorted(p.name for p in (tmp_path / "s").iterdir())
