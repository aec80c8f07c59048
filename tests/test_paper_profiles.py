"""The paper profile of every notebook, shrunk (params/shrunk/<id>.yaml): same models, optimisers and code path on
tiny data, so that the paper profile cannot silently rot while no GPU runs it. That it runs end to end and writes its
claims is checked, and that it trained what its cost formula (mpe.workload) says; the numbers of a one-epoch run
mean nothing.

``make test`` runs each notebook's paper profile; ``make smoke [DEVICE=cuda]`` (``MPE_SMOKE_DEVICE`` set) also runs
every variant (params/paper/<id>-<variant>.yaml: the CIFAR-10 and Split CIFAR settings, about 15 of the 25
worker-minutes on a 2-core CPU), on that device, where device mix-ups show. The mechanisms only the variants reach
(CIFAR-shaped data, ResNet/WRN models, cutout, the count sketch, Split CIFAR) have unit tests of their own."""
import json
import os

import pytest
import yaml

from mpe import harness, workload

NOTEBOOKS = harness.notebooks()
SMOKE = "MPE_SMOKE_DEVICE" in os.environ  # make smoke: the variants too
SETTINGS = [(nb, v) for nb in NOTEBOOKS for v in ["", *(harness.variants(harness.notebook_id(nb)) if SMOKE else [])]]


@pytest.mark.parametrize("nb,variant", SETTINGS, ids=[harness.figure_id(harness.notebook_id(p), v) for p, v in SETTINGS])
def test_shrunk_paper_profile_runs(nb, variant, tmp_path, monkeypatch):
    fig_id = harness.figure_id(harness.notebook_id(nb), variant)
    shrunk = yaml.safe_load(harness.paper_params_file(fig_id, "shrunk").read_text()) or {}
    paper = yaml.safe_load(harness.paper_params_file(fig_id).read_text()) or {}
    assert set(shrunk) - set(paper) <= set(harness._parameters(harness.repo_root() / nb))
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path / "cache"))
    device = os.environ.get("MPE_SMOKE_DEVICE", "cpu")
    harness.run(nb, "paper", device, output=tmp_path / "out.ipynb", shrunk=True, variant=variant)
    claims = json.loads((tmp_path / "paper" / f"{fig_id}.json").read_text())
    assert claims["profile"] == "paper" and claims["claims"] and claims["id"] == fig_id
    assert (tmp_path / "paper" / f"{fig_id}.png").exists()
    # the notebook trained what its workload formula says (runs exactly; steps and examples within 5 %)
    params = harness.parameters(nb, "paper", device, shrunk=True, variant=variant)
    expected = workload.tally(workload.runs_of(harness.notebook_id(nb), params))
    assert workload.compare(expected, claims["work"]) == []


def test_shrunk_needs_the_paper_profile():
    with pytest.raises(ValueError, match="profile='paper'"):
        harness.run(NOTEBOOKS[0], "quick", shrunk=True)
