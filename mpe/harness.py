"""The notebook harness: parameter validation, the "paper vs this run" table, claims checks, and the runner.

Command line (used by the Makefile)::

    python -m mpe.harness run NOTEBOOK [--profile quick|paper] [--device cpu|cuda|mps|auto] [--shrunk]
    python -m mpe.harness references NOTEBOOK...      # re-execute in place (quick) = refresh nbval references
    python -m mpe.harness summary [--profile quick]   # figures/<profile>/SUMMARY.md from the claims files
    python -m mpe.harness list                        # notebooks and their ids

A notebook ``notebooks/<paper>/<id>_<what>.ipynb`` has the id ``<paper>-<id>``; its outputs are
``figures/<profile>/<paper>-<id>.{png,pdf,csv,md,json}``. The paper profile's parameters live in
``params/paper/<paper>-<id>.yaml`` and are passed to papermill with ``-f``.

**Variants.** Where a paper runs the same figure in a second setting (CIFAR-10 / ResNet-18 beside MNIST), the
setting is a self-contained file ``params/paper/<paper>-<id>-<variant>.yaml`` (plus its shrunk smoke test under
``params/shrunk/``). The notebook receives ``variant="<variant>"`` and writes its outputs under the figure id
``<paper>-<id>-<variant>`` (:func:`figure_id`). ``make figures PROFILE=paper`` runs every variant.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

__all__ = ["PROFILES", "repo_root", "figures_dir", "check_choice", "check_params", "notebook_id", "figure_id",
           "variants", "setup_table", "Claims", "save_table", "main"]

PROFILES = ("quick", "paper")
VERDICTS = ("reproduced", "not reproduced", "not testable here")


def repo_root() -> Path:
    """The repository root: the folder above this package when it holds the Makefile, else the working directory."""
    here = Path(__file__).resolve().parents[1]
    return here if (here / "Makefile").exists() else Path.cwd()


def figures_dir(profile: str = "quick") -> Path:
    check_choice("profile", profile, PROFILES)
    return Path(os.environ.get("MPE_FIGURES_DIR", repo_root() / "figures")) / profile


def check_choice(name: str, value, choices) -> None:
    """Raise ValueError naming the valid choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(map(str, choices))}")


def check_params(**params) -> dict:
    """Validate a notebook's parameters before any work starts; returns them unchanged.

    Known names are checked against their registries (profile, device, dataset, model, optimizer, form, augment,
    schedule); names ending in ``_n``/``n_``/``epochs``/``lr``/``delta`` must be positive numbers; ``sketch`` is None
    or a positive integer.
    """
    from . import DEVICES
    from .data import AUGMENTATIONS, DATASETS
    from .models import MODELS
    from .sensitivity import FORMS
    from .train import OPTIMIZERS, SCHEDULES

    registries = {"profile": PROFILES, "device": DEVICES, "dataset": DATASETS, "model": MODELS,
                  "optimizer": OPTIMIZERS, "form": FORMS, "augment": AUGMENTATIONS, "schedule": SCHEDULES}
    for name, value in params.items():
        base = name.rstrip("s") if name.endswith("s") and name.rstrip("s") in registries else name
        if base in registries:
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                check_choice(base, v, registries[base])
        elif name == "sketch":
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"parameter sketch must be None (exact features) or a positive integer, got {value!r}")
        elif name.startswith("n_") or name.endswith(("epochs", "lr", "delta")):
            for v in (value if isinstance(value, (list, tuple)) else [value]):
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0 or not math.isfinite(v):
                    raise ValueError(f"parameter {name} must be a positive number, got {v!r}")
    return params


def notebook_id(path: str | Path) -> str:
    """``notebooks/mpe/fig2_estimated_vs_true_deviation.ipynb`` -> ``mpe-fig2``."""
    path = Path(path)
    return f"{path.parent.name}-{path.stem.split('_')[0]}"


def figure_id(nb_id: str, variant: str = "") -> str:
    """The id of a notebook's outputs: ``nb_id`` itself, or ``<nb_id>-<variant>`` for a paper-profile variant."""
    if variant and not (variant.isascii() and variant.replace("_", "").isalnum() and variant.islower()):
        raise ValueError(f"a variant name is lower-case letters, digits and underscores, got {variant!r}")
    return f"{nb_id}-{variant}" if variant else nb_id


def variants(nb_id: str) -> list[str]:
    """The paper-profile variants of a notebook: the ``<variant>`` of each ``params/paper/<nb_id>-<variant>.yaml``."""
    return sorted(f.stem[len(nb_id) + 1:] for f in (repo_root() / "params" / "paper").glob(f"{nb_id}-*.yaml"))


def paper_params_file(fig_id: str, folder: str = "paper") -> Path:
    return repo_root() / "params" / folder / f"{fig_id}.yaml"


