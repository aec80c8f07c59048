"""The paper profile of every notebook, shrunk (params/shrunk/<id>.yaml): same models, optimisers and code path on
tiny data, so that the paper profile cannot silently rot while no GPU runs it. Only that it runs end to end and
writes its claims is checked: the numbers of a one-epoch run mean nothing."""
import json

import pytest
import yaml

from mpe import harness

NOTEBOOKS = harness.notebooks()


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=[harness.notebook_id(p) for p in NOTEBOOKS])
def test_shrunk_paper_profile_runs(nb, tmp_path, monkeypatch):
    nb_id = harness.notebook_id(nb)
    shrunk = yaml.safe_load((harness.repo_root() / "params" / "shrunk" / f"{nb_id}.yaml").read_text()) or {}
    paper = yaml.safe_load(harness.paper_params_file(nb_id).read_text()) or {}
    assert set(shrunk) - set(paper) <= set(harness._parameters(harness.repo_root() / nb))
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path / "cache"))
    harness.run(nb, "paper", "cpu", output=tmp_path / "out.ipynb", shrunk=True)
    claims = json.loads((tmp_path / "paper" / f"{nb_id}.json").read_text())
    assert claims["profile"] == "paper" and claims["claims"]
    assert (tmp_path / "paper" / f"{nb_id}.png").exists()


def test_shrunk_needs_the_paper_profile():
    with pytest.raises(ValueError, match="profile='paper'"):
        harness.run(NOTEBOOKS[0], "quick", shrunk=True)
