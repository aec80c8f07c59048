"""Refresh tests/costs.json, the order in which ``make test`` hands out its files, from the JUnit report of a run:

    python tests/costs.py build/test-junit.xml "clean clone at <commit>, 2 cores"

Seconds are summed per file (a notebook's cells, a module's tests); see ``pytest_collection_modifyitems`` in
conftest.py."""
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def costs(report: str) -> dict[str, float]:
    """{file: seconds} from a pytest JUnit XML report, longest first. JUnit names a test's file by its dotted
    ``classname`` (``notebooks.mpe.fig2.ipynb``, ``tests.test_data`` or ``tests.test_data.TestClass``)."""
    out = defaultdict(float)
    for case in ET.parse(report).iter("testcase"):
        parts = case.get("classname", "").split(".")
        if "ipynb" in parts:
            file = "/".join(parts[:parts.index("ipynb")]) + ".ipynb"
        else:
            n = next(i for i, p in enumerate(parts) if p.startswith("test_")) + 1
            file = "/".join(parts[:n]) + ".py"
        out[file] += float(case.get("time", 0))
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    report, what = sys.argv[1], sys.argv[2]
    target = Path(__file__).with_name("costs.json")
    seconds = {k: round(v, 1) for k, v in costs(report).items()}
    target.write_text(json.dumps({"measured": what, "seconds": seconds}, indent=1) + "\n")
    print(f"{target}: {len(seconds)} files, {sum(seconds.values()) / 60:.0f} worker-minutes")