def setup_table(nb_id: str, this_run: dict, notes: dict | None = None):
    """DataFrame "setting | paper | this run | note", paper values from ``params/paper/<id>.yaml``."""
    import pandas as pd
    import yaml

    f = paper_params_file(nb_id)
    paper = yaml.safe_load(f.read_text()) if f.exists() else {}
    notes = notes or {}
    keys = list(dict.fromkeys([*paper, *this_run]))
    rows = [{"setting": k, "paper": paper.get(k, "–"), "this run": this_run.get(k, "–"), "note": notes.get(k, "")}
            for k in keys]
    return pd.DataFrame(rows).set_index("setting").astype(str)


def save_table(df, name: str, profile: str = "quick") -> list[Path]:
    """Write a table as ``figures/<profile>/<name>.csv`` and ``.md``."""
    out = figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    df.to_csv(csv)
    md.write_text(df.to_markdown() + "\n")
    return [csv, md]


class Claims:
    """Claims of a paper that a figure supports, with our measured value, the threshold and a verdict.

    Thresholds come from what the paper claims, never from what a run gave. ``testable=False`` (with a reason)
    marks a claim the current profile cannot show; the measured value is still reported.
    """

    def __init__(self, nb_id: str, profile: str):
        check_choice("profile", profile, PROFILES)
        self.nb_id, self.profile, self.rows = nb_id, profile, []

    def add(self, claim: str, measured: float, op: str, threshold, *, testable: bool = True, why: str = "",
            digits: int = 2) -> bool:
        ops = {">=": lambda m, t: m >= t, "<=": lambda m, t: m <= t, "between": lambda m, t: t[0] <= m <= t[1]}
        check_choice("comparison", op, ops)
        ok = bool(ops[op](measured, threshold)) if math.isfinite(measured) else False
        verdict = VERDICTS[0] if ok else VERDICTS[1]
        if not testable:
            verdict = VERDICTS[2]
        self.rows.append(dict(claim=claim, measured=round(float(measured), digits), op=op,
                              threshold=threshold, verdict=verdict, why=why))
        return ok

    def report(self) -> None:
        """Print the claims (rounded, for nbval) and write ``figures/<profile>/<id>.json`` (kept in ``self.path``).

        Returns nothing, so that the claims cell shows only the printed text (nbval compares it).
        """
        for r in self.rows:
            thr = f"[{r['threshold'][0]}, {r['threshold'][1]}]" if r["op"] == "between" else r["threshold"]
            print(f"- {r['claim']}\n    measured {r['measured']} (needs {r['op']} {thr}) -> {r['verdict'].upper()}"
                  + (f"\n    why: {r['why']}" if r["why"] else ""))
        out = figures_dir(self.profile)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.nb_id}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({"id": self.nb_id, "profile": self.profile, "claims": self.rows,
                                    "runtime_s": old.get("runtime_s")}, indent=1) + "\n")
        self.path = path


