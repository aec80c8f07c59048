import json

import matplotlib.pyplot as plt
import pytest

from pathlib import Path

from mpe import get_device, harness, stats
from mpe.plots import savefig


def test_parameter_validation_names_valid_choices():
    with pytest.raises(ValueError, match="valid choices: quick, paper"):
        harness.check_params(profile="fast")
    with pytest.raises(ValueError, match="valid choices: cpu, cuda, mps, auto"):
        harness.check_params(device="gpu")
    with pytest.raises(ValueError, match="valid choices: none, crop_flip"):
        harness.check_params(augment="cutout")
    with pytest.raises(ValueError, match="sketch must be None"):
        harness.check_params(sketch=0.5)
    assert harness.check_params(sketch=None)["sketch"] is None
    with pytest.raises(ValueError, match="lams must be a positive number, got 0"):
        harness.check_params(lams=[1.0, 0])
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        harness.check_params(dataset="cifar")
    with pytest.raises(ValueError, match="unknown model"):
        harness.check_params(models=["small_mlp", "vgg"])
    with pytest.raises(ValueError, match="positive"):
        harness.check_params(n_train=0)
    assert harness.check_params(profile="quick", dataset="digits", n_train=10, delta=0.5)["n_train"] == 10
    with pytest.raises(ValueError, match="valid choices"):
        get_device("tpu")


def test_claims_verdicts_follow_the_interval_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    c = harness.Claims("mpe-test", "quick")
    assert c.add("rank kept", stats.Estimate(0.91, 0.8, 0.95, "seeds"), ">=", 0.7, source="paper") == "reproduced"
    assert c.add("ratio near 1", stats.Estimate(0.2, 0.1, 0.3, "seeds"), "between", [0.5, 2.0], source="paper",
                 why="scale") == "not reproduced"
    assert c.add("knife edge", stats.Estimate(0.85, 0.80, 0.90, "seeds"), ">=", 0.85,
                 source="reconstructed") == "inconclusive"
    assert c.add("a single run", 0.99, ">=", 0.5, source="companion") == "inconclusive"  # no interval: never a pass
    c.add("only at scale", 0.2, "between", [0.5, 2.0], source="paper", testable=False, why="too small")
    c.add("true by construction", stats.exact(0), "<=", 0, source="sanity")
    with pytest.raises(ValueError, match="no why"):
        c.add("unexplained failure", stats.exact(0.1), ">=", 0.5, source="paper")
    with pytest.raises(ValueError, match="valid choices: paper"):
        c.add("whose?", stats.exact(1), ">=", 0.5, source="folklore")
    assert c.report() is None
    rows = json.loads(c.path.read_text())["claims"]
    assert [r["verdict"] for r in rows] == ["reproduced", "not reproduced", "inconclusive", "inconclusive",
                                            "not testable here", "reproduced"]
    assert all(r["why"] for r in rows if r["verdict"] != "reproduced")
    out = capsys.readouterr().out
    assert "- [reconstructed] knife edge\n    measured 0.85 [0.80, 0.90] (seeds) <- needs >= 0.85" in out
    assert "-> INCONCLUSIVE: the interval straddles the threshold: within noise at this scale" in out
    (tmp_path / "quick" / "mpe-test.json").write_text(json.dumps(dict(json.loads(c.path.read_text()), runtime_s=3.5)))
    text = harness.summary("quick").read_text()
    # paper claims (paper + reconstructed): 1 R, 1 NR, 1 I, 1 NT; companion: 1 I; the sanity row is not counted
    assert "| mpe-test |  | ok | 3.5 | 1 / 1 / 1 / 1 | 0 / 0 / 1 / 0 |" in text
    assert "paper claims: 1 reproduced, 1 not reproduced, 1 inconclusive, 1 not testable here" in text
    assert "work" not in json.loads(c.path.read_text())  # quick runs are mostly cached: their ledger means nothing


def test_paper_claims_record_the_training_this_run_did(tmp_path, monkeypatch):
    from mpe.train import WORK

    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    WORK.clear()
    WORK.append(dict(model="lenet5", optimizer="sgd", n=100, batch_size=64, epochs=3, steps=6, vectorised=1))
    c = harness.Claims("mpe-test", "paper")
    c.add("true by construction", stats.exact(0), "<=", 0, source="sanity")
    c.report()
    WORK.clear()
    assert json.loads(c.path.read_text())["work"] == {"lenet5 @ 64": dict(runs=1, steps=6, examples=300, jobs=0)}


