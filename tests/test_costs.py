"""tests/costs.py: the seconds per file that order make test's work, read from a JUnit report."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import costs  # noqa: E402


def test_costs_sum_a_notebooks_cells_and_a_modules_tests(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="notebooks.mpe.fig2_estimated.ipynb" name="Cell 0" time="1.5"/>
<testcase classname="notebooks.mpe.fig2_estimated.ipynb" name="Cell 1" time="2.0"/>
<testcase classname="tests.test_data" name="test_a" time="0.25"/>
<testcase classname="tests.test_data" name="test_b[x.y]" time="0.5"/>
<testcase classname="tests.test_models.TestShapes" name="test_c" time="3.0"/>
</testsuite></testsuites>""")
    assert costs.costs(str(report)) == {"notebooks/mpe/fig2_estimated.ipynb": 3.5, "tests/test_models.py": 3.0,
                                        "tests/test_data.py": 0.75}


def test_the_stored_costs_name_files_that_exist():
    import json

    root = Path(__file__).parent.parent
    seconds = json.loads((Path(__file__).parent / "costs.json").read_text())["seconds"]
    missing = [f for f in seconds if not (root / f).exists()]
    assert not missing, f"tests/costs.json names files that are gone (refresh it: python tests/costs.py ...): {missing}"
