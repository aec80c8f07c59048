"""Cost formulas: tallies by hand, the comparison with a measured ledger, and the table of every figure."""
import pytest

from mpe import harness, workload
from mpe.workload import Runs, lbfgs


def test_tally_counts_steps_and_examples_by_hand():
    runs = [Runs("lenet5", 2, 100, 3, 32, jobs=True), Runs("lenet5", 1, 50, 4, 32), Runs("lenet5", 1, 20, 5, 64),
            lbfgs("small_mlp", 3, 1000, 50), Runs("small_mlp", 4, 10, 1, 5, stacked=True)]
    assert workload.tally(runs) == {
        "lenet5 @ 32": dict(runs=3, steps=2 * 3 * 4 + 4 * 2, examples=2 * 3 * 100 + 4 * 50, jobs=2, bound=False),
        "lenet5 @ full": dict(runs=1, steps=5, examples=100, jobs=0, bound=False),  # a batch of 64 > 20 is full
        "small_mlp @ 5": dict(runs=4, steps=8, examples=40, jobs=4, bound=False),  # a stacked sweep's runs are jobs
        "small_mlp @ full": dict(runs=3, steps=150, examples=150_000, jobs=0, bound=True)}


def test_compare_names_every_disagreement():
    expected = workload.tally([Runs("m", 2, 100, 3, 10, jobs=True), lbfgs("m", 1, 50, 20)])
    ok = {"m @ 10": dict(runs=2, steps=60, examples=600, jobs=2), "m @ full": dict(runs=1, steps=7, examples=350, jobs=0)}
    assert workload.compare(expected, ok) == []
    assert workload.compare(expected, dict(ok, **{"m @ 10": dict(runs=2, steps=63, examples=600, jobs=2)})) == []  # 5 %
    bad = {"m @ 10": dict(runs=3, steps=70, examples=600, jobs=1), "m @ full": dict(runs=1, steps=21, examples=1050,
                                                                                   jobs=1),
           "n @ 5": dict(runs=1, steps=1, examples=5, jobs=0)}
    problems = workload.compare(expected, bad)
    assert problems == ["m @ 10: formula 2 runs, measured 3", "m @ 10: formula 2 runs as a sweep's jobs, measured 1",
                        "m @ 10: formula 60 steps, measured 70",
                        "m @ full: formula at most 0 runs as a sweep's jobs, measured 1",
                        "m @ full: formula at most 20 steps, measured 21",
                        "m @ full: formula at most 1000 examples, measured 1050",
                        "n @ 5: formula None, measured {'runs': 1, 'steps': 1, 'examples': 5, 'jobs': 0}"]


def test_train_sizes_match_the_data_sets():
    from mpe.data import load

    for name in ("digits", "mnist5k", "synthetic-cifar10"):
        assert len(load(name).y_train) == workload.TRAIN_SIZES[name]


def test_every_notebook_has_a_formula_and_the_stored_cost_table_is_current():
    ids = {harness.notebook_id(nb) for nb in harness.notebooks()}
    assert ids == set(workload.FORMULAS)
    text = harness.cost("paper")
    assert (harness.repo_root() / "figures" / "paper" / "COST.md").read_text() == text, \
        "figures/paper/COST.md is stale: python -m mpe.harness cost --out figures/paper/COST.md"
    for nb in harness.notebooks():
        for v in ["", *harness.variants(harness.notebook_id(nb))]:
            assert f"| {harness.figure_id(harness.notebook_id(nb), v)} |" in text


def test_step_seconds_use_a_measured_table_else_the_flop_model():
    table = {("lenet5", 64): 0.01, ("lenet5", 256): 0.03}
    for batch, want in ((8, 0.01), (64, 0.01), (128, 0.01 + 64 * 0.02 / 192), (256, 0.03), (1024, 0.03 + 768 * 0.02 / 192)):
        assert workload.step_seconds("lenet5", batch, table) == (pytest.approx(want), True)  # flat, linear, the slope on
    assert workload.step_seconds("wrn28_10", 8, table) == workload.step_seconds("wrn28_10", 8)  # not in it: FLOPs
    t, known = workload.step_seconds("wrn28_10", 128)
    flops = workload.forward_flops("wrn28_10")
    assert flops == pytest.approx(2 * 5.25e9, rel=0.02)  # WRN-28-10: 5.25 G multiply-adds per 32x32 image
    assert known and t == pytest.approx(3 * flops * 128 / workload.ASSUMED_FLOPS)
    assert workload.step_seconds("no_such_model", 8) == (workload.ASSUMED_STEP_FLOOR_S, False)
    est = workload.estimate([Runs("no_such_model", 2, 10, 3, 5)])
    assert est["steps"] == 12 and est["lower_bound"] == ["no_such_model"]
    assert est["gpu_hours"] == pytest.approx(12 * workload.ASSUMED_STEP_FLOOR_S / 3600)