def test_a_failing_notebook_is_recorded_and_its_old_claims_not_counted(tmp_path, monkeypatch, capsys):
    """run() records the failure (status, the cell's exception) beside the claims, keeps the executed notebook under
    *.failed.ipynb (so make does not take it as built) and raises; the summary lists it and does not count the claims
    an earlier run left."""
    import papermill as pm

    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    nb = "notebooks/mpe/theorems_exact_cases.ipynb"
    c = harness.Claims("mpe-theorems", "quick")
    c.add("from an earlier run", stats.exact(1.0), ">=", 0.5, source="paper")
    out = tmp_path / "run.ipynb"

    def broken(src, dst, **kw):
        Path(dst).write_text("{}")
        err = pm.PapermillExecutionError(3, 1, "1 / 0", "ZeroDivisionError", "division by zero", [])
        raise err

    monkeypatch.setattr(pm, "execute_notebook", broken)
    with pytest.raises(RuntimeError, match="mpe-theorems failed .*ZeroDivisionError: division by zero.*failed.ipynb"):
        harness.run(nb, output=out)
    assert not out.exists() and out.with_suffix(".failed.ipynb").exists()
    data = json.loads((tmp_path / "quick" / "mpe-theorems.json").read_text())
    assert data["status"] == "failed" and data["error"] == "ZeroDivisionError: division by zero"
    text = harness.summary("quick").read_text()
    assert "| mpe-theorems |" in text and "| failed: ZeroDivisionError: division by zero |" in text
    assert "**Failed**: 1 (mpe-theorems)" in text and "paper claims: 0 reproduced" in text
    assert "FAILED mpe-theorems: ZeroDivisionError" in capsys.readouterr().err
    monkeypatch.setattr(pm, "execute_notebook", lambda src, dst, **kw: Path(dst).write_text("{}"))
    harness.run(nb, output=out)  # a later success clears the error
    data = json.loads((tmp_path / "quick" / "mpe-theorems.json").read_text())
    assert data["status"] == "ok" and "error" not in data


def test_printed_claims_are_stable_after_sanitising(tmp_path, monkeypatch, capsys):
    """nbval masks measured values and verdicts (compare() judges those): two kernel paths print the same claims."""
    import re

    from nbval.plugin import get_sanitize_patterns

    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    subs = get_sanitize_patterns(Path(__file__).with_name("nbval_sanitize.cfg").read_text())

    def printed(est, source="paper"):
        c = harness.Claims("mpe-test", "quick")
        c.add("accuracy rises", est, ">=", 0.5, source=source, why="small")
        c.add("a second claim", stats.exact(1.0), ">=", 0.5, source="companion")
        c.report()
        text = capsys.readouterr().out
        for regex, rep in subs:
            text = re.sub(regex, rep, text)
        return text

    a = printed(stats.Estimate(0.91, 0.85, 0.97, "5 seeds"))
    assert a == printed(stats.Estimate(0.47, 0.3, 0.6, "5 seeds")) and "0.9" not in a
    assert a == "- [paper] accuracy rises\n    VERDICT\n- [companion] a second claim\n    VERDICT\n"
    assert printed(stats.Estimate(0.91, 0.85, 0.97, "5 seeds"), source="companion") != a  # the source is compared


def test_compare_allows_one_step_and_fails_contradictions(tmp_path, capsys):
    def write(folder, verdicts, threshold=0.5):
        folder.mkdir(parents=True, exist_ok=True)
        rows = [dict(claim=f"c{i}", source="paper", op=">=", threshold=threshold, verdict=v) for i, v in enumerate(verdicts)]
        (folder / "mpe-x.json").write_text(json.dumps(dict(id="mpe-x", claims=rows)))

    ref, run = tmp_path / "ref", tmp_path / "run"
    write(ref, ["reproduced", "inconclusive", "not reproduced", "not testable here"])
    write(run, ["inconclusive", "not reproduced", "inconclusive", "not testable here"])
    assert harness.compare(run, ref) == []
    assert capsys.readouterr().out.count("within noise") == 3
    write(run, ["not reproduced", "inconclusive", "not reproduced", "reproduced"])
    assert len(harness.compare(run, ref)) == 2  # a jump across, and a change of testability
    write(run, ["reproduced", "inconclusive", "not reproduced", "not testable here"], threshold=0.6)
    assert all("threshold" in f for f in harness.compare(run, ref)) and len(harness.compare(run, ref)) == 4
    assert harness.main(["compare", str(run), "--reference", str(ref)]) == 1


