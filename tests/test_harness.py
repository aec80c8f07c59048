import json

import matplotlib.pyplot as plt
import pytest

from mpe import get_device, harness
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
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        harness.check_params(dataset="cifar")
    with pytest.raises(ValueError, match="unknown model"):
        harness.check_params(models=["small_mlp", "vgg"])
    with pytest.raises(ValueError, match="positive"):
        harness.check_params(n_train=0)
    assert harness.check_params(profile="quick", dataset="digits", n_train=10, delta=0.5)["n_train"] == 10
    with pytest.raises(ValueError, match="valid choices"):
        get_device("tpu")


def test_claims_verdicts_and_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    c = harness.Claims("mpe-test", "quick")
    assert c.add("rank kept", 0.91, ">=", 0.7)
    assert not c.add("ratio near 1", 0.2, "between", [0.5, 2.0])
    c.add("only at scale", 0.2, "between", [0.5, 2.0], testable=False, why="too small")
    assert c.report() is None
    path = c.path
    rows = json.loads(path.read_text())["claims"]
    assert [r["verdict"] for r in rows] == ["reproduced", "not reproduced", "not testable here"]
    assert "NOT TESTABLE HERE" in capsys.readouterr().out
    (tmp_path / "quick" / "mpe-test.json").write_text(json.dumps(dict(json.loads(path.read_text()), runtime_s=3.5)))
    text = harness.summary("quick").read_text()
    assert "| mpe-test |  | 3.5 | 1 | 1 | 1 |" in text


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
    monkeypatch.setattr(harness, "repo_root", lambda: tmp_path)
    assert harness.variants("mpe-fig1") == ["cifar10", "resnet_nobn"]
    assert harness.variants("mpe-fig10") == []


def test_savefig_is_byte_stable(tmp_path):
    def draw():
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        paths = savefig(fig, "t", root=tmp_path)
        plt.close(fig)
        return [p.read_bytes() for p in paths]

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
    before = path.read_bytes()
    monkeypatch.setattr(harness, "repo_root", lambda: tmp_path)
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path / "figures"))
    with pytest.raises(Exception, match="boom"):
        harness.references(["notebooks/mpe/broken.ipynb"])
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["broken.ipynb"]