def test_model_sizes_by_hand_and_the_memory_of_a_run():
    # MPE's MLP(32, 16) on MNIST: 784·32 + 32 + 32·16 + 16 + 16·10 + 10 parameters; the leaf outputs of one example are
    # the flattened image, then 32, 32 (tanh), 16, 16 (tanh) and 10 logits
    assert workload.model_size("small_mlp") == (25818, 784 + 32 + 32 + 16 + 16 + 10, 784)
    assert workload.model_size("no_such_model") is None
    params, acts, inputs = workload.model_size("small_mlp")
    assert workload.peak_bytes(Runs("small_mlp", 3, 1000, 5, 100)) == 4.0 * (1000 * 784 + 4 * params + 100 * acts)
    assert workload.peak_bytes(lbfgs("small_mlp", 1, 1000, 5)) == 4.0 * (1000 * 784 + 4 * params + 1000 * acts)
    est = workload.estimate([Runs("small_mlp", 1, 1000, 1, 100), Runs("no_such_model", 1, 10, 1, 5)])
    assert est["peak_gb"] == pytest.approx(workload.peak_bytes(Runs("small_mlp", 1, 1000, 1, 100)) / 1e9)
    assert est["lower_bound"] == ["no_such_model"]


def test_a_stacked_sweep_is_timed_as_steps_of_many_models_at_once():
    table = {("small_mlp", 100): 0.01, ("small_mlp", 3200): 0.02, ("resnet18", 100): 0.01}
    sweep = Runs("small_mlp", 40, 1000, 2, 100, stacked=True)  # 40 runs of 2 epochs of 10 steps: 32 + 8 per step
    assert workload.stack_of(sweep) == 32 and workload.stackable("small_mlp") and not workload.stackable("resnet18")
    t8 = workload.step_seconds("small_mlp", 800, table)[0]
    assert workload.estimate([sweep], table)["gpu_hours"] == pytest.approx(20 * (0.02 + t8) / 3600)
    assert workload.estimate([Runs("resnet18", 40, 1000, 2, 100, stacked=True)], table)["gpu_hours"] == \
        pytest.approx(40 * 20 * 0.01 / 3600)  # BatchNorm: one run after another
    one = workload.peak_bytes(Runs("small_mlp", 1, 1000, 2, 100))
    params, acts, _ = workload.model_size("small_mlp")
    assert workload.peak_bytes(sweep) - one == pytest.approx(4.0 * 31 * (4 * params + 100 * acts))
    assert workload.tally([sweep]) == workload.tally([Runs("small_mlp", 40, 1000, 2, 100, jobs=True)])  # counts runs


def test_hours_on_many_gpus_spread_a_sweeps_programs_in_waves():
    table = {("small_mlp", 100): 0.01, ("small_mlp", 3200): 0.02, ("resnet18", 100): 0.01}
    run = 20 * 0.01 / 3600  # one resnet18 run: 2 epochs of 10 steps of 10 ms
    assert workload.wall_hours(Runs("resnet18", 5, 1000, 2, 100), 8, table) == pytest.approx(5 * run)  # the notebook's own
    assert workload.wall_hours(Runs("resnet18", 20, 1000, 2, 100, jobs=True), 8, table) == pytest.approx(3 * run)  # 8+8+4
    assert workload.wall_hours(Runs("resnet18", 20, 1000, 2, 100, jobs=True, sweeps=2), 8, table) == \
        pytest.approx(4 * run)  # two sweeps of 10, one after another: 8 + 2 each
    assert workload.wall_hours(Runs("resnet18", 7, 1000, 2, 100, jobs=True, sweeps=3), 8, table) == \
        pytest.approx(3 * run)  # 3, 2 and 2 runs: one wave each
    def t(models):  # one program of that many small_mlp models: 2 epochs of 10 steps
        return 20 * workload.step_seconds("small_mlp", 100 * models, table)[0] / 3600

    sweep = Runs("small_mlp", 40, 1000, 2, 100, stacked=True)
    assert workload.wall_hours(sweep, 1, table) == pytest.approx(t(32) + t(8))  # one GPU: 32 models, then 8
    assert workload.stack_of(sweep, 40, 8) == 5 and workload.wall_hours(sweep, 8, table) == pytest.approx(t(5))  # 8 x 5
    assert workload.wall_hours(sweep, 3, table) == pytest.approx(t(14))  # 14, 14 and 12 side by side
    assert workload.wall_hours(Runs("small_mlp", 64, 1000, 2, 100, stacked=True), 2, table) == pytest.approx(t(32))
    assert workload.wall_hours(Runs("small_mlp", 72, 1000, 2, 100, stacked=True), 2, table) == \
        pytest.approx(t(32) + t(8))  # 32 and 32 fill both GPUs; the 8 left over come after
    # one GPU: the hours are the GPU-hours, for every notebook of the paper profile
    for nb in harness.notebooks():
        runs = workload.runs_of(harness.notebook_id(nb), harness.parameters(nb, "paper"))
        est = workload.estimate(runs, table, gpus=1)
        assert est["wall_hours"] == pytest.approx(est["gpu_hours"])
        assert workload.estimate(runs, table, gpus=8)["wall_hours"] <= est["gpu_hours"] * (1 + 1e-12)
    with pytest.raises(ValueError, match="gpus must be at least 1"):
        harness.cost("paper", gpus=0)


def test_an_lbfgs_iteration_costs_at_least_its_measured_floor():
    est = workload.estimate([lbfgs("small_mlp", 2, 100, 50)], {("small_mlp", 8): 1e-3, ("small_mlp", 512): 2e-3})
    assert est["gpu_hours"] == pytest.approx(2 * 50 * workload.LBFGS_ITERATION_FLOOR_S / 3600)
    assert est["steps"] == 100