# ----------------------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------------------
def notebooks() -> list[Path]:
    root = repo_root()
    return sorted(p.relative_to(root) for p in (root / "notebooks").glob("*/*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)


def _parameters(nb: Path) -> dict:
    import papermill as pm

    return pm.inspect_notebook(str(nb))


def run(nb: str | Path, profile: str = "quick", device: str = "cpu", output: Path | None = None,
        shrunk: bool = False, variant: str = "") -> Path:
    """Execute one notebook with papermill for ``profile`` into ``build/<profile>/...``; record its run time.

    ``shrunk=True`` (paper profile only) overrides the paper parameters with ``params/shrunk/<id>.yaml``: the same
    models, optimisers and code path on tiny data for one epoch, so that ``make test`` exercises the paper profile.
    ``variant`` (paper profile only) runs the setting ``params/paper/<id>-<variant>.yaml`` instead of the main one.
    """
    import papermill as pm
    import yaml

    from . import DEVICES

    check_choice("profile", profile, PROFILES)
    check_choice("device", device, DEVICES)
    root = repo_root()
    nb = (root / nb) if not Path(nb).is_absolute() else Path(nb)
    if not nb.exists():
        raise FileNotFoundError(f"no notebook {nb}; known: {', '.join(map(str, notebooks()))}")
    nb_id = notebook_id(nb)
    fig_id = figure_id(nb_id, variant)
    declared = _parameters(nb)
    params = {"profile": profile, "device": device} | ({"variant": variant} if variant else {})
    if variant and variant not in variants(nb_id):
        raise ValueError(f"{nb_id} has no paper-profile variant {variant!r}; known: {', '.join(variants(nb_id)) or 'none'}")
    if variant and profile != "paper":
        raise ValueError("variants are settings of the paper profile; use profile='paper'")
    if profile != "quick":
        f = paper_params_file(fig_id)
        if not f.exists():
            raise FileNotFoundError(f"{fig_id}: no parameters for profile {profile!r} ({f})")
        params.update(yaml.safe_load(f.read_text()) or {})
    if shrunk:
        if profile != "paper":
            raise ValueError("shrunk runs are a smoke test of the paper profile; use profile='paper'")
        f = paper_params_file(fig_id, "shrunk")
        if not f.exists():
            raise FileNotFoundError(f"{fig_id}: no shrunk parameters ({f})")
        params.update(yaml.safe_load(f.read_text()) or {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"{nb_id}: unknown parameter(s) {', '.join(unknown)}; the notebook declares: "
                         f"{', '.join(declared)}")
    rel = nb.relative_to(root / "notebooks")
    output = output or root / "build" / (profile + "-shrunk" * shrunk) / rel.with_stem(rel.stem + f"-{variant}" * bool(variant))
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if profile == "quick" or shrunk:
        os.environ.setdefault("MPE_OFFLINE", "1")
    start = time.perf_counter()
    pm.execute_notebook(str(nb), str(output), parameters=params, kernel_name="python3", cwd=str(nb.parent),
                        progress_bar=False)
    elapsed = time.perf_counter() - start
    claims = figures_dir(profile) / f"{fig_id}.json"
    data = json.loads(claims.read_text()) if claims.exists() else {"id": fig_id, "profile": profile, "claims": []}
    data["runtime_s"] = round(elapsed, 1)
    claims.parent.mkdir(parents=True, exist_ok=True)
    claims.write_text(json.dumps(data, indent=1) + "\n")
    print(f"{fig_id}: {elapsed:.0f} s")
    return output


def clean_notebook(path: Path) -> None:
    """Drop papermill and execution metadata (timestamps) so stored references diff cleanly."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "tags" in cell.metadata and "injected-parameters" in cell.metadata["tags"]:
            cell.metadata["tags"].remove("injected-parameters")
    nb.cells = [c for c in nb.cells if not c.source.startswith("# Parameters\n")]
    nbformat.write(nb, path)


def references(nbs) -> None:
    """Re-execute notebooks on the quick profile and store their outputs in place as the nbval references. Each runs
    into a temporary file first, so a failing run leaves the source notebook as it was."""
    for nb in nbs:
        path = repo_root() / nb
        tmp = repo_root() / "build" / "references" / Path(nb).name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            run(path, "quick", "cpu", output=tmp)
            clean_notebook(tmp)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def summary(profile: str = "quick") -> Path:
    """``figures/<profile>/SUMMARY.md``: one row per notebook with its run time and claim verdicts."""
    out = figures_dir(profile)
    lines = [f"# Summary ({profile} profile)", "",
             "Run times are those of the last run of each notebook (one CPU thread for the quick profile); cached",
             "retraining jobs under build/cache make reruns faster. The claims and their reasons are in each notebook's",
             "claims check and in the `<id>.json` files beside this one.", "",
             "| figure | notebook | run time (s) | reproduced | not reproduced | not testable here |",
             "|---|---|---|---|---|---|"]
    by_id = {figure_id(notebook_id(p), v): p for p in notebooks() for v in ["", *variants(notebook_id(p))]}
    for f in sorted(out.glob("*.json")):
        data = json.loads(f.read_text())
        if "claims" not in data:
            continue
        counts = [sum(c["verdict"] == v for c in data["claims"]) for v in VERDICTS]
        nb = by_id.get(data["id"], "")
        lines.append(f"| {data['id']} | {nb} | {data.get('runtime_s')} | " + " | ".join(map(str, counts)) + " |")
    path = out / "SUMMARY.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpe.harness", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("notebook")
    r.add_argument("--profile", default="quick")
    r.add_argument("--device", default="cpu")
    r.add_argument("--shrunk", action="store_true", help="paper profile on tiny data (params/shrunk/<id>.yaml)")
    r.add_argument("--variant", default=None,
                   help="paper profile only: run this variant; '' the main setting; default: the main one, then every "
                        "variant")
    ref = sub.add_parser("references")
    ref.add_argument("notebooks", nargs="+")
    s = sub.add_parser("summary")
    s.add_argument("--profile", default="quick")
    sub.add_parser("list")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            todo = [a.variant] if a.variant is not None else [""]
            if a.variant is None and a.profile == "paper":
                todo += variants(notebook_id(a.notebook))
            for v in todo:
                run(a.notebook, a.profile, a.device, shrunk=a.shrunk, variant=v)
        elif a.cmd == "references":
            references(a.notebooks)
        elif a.cmd == "summary":
            print(summary(a.profile))
        else:
            for p in notebooks():
                extra = variants(notebook_id(p))
                print(f"{notebook_id(p):24s} {p}" + (f"  (paper variants: {', '.join(extra)})" if extra else ""))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
