"""Cost formulas: tallies by hand, the comparison with a measured ledger, and the table of every figure."""
import pytest

from mpe import harness, workload
from mpe.workload import Runs, lbfgs


def test_tally_counts_steps_and_examples_by_hand():
    runs = [Runs("lenet5", 2, 100, 3, 32), Runs("lenet5", 1, 50, 4, 32), Runs("lenet5", 1, 20, 5, 64),
            lbfgs("small_mlp", 3, 1000, 50)]
    assert workload.tally(runs) == {
        "lenet5 @ 32": dict(runs=3, steps=2 * 3 * 4 + 4 * 2, examples=2 * 3 * 100 + 4 * 50, bound=False),
        "lenet5 @ full": dict(runs=1, steps=5, examples=100, bound=False),  # a batch of 64 > 20 examples is full
        "small_mlp @ full": dict(runs=3, steps=150, examples=150_000, bound=True)}


def test_compare_names_every_disagreement():
    expected = workload.tally([Runs("m", 2, 100, 3, 10), lbfgs("m", 1, 50, 20)])
    ok = {"m @ 10": dict(runs=2, steps=60, examples=600), "m @ full": dict(runs=1, steps=7, examples=350)}
    assert workload.compare(expected, ok) == []
    assert workload.compare(expected, dict(ok, **{"m @ 10": dict(runs=2, steps=63, examples=600)})) == []  # within 5 %
    bad = {"m @ 10": dict(runs=3, steps=70, examples=600), "m @ full": dict(runs=1, steps=21, examples=1050),
           "n @ 5": dict(runs=1, steps=1, examples=5)}
    problems = workload.compare(expected, bad)
    assert problems == ["m @ 10: formula 2 runs, measured 3", "m @ 10: formula 60 steps, measured 70",
                        "m @ full: formula at most 20 steps, measured 21",
                        "m @ full: formula at most 1000 examples, measured 1050",
                        "n @ 5: formula None, measured {'runs': 1, 'steps': 1, 'examples': 5}"]


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
    assert workload.tally([sweep]) == workload.tally([Runs("small_mlp", 40, 1000, 2, 100)])  # the ledger counts runs


def test_an_lbfgs_iteration_costs_at_least_its_measured_floor():
    est = workload.estimate([lbfgs("small_mlp", 2, 100, 50)], {("small_mlp", 8): 1e-3, ("small_mlp", 512): 2e-3})
    assert est["gpu_hours"] == pytest.approx(2 * 50 * workload.LBFGS_ITERATION_FLOOR_S / 3600)
    assert est["steps"] == 100