def test_setup_table_lists_every_parameter_with_three_sources(tmp_path, monkeypatch):
    import nbformat

    (tmp_path / "Makefile").touch()
    for folder, text in (("paper", "n_train: 60000\nlr: 0.1\n"), ("published", "n_train: 60000\n")):
        (tmp_path / "params" / folder).mkdir(parents=True)
        (tmp_path / "params" / folder / "mpe-figx.yaml").write_text(text)
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("profile = 'quick'\nn_train = 500\nlr = 0.05\nseeds = [0, 1]")
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    (tmp_path / "notebooks" / "mpe").mkdir(parents=True)
    nbformat.write(nb, tmp_path / "notebooks" / "mpe" / "figx_demo.ipynb")
    monkeypatch.setattr(harness, "repo_root", lambda: tmp_path)
    n_train, lr, seeds = 500, 0.05, [0, 1]  # noqa: F841 (read from this frame, like a notebook's globals)
    df = harness.setup_table("mpe-figx", {"model": "mlp"}, namespace=locals())
    assert list(df.columns) == ["paper (published)", "paper profile", "this run", "note"]
    assert df.loc["n_train"].tolist()[:3] == ["60000", "60000", "500"]
    assert df.loc["seeds", "this run"] == "[0, 1]" and df.loc["model", "this run"] == "mlp"
    assert df.loc["lr", "paper (published)"] == "–" and "profile" not in df.index


def test_run_validates_command_line_parameters_before_work(capsys):
    nb = "notebooks/mpe/theorems_exact_cases.ipynb"
    assert harness.main(["run", nb, "-p", "n_trian", "5"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) n_trian" in err and "the notebook declares" in err
    assert harness.main(["run", nb, "-p", "device", "tpu"]) == 2
    assert "valid choices: cpu" in capsys.readouterr().err


def test_clean_notebook_drops_progress_bars_and_keeps_warnings(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    bar = "\r  0%|          | 0/3 [00:00<?, ?it/s]\r 33%|███▎      | 1/3 [00:01<00:02, 1.00s/it]"
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=bar),
                    nbformat.v4.new_output("stream", name="stderr", text=bar + "\nUserWarning: a real one\n"),
                    nbformat.v4.new_output("stream", name="stdout", text="kept\n")]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {"a1": {}}, "version_major": 2}}
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "a.ipynb")
    harness.clean_notebook(tmp_path / "a.ipynb")
    cleaned = nbformat.read(tmp_path / "a.ipynb", as_version=4)
    assert [o["text"] for o in cleaned.cells[0].outputs] == ["UserWarning: a real one\n", "kept\n"]
    assert "widgets" not in cleaned.metadata and cleaned.metadata["kernelspec"]["name"] == "python3"


def test_notebook_id():
    assert harness.notebook_id("notebooks/mpe/fig2_estimated_vs_true_deviation.ipynb") == "mpe-fig2"
    assert harness.figure_id("mpe-fig2") == "mpe-fig2"
    assert harness.figure_id("mpe-fig2", "cifar10") == "mpe-fig2-cifar10"
    with pytest.raises(ValueError, match="lower-case"):
        harness.figure_id("mpe-fig2", "../x")


def test_variants_are_found_by_file_name(tmp_path, monkeypatch):
    (tmp_path / "Makefile").touch()
    (tmp_path / "params" / "paper").mkdir(parents=True)
    for name in ("mpe-fig1", "mpe-fig1-cifar10", "mpe-fig10", "mpe-fig1-resnet_nobn"):
        (tmp_path / "params" / "paper" / f"{name}.yaml").touch()
    (tmp_path / "params" / "quick").mkdir()
    (tmp_path / "params" / "quick" / "mpe-fig1-digits.yaml").touch()
    monkeypatch.setattr(harness, "repo_root", lambda: tmp_path)
    assert harness.variants("mpe-fig1") == ["cifar10", "resnet_nobn"]
    assert harness.variants("mpe-fig10") == []
    assert harness.variants("mpe-fig1", "quick") == ["digits"]
    assert harness.variants("mpe-fig10", "quick") == []


def test_a_quick_variant_changes_only_what_its_file_names():
    """The quick profile's variant = the notebook's own defaults, overridden by params/quick/<id>-<variant>.yaml."""
    import yaml

    nb = "notebooks/compare/attribution_mnist.ipynb"
    main = harness.parameters(nb, "quick")
    for v in harness.variants("compare-attribution", "quick"):
        changed = yaml.safe_load(harness.paper_params_file(f"compare-attribution-{v}", "quick").read_text())
        assert harness.parameters(nb, "quick", variant=v) == main | changed | {"variant": v}
        harness.check_params(**harness.parameters(nb, "quick", variant=v, defaults=False))  # what run() checks
    with pytest.raises(ValueError, match="no quick-profile variant 'imagenet'"):
        harness.parameters(nb, "quick", variant="imagenet")


def test_savefig_is_byte_stable(tmp_path):
    def draw():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        assert savefig(fig, "t", root=tmp_path) is None  # a cell ending in it shows no paths
        plt.close(fig)
        return [(tmp_path / f"t.{ext}").read_bytes() for ext in ("png", "pdf")]

    assert draw() == draw()


def test_run_rejects_unknown_profile_and_parameters(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="valid choices: quick, paper"):
        harness.run("notebooks/mpe/exact_cases_theorems.ipynb", profile="huge")
    with pytest.raises(FileNotFoundError, match="no notebook"):
        harness.run("notebooks/mpe/nothing.ipynb")
    with pytest.raises(ValueError, match="no paper-profile variant 'imagenet'"):
        harness.run("notebooks/mpe/theorems_exact_cases.ipynb", profile="paper", variant="imagenet")


def test_every_notebook_is_wired_into_the_harness():
    """Each notebook has a parameters cell with profile/device, a claims cell, and a paper-profile file naming only
    parameters that the notebook declares (so `make figures PROFILE=paper` cannot fail on a stale name)."""
    import nbformat
    import papermill as pm
    import yaml

    nbs = harness.notebooks()
    assert nbs, "no notebooks found"
    for nb in nbs:
        path = harness.repo_root() / nb
        declared = pm.inspect_notebook(str(path))
        assert {"profile", "device"} <= set(declared), nb
        nb_id = harness.notebook_id(nb)
        paper = harness.paper_params_file(nb_id)
        assert paper.exists(), f"{nb}: missing {paper}"
        assert set(yaml.safe_load(paper.read_text()) or {}) <= set(declared), nb
        for v in harness.variants(nb_id):
            assert "variant" in declared, f"{nb}: has paper variants but no variant parameter"
            for folder in ("paper", "shrunk"):
                f = harness.paper_params_file(harness.figure_id(nb_id, v), folder)
                assert f.exists() and set(yaml.safe_load(f.read_text()) or {}) <= set(declared), f
        for v in harness.variants(nb_id, "quick"):
            assert "variant" in declared, f"{nb}: has quick variants but no variant parameter"
            f = harness.paper_params_file(harness.figure_id(nb_id, v), "quick")
            assert set(yaml.safe_load(f.read_text()) or {}) <= set(declared), f
        cells = nbformat.read(path, as_version=4).cells
        assert any("NBVAL_CHECK_OUTPUT" in c.source for c in cells if c.cell_type == "code"), nb
        params = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{nb}: needs exactly one cell tagged 'parameters'"
        for line in params[0].source.splitlines():  # papermill cannot parse a comment holding "=" or an apostrophe
            comment = line.split("#", 1)[1] if "#" in line else ""
            assert "=" not in comment and "'" not in comment, f"{nb}: papermill cannot parse {line!r}"


def test_failing_reference_run_leaves_the_notebook_untouched(tmp_path, monkeypatch):
    import nbformat

    (tmp_path / "Makefile").touch()
    path = tmp_path / "notebooks" / "mpe" / "broken.ipynb"
    path.parent.mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('profile = "quick"\ndevice = "cpu"',
                                                                    metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("raise RuntimeError('boom')")],
                                  metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nbformat.write(nb, path)
    nb.cells[1] = nbformat.v4.new_code_cell("print('fine')")
    nbformat.write(nb, path.with_name("fine.ipynb"))
    before = path.read_bytes()
    monkeypatch.setattr(harness, "repo_root", lambda: tmp_path)
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path / "figures"))
    with pytest.raises(RuntimeError, match=r"(?s)1 notebook.*broken.ipynb.*boom"):
        harness.references(["notebooks/mpe/broken.ipynb", "notebooks/mpe/fine.ipynb"])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["broken.ipynb", "fine.ipynb"]
    # the notebook after the failing one still ran, and its outputs are stored
    assert nbformat.read(path.with_name("fine.ipynb"), as_version=4).cells[1].outputs[0]["text"] == "fine\n"
