"""The notebook harness: parameter validation, the "paper vs this run" table, claims checks, and the runner.

Command line (used by the Makefile)::

    python -m mpe.harness run NOTEBOOK [--profile quick|paper] [--device cpu|cuda|mps|auto] [--shrunk] [-p NAME VALUE]...
    python -m mpe.harness references NOTEBOOK...      # re-execute in place (quick) = refresh nbval references
    python -m mpe.harness summary [--profile quick]   # figures/<profile>/SUMMARY.md from the claims files
    python -m mpe.harness compare RUN_DIR             # a test run's claims against the stored reference
    python -m mpe.harness list                        # notebooks and their ids

A notebook ``notebooks/<paper>/<id>_<what>.ipynb`` has the id ``<paper>-<id>``; its outputs are
``figures/<profile>/<paper>-<id>.{png,pdf,csv,md,json}``. The paper profile's parameters live in
``params/paper/<paper>-<id>.yaml`` and are passed to papermill with ``-f``.

**Variants.** Where a paper runs the same figure in a second setting (CIFAR-10 / ResNet-18 beside MNIST), the
setting is a self-contained file ``params/paper/<paper>-<id>-<variant>.yaml`` (plus its shrunk smoke test under
``params/shrunk/``). The notebook receives ``variant="<variant>"`` and writes its outputs under the figure id
``<paper>-<id>-<variant>`` (:func:`figure_id`). ``make figures PROFILE=paper`` runs every variant. A quick-profile
variant is ``params/quick/<paper>-<id>-<variant>.yaml``: the parameters it changes from the notebook's own (quick)
defaults, run by ``make figures`` after the main setting (``make test`` checks the notebook's main setting only).
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
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable here")


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
    or a positive integer; ``lam``/``lams`` positive.
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
        elif name.startswith("n_") or name.endswith(("epochs", "lr", "delta", "lam", "lams")):
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


def variants(nb_id: str, profile: str = "paper") -> list[str]:
    """A notebook's variants on ``profile``: the ``<variant>`` of each ``params/<profile>/<nb_id>-<variant>.yaml``."""
    check_choice("profile", profile, PROFILES)
    return sorted(f.stem[len(nb_id) + 1:] for f in (repo_root() / "params" / profile).glob(f"{nb_id}-*.yaml"))


def paper_params_file(fig_id: str, folder: str = "paper") -> Path:
    """``params/<folder>/<fig_id>.yaml``: ``paper`` (the paper profile), ``quick`` (a quick-profile variant),
    ``shrunk`` or ``published``."""
    return repo_root() / "params" / folder / f"{fig_id}.yaml"


def notebook_path(nb_id: str) -> Path:
    """The notebook of an id: ``mpe-fig2`` -> ``notebooks/mpe/fig2_estimated_vs_true_deviation.ipynb``."""
    paper, _, short = nb_id.partition("-")
    found = sorted((repo_root() / "notebooks" / paper).glob(f"{short}_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no notebook with id {nb_id!r}; known: {', '.join(notebook_id(p) for p in notebooks())}")
    return found[0]


def setup_table(nb_id: str, this_run: dict | None = None, notes: dict | None = None, namespace: dict | None = None):
    """DataFrame "setting | paper (published) | paper profile | this run | note".

    - *paper (published)*: the paper's own setting, from ``params/published/<id>.yaml`` (written from
      ``../shared/papers``; values the notes mark as reconstructed say so);
    - *paper profile*: ``params/paper/<id>.yaml``, what ``PROFILE=paper`` runs;
    - *this run*: every parameter of the notebook's parameters cell, with the value it has in this run (read from
      ``namespace``, by default the calling notebook's globals), plus the derived settings in ``this_run``.
    """
    import inspect

    import pandas as pd
    import yaml

    if namespace is None:
        namespace = inspect.currentframe().f_back.f_globals
    this_run = dict(this_run or {})
    try:
        declared = [k for k in _parameters(notebook_path(nb_id)) if k not in ("profile", "device", "variant")]
    except FileNotFoundError:
        declared = []
    run = {k: namespace[k] for k in declared if k in namespace} | this_run

    def read(folder):
        f = paper_params_file(nb_id, folder)
        return (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}

    published, profile = read("published"), read("paper")
    notes = notes or {}
    keys = list(dict.fromkeys([*run, *profile, *published]))
    rows = [{"setting": k, "paper (published)": published.get(k, "–"), "paper profile": profile.get(k, "–"),
             "this run": run.get(k, "–"), "note": notes.get(k, "")} for k in keys]
    return pd.DataFrame(rows).set_index("setting").astype(str)


def save_table(df, name: str, profile: str = "quick") -> list[Path]:
    """Write a table as ``figures/<profile>/<name>.csv`` and ``.md``."""
    out = figures_dir(profile)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / f"{name}.csv", out / f"{name}.md"
    df.to_csv(csv)
    md.write_text(df.to_markdown() + "\n")
    return [csv, md]


SOURCES = ("paper", "official code", "reconstructed", "companion", "sanity")
COUNTED = {"paper claims": ("paper", "official code", "reconstructed"), "companion checks": ("companion",)}


class Claims:
    """Claims that a figure supports: the claim, whose it is, our estimate with its interval, and a verdict.

    ``measured`` is an :class:`mpe.stats.Estimate` (a value with a 95 % interval from seeds, a bootstrap, or an exact
    computation); the verdict is REPRODUCED when the whole interval is on the passing side of the threshold, NOT
    REPRODUCED when it is wholly on the failing side and INCONCLUSIVE when it straddles it. A bare number is a single
    run without an interval: never better than INCONCLUSIVE. ``testable=False`` (with a reason) marks a claim the
    current profile cannot show; the measured value is still reported.

    ``source`` says whose claim it is: ``paper`` (quoted or paraphrased), ``official code``, ``reconstructed`` (the
    paper's text was not available), ``companion`` (our own extra check) or ``sanity`` (true by construction: shown,
    never counted). Thresholds come from the paper's words, never from what a run gave. Every verdict other than
    REPRODUCED carries a ``why``.
    """

    def __init__(self, nb_id: str, profile: str):
        check_choice("profile", profile, PROFILES)
        self.nb_id, self.profile, self.rows = nb_id, profile, []

    def add(self, claim: str, measured, op: str, threshold, *, source: str, testable: bool = True, why: str = "",
            digits: int | None = None) -> str:
        """Record one claim; returns its verdict."""
        from .stats import Estimate

        check_choice("comparison", op, (">=", "<=", "between"))
        check_choice("source", source, SOURCES)
        if not isinstance(measured, Estimate):
            v = float(measured)
            measured = Estimate(v, -math.inf, math.inf, "a single run, no interval")
        verdict = measured.verdict(op, threshold) if testable else "not testable here"
        if verdict == "inconclusive":
            why = "; ".join(filter(None, ["a single run has no interval" if math.isinf(measured.hi - measured.lo)
                                          else "the interval straddles the threshold: within noise at this scale", why]))
        if not why and verdict in ("not reproduced", "not testable here"):
            raise ValueError(f"claim {claim!r} is {verdict.upper()} with no why: say what stands in the way")
        self.rows.append(dict(claim=claim, source=source, measured=measured.value, lo=measured.lo, hi=measured.hi,
                              text=measured.text(digits), method=measured.method, op=op, threshold=threshold,
                              verdict=verdict, why=why if verdict != "reproduced" else ""))
        return verdict

    def report(self) -> None:
        """Print the claims and write ``figures/<profile>/<id>.json`` (kept in ``self.path``).

        Returns nothing, so that the claims cell shows only the printed text, which nbval compares with the stored
        output after masking the measured values and verdicts (``tests/nbval_sanitize.cfg``): the claims and their
        sources must be the same on any CPU. The verdicts are compared with the reference run's by :func:`compare`.
        """
        for r in self.rows:
            thr = f"[{r['threshold'][0]}, {r['threshold'][1]}]" if r["op"] == "between" else r["threshold"]
            print(f"- [{r['source']}] {r['claim']}\n    measured {r['text']} ({r['method']}) <- needs {r['op']} {thr}"
                  f"\n    -> {r['verdict'].upper()}" + (f": {r['why']}" if r["why"] else ""))
        out = figures_dir(self.profile)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.nb_id}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        record = {"id": self.nb_id, "profile": self.profile, "claims": self.rows, "runtime_s": old.get("runtime_s")}
        if self.profile == "paper":  # the training this run did (cached results excluded): checked against mpe.workload
            from .train import work

            record["work"] = work()
        path.write_text(json.dumps(record, indent=1, default=float) + "\n")
        self.path = path


# ----------------------------------------------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------------------------------------------
def notebooks() -> list[Path]:
    root = repo_root()
    return sorted(p.relative_to(root) for p in (root / "notebooks").glob("*/*.ipynb")
                  if ".ipynb_checkpoints" not in p.parts)


def _parameters(nb: Path) -> dict:
    """``{name: default}`` of the notebook's cell tagged ``parameters`` (literal defaults evaluated, others as source)."""
    import ast

    # plain JSON, not nbformat: importing nbformat costs 3 s (jsonschema's format checkers), in every kernel
    cells = [c for c in json.loads(Path(nb).read_text())["cells"]
             if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError(f"{nb}: no cell tagged 'parameters'")
    source = cells[0]["source"]
    out = {}
    for node in ast.parse(source if isinstance(source, str) else "".join(source)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for t in targets:
            if isinstance(t, ast.Name) and node.value is not None:
                try:
                    out[t.id] = ast.literal_eval(node.value)
                except ValueError:
                    out[t.id] = ast.unparse(node.value)
    return out


def parameters(nb: str | Path, profile: str = "quick", device: str = "cpu", *, shrunk: bool = False,
               variant: str = "", overrides: dict | None = None, defaults: bool = True) -> dict:
    """The parameters a run of notebook ``nb`` gets (see :func:`run`): the profile's file
    (``params/paper/<id>[-<variant>].yaml``; on the quick profile only a variant has one,
    ``params/quick/<id>-<variant>.yaml``), then ``params/shrunk/<id>.yaml`` where ``shrunk``, then ``overrides``;
    with ``defaults``, on top of the notebook's own defaults (its parameters cell). Unknown names raise ValueError."""
    import yaml

    nb = repo_root() / nb if not Path(nb).is_absolute() else Path(nb)
    nb_id = notebook_id(nb)
    fig_id = figure_id(nb_id, variant)
    declared = _parameters(nb)
    params = {"profile": profile, "device": device} | ({"variant": variant} if variant else {})
    if variant and variant not in variants(nb_id, profile):
        raise ValueError(f"{nb_id} has no {profile}-profile variant {variant!r}; known: "
                         f"{', '.join(variants(nb_id, profile)) or 'none'}")
    if profile != "quick" or variant:
        f = paper_params_file(fig_id, profile)
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
    params.update(overrides or {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(f"{nb_id}: unknown parameter(s) {', '.join(unknown)}; the notebook declares: "
                         f"{', '.join(declared)}")
    return declared | params if defaults else params


def run(nb: str | Path, profile: str = "quick", device: str = "cpu", output: Path | None = None,
        shrunk: bool = False, variant: str = "", overrides: dict | None = None) -> Path:
    """Execute one notebook with papermill for ``profile`` into ``build/<profile>/...``; record its run time.

    ``shrunk=True`` (paper profile only) overrides the paper parameters with ``params/shrunk/<id>.yaml``: the same
    models, optimisers and code path on tiny data for one epoch, so that ``make test`` exercises the paper profile.
    ``variant`` runs the setting ``params/<profile>/<id>-<variant>.yaml`` instead of the main one.
    ``overrides`` (``-p name value`` on the command line) are applied last. Every name is checked against the
    notebook's parameters cell and every value against its registry (:func:`check_params`) before any work starts.
    """
    import papermill as pm

    from . import DEVICES

    check_choice("profile", profile, PROFILES)
    check_choice("device", device, DEVICES)
    root = repo_root()
    nb = (root / nb) if not Path(nb).is_absolute() else Path(nb)
    if not nb.exists():
        raise FileNotFoundError(f"no notebook {nb}; known: {', '.join(map(str, notebooks()))}")
    nb_id = notebook_id(nb)
    fig_id = figure_id(nb_id, variant)
    params = parameters(nb, profile, device, shrunk=shrunk, variant=variant, overrides=overrides, defaults=False)
    check_params(**params)
    rel = nb.relative_to(root / "notebooks")
    output = output or root / "build" / (profile + "-shrunk" * shrunk) / rel.with_stem(rel.stem + f"-{variant}" * bool(variant))
    output.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if profile == "quick" or shrunk:
        os.environ.setdefault("MPE_OFFLINE", "1")
    start = time.perf_counter()
    error = None
    try:
        pm.execute_notebook(str(nb), str(output), parameters=params, kernel_name="python3", cwd=str(nb.parent),
                            progress_bar=False)
    except Exception as err:  # recorded for the summary, then raised
        error = err
    elapsed = time.perf_counter() - start
    claims = figures_dir(profile) / f"{fig_id}.json"
    data = json.loads(claims.read_text()) if claims.exists() else {"id": fig_id, "profile": profile, "claims": []}
    data |= {"runtime_s": round(elapsed, 1), "status": "ok" if error is None else "failed"}
    data.pop("error", None)
    if error is not None:
        # papermill's error names the cell's exception; the claims left in the file are an earlier run's
        what = f"{error.ename}: {error.evalue}" if hasattr(error, "ename") else f"{type(error).__name__}: {error}"
        data["error"] = what[:300]
    claims.parent.mkdir(parents=True, exist_ok=True)
    claims.write_text(json.dumps(data, indent=1) + "\n")
    if error is not None:  # kept under another name, so that make does not take the target as built
        failed = output.with_suffix(".failed.ipynb")
        if output.exists():
            output.replace(failed)
        raise RuntimeError(f"{fig_id} failed after {elapsed:.0f} s ({data['error']}); the executed notebook, with the "
                           f"traceback, is {failed}") from error
    print(f"{fig_id}: {elapsed:.0f} s")
    return output


def clean_notebook(path: Path) -> None:
    """Drop papermill and execution metadata (timestamps), the state of progress widgets and the traces of progress
    bars, so stored references diff cleanly."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    nb.metadata.pop("widgets", None)  # ipywidgets' saved state: the tqdm bars' models, meaningless once stored
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if "tags" in cell.metadata and "injected-parameters" in cell.metadata["tags"]:
            cell.metadata["tags"].remove("injected-parameters")
    nb.cells = [c for c in nb.cells if not c.source.startswith("# Parameters\n")]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in map(_without_progress, cell.outputs) if o is not None]
    nbformat.write(nb, path)


_PROGRESS = r"\d+%\|.*\|\s*\d+/\d+|\d+it \[|IProgress not found|ipywidgets\.readthedocs"


def _without_progress(output):
    """A stored output less the traces of progress bars: tqdm's text fragments on stderr (``12%|█▏ | 3/25 [...]``,
    separated by carriage returns) are cut out, and an output left empty, or a progress widget (shown live in
    JupyterLab, meaningless once stored), is dropped (None). Anything else written to stderr stays."""
    import re

    if output.get("output_type") == "stream" and output.get("name") == "stderr":
        lines = [ln for ln in re.split(r"[\r\n]", output.get("text", "")) if ln.strip() and not re.search(_PROGRESS, ln)]
        if not lines:
            return None
        output["text"] = "\n".join(lines) + "\n"
        return output
    return None if "application/vnd.jupyter.widget-view+json" in output.get("data", {}) else output


def references(nbs) -> None:
    """Re-execute notebooks on the quick profile and store their outputs in place as the nbval references. Each runs
    into a temporary file first, so a failing run leaves the source notebook as it was; the others still run, and
    the failures are raised together at the end."""
    failed = []
    for nb in nbs:
        path = repo_root() / nb
        tmp = repo_root() / "build" / "references" / Path(nb).name
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            run(path, "quick", "cpu", output=tmp)
            clean_notebook(tmp)
            tmp.replace(path)
        except Exception as err:  # papermill's PapermillExecutionError names the failing cell
            failed.append(f"{nb}: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}")
            print(f"FAILED {failed[-1]}", file=sys.stderr)
        finally:
            tmp.unlink(missing_ok=True)
    if failed:
        raise RuntimeError(f"{len(failed)} notebook(s) failed; their stored outputs are unchanged:\n" + "\n".join(failed))


STEP = {"reproduced": 1, "inconclusive": 0, "not reproduced": -1}


def compare(run_dir: Path, reference_dir: Path | None = None) -> list[str]:
    """Compare the claims a test run wrote (``run_dir/<id>.json``) with the stored reference (``figures/quick``).

    The claims, their sources, comparisons and thresholds must be the same. A verdict may move by one step between
    machines (REPRODUCED <-> INCONCLUSIVE <-> NOT REPRODUCED): the CPU's float kernels move a value inside its noise,
    and a claim whose verdict moves that way is inconclusive by construction; such moves are reported, not failed.
    A jump across (REPRODUCED on one machine, NOT REPRODUCED on the other) contradicts both intervals and fails, as
    does a change of testability. Returns the failures (an empty list when the run agrees)."""
    reference_dir = Path(reference_dir or figures_dir("quick"))
    failures, moves = [], []
    for f in sorted(Path(run_dir).glob("*.json")):
        ref = reference_dir / f.name
        if not ref.exists():
            failures.append(f"{f.stem}: no reference {ref}")
            continue
        now, then = json.loads(f.read_text())["claims"], json.loads(ref.read_text())["claims"]
        if [c["claim"] for c in now] != [c["claim"] for c in then]:
            failures.append(f"{f.stem}: the claims differ from the reference")
            continue
        for c, r in zip(now, then):
            where = f"{f.stem}: {c['claim']}"
            if (c.get("source"), c["op"], c["threshold"]) != (r.get("source"), r["op"], r["threshold"]):
                failures.append(f"{where}: source or threshold differs from the reference")
            elif c["verdict"] != r["verdict"]:
                a, b = STEP.get(c["verdict"]), STEP.get(r["verdict"])
                line = f"{where}: {c['verdict'].upper()} here, {r['verdict'].upper()} in the reference"
                (moves if a is not None and b is not None and abs(a - b) == 1 else failures).append(line)
    for m in moves:
        print(f"within noise (inconclusive by construction): {m}")
    return failures


def claim_counts(rows) -> dict:
    """``{group: {verdict: count}}`` for the groups of :data:`COUNTED` (sanity checks are not counted)."""
    return {g: {v: sum(r.get("source") in srcs and r["verdict"] == v for r in rows) for v in VERDICTS}
            for g, srcs in COUNTED.items()}


def headline(counts: dict) -> str:
    """One line: the paper claims' verdicts, then the companion checks'."""
    return "; ".join(f"{g}: " + ", ".join(f"{n} {v}" for v, n in c.items()) for g, c in counts.items())


def summary(profile: str = "quick") -> Path:
    """``figures/<profile>/SUMMARY.md``: one row per notebook with its run time and the verdicts of its paper claims
    (paper, official code, reconstructed) and companion checks; sanity checks are listed in the notebooks only.

    On the quick profile the README's headline (between the ``claims-headline`` markers) is rewritten from the same
    counts."""
    out = figures_dir(profile)
    lines = [f"# Summary ({profile} profile)", "",
             "Run times are those of the last run of each notebook (one CPU thread for the quick profile); cached",
             "retraining jobs under build/cache make reruns faster. The claims, their 95 % intervals, their sources and",
             "the reasons for every verdict other than REPRODUCED are in each notebook's claims check and in the",
             "`<id>.json` files beside this one. Paper claims are the papers' own (quoted, paraphrased or reconstructed,",
             "or taken from the official code); companion checks are our extra checks; sanity checks (true by",
             "construction) are not counted. R = reproduced, NR = not reproduced, I = inconclusive (the interval straddles",
             "the threshold), NT = not testable here.", "",
             "A failed run's claims (an earlier run's, if any) are not counted; its status names the error.", "",
             "| figure | notebook | status | run time (s) | paper claims R / NR / I / NT | companion checks R / NR / I / NT |",
             "|---|---|---|---|---|---|"]
    by_id = {figure_id(notebook_id(p), v): p for p in notebooks() for v in ["", *variants(notebook_id(p), profile)]}
    rows, failed = [], []
    for f in sorted(out.glob("*.json")):
        data = json.loads(f.read_text())
        if "claims" not in data:
            continue
        status = data.get("status", "ok")
        if status == "failed":
            failed.append(f"{data['id']}: {data.get('error', '')}")
            cells = ["—", "—"]
            status = "failed: " + data.get("error", "").replace("|", "/").replace("\n", " ")[:120]
        else:
            rows += data["claims"]
            cells = [" / ".join(str(n) for n in g.values()) for g in claim_counts(data["claims"]).values()]
        lines.append(f"| {data['id']} | {by_id.get(data['id'], '')} | {status} | {data.get('runtime_s')} | "
                     + " | ".join(cells) + " |")
    total = headline(claim_counts(rows))
    lines[1:1] = ["", f"**All notebooks** — {total}."]
    if failed:
        lines[3:3] = ["", f"**Failed**: {len(failed)} ({', '.join(x.split(':')[0] for x in failed)})."]
    for x in failed:
        print(f"FAILED {x}", file=sys.stderr)
    path = out / "SUMMARY.md"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    readme = repo_root() / "README.md"
    if profile == "quick" and readme.exists() and "MPE_FIGURES_DIR" not in os.environ:
        text = readme.read_text()
        a, b = "<!-- claims-headline -->", "<!-- /claims-headline -->"
        if a in text and b in text:
            text = text[:text.index(a) + len(a)] + f"\nQuick profile — {total}.\n" + text[text.index(b):]
            readme.write_text(text)
    return path


STEP_TIMES = "figures/paper/step_times-nvidia-h200.csv"  # measured on the one GPU this project has run on


def cost(profile: str = "paper", step_times: str | Path | None = STEP_TIMES, shrunk: bool = False, gpus: int = 8) -> str:
    """A markdown table of what each notebook and variant of ``profile`` trains (:mod:`mpe.workload`: runs,
    optimiser steps, examples visited) and its estimated GPU-hours, from the measured step times in the CSV
    ``step_times`` (``python -m mpe.cost bench --out``; a path relative to the repository) for the models it
    holds, else from the FLOP model of :func:`mpe.workload.step_seconds` (``step_times=None``: the model alone), and
    its hours on ``gpus`` GPUs with its sweeps' jobs fanned out over them (:func:`mpe.workload.wall_hours`)."""
    if gpus < 1:
        raise ValueError(f"gpus must be at least 1, got {gpus}")
    n_gpus = f"{gpus} GPU{'s' * (gpus != 1)}"
    import csv

    from . import workload

    table = None
    if step_times is not None:
        step_times = repo_root() / step_times
        with open(step_times) as f:
            table = {(r["model"], int(r["batch_size"])): float(r["s_per_step"]) for r in csv.DictReader(f)}
    flop_model = (f"a FLOP model ({workload.ASSUMED_FLOPS / 1e12:g} TFLOP/s sustained, at least "
                  f"{workload.ASSUMED_STEP_FLOOR_S * 1e3:g} ms per step; mpe.workload)")
    how = (f"the step times measured in `{Path(step_times).relative_to(repo_root())}` where it has the model, else "
           f"{flop_model}" if table else flop_model)
    lines = [f"# What the {profile} profile{' (shrunk)' * shrunk} trains, and its cost on one GPU", "",
             f"Training runs only (kernels, Jacobians and PBRF solves are not counted); GPU-hours from {how}. "
             "L-BFGS rows count their maximum iterations, each at least "
             f"{workload.LBFGS_ITERATION_FLOOR_S * 1e3:.0f} ms (measured on the H200). "
             "The retraining sweeps of `mpe.retrain` train up to "
             f"{workload.STACK} models of a BatchNorm-free architecture per vmapped step on a GPU: such a step is timed "
             "as one model's step at that many times the batch. GPU memory: the training set, four copies of the "
             "parameters and one minibatch's activations per model trained at once, in float32. "
             "Notebooks that also compute per-example quantities at scale take longer: mpe-fig9's training cell, "
             "its LOO trackers included, took 362 s on the H200 (figures/paper/README.md), against its training "
             "alone in this table. "
             f"Hours on {n_gpus}: the jobs of each retraining sweep (`mpe.retrain.run_specs`, `run_jobs`) fanned out "
             f"over {n_gpus} with Dask (README, Retraining sweeps), one worker per GPU, each training its share "
             "vectorised as above; the runs a notebook trains itself, and its sweeps, one after another. Which runs "
             "each formula counts as a sweep's jobs is checked against what the shrunk paper profiles trained as "
             "jobs (tests/test_paper_profiles.py). Regenerate: `python -m mpe.harness cost`.",
             "",
             "| figure | runs | optimiser steps | examples visited | GPU-hours | hours on " f"{n_gpus} | "
             "GPU memory of one run (GB) | lower bound for |", "|---|---|---|---|---|---|---|---|"]
    total = wall = 0.0
    for nb in notebooks():
        nb_id = notebook_id(nb)
        for v in ["", *variants(nb_id, profile)]:
            est = workload.estimate(workload.runs_of(nb_id, parameters(nb, profile, shrunk=shrunk, variant=v)), table,
                                    gpus)
            total += est["gpu_hours"]
            wall += est["wall_hours"]
            memory = f"{est['peak_gb']:.2g}" if est["peak_gb"] else "–"
            lines.append(f"| {figure_id(nb_id, v)} | {est['runs']:,} | {est['steps']:,} | {est['examples']:,} | "
                         f"{est['gpu_hours']:.3g} | {est['wall_hours']:.3g} | {memory} | {', '.join(est['lower_bound'])} |")
    lines += ["", f"Total: about {total:.3g} GPU-hours; on {n_gpus}, one notebook after another, about {wall:.3g} "
              "hours."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpe.harness", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("notebook")
    r.add_argument("--profile", default="quick")
    r.add_argument("--device", default="cpu")
    r.add_argument("--shrunk", action="store_true", help="paper profile on tiny data (params/shrunk/<id>.yaml)")
    r.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="override one parameter of the notebook's parameters cell (VALUE is read as YAML: 500, 0.1, "
                        "[1, 2], mnist)")
    r.add_argument("--variant", default=None,
                   help="run this variant (params/<profile>/<id>-<variant>.yaml); '' the main setting; default: the "
                        "main one, then every variant of the profile")
    ref = sub.add_parser("references")
    ref.add_argument("notebooks", nargs="+")
    cmp = sub.add_parser("compare", help="compare a test run's claims with the stored reference (exit 1 on a "
                                         "contradiction)")
    cmp.add_argument("run_dir")
    cmp.add_argument("--reference", default=None)
    s = sub.add_parser("summary")
    s.add_argument("--profile", default="quick")
    c = sub.add_parser("cost", help="what each notebook trains and its estimated GPU-hours, before running it")
    c.add_argument("--profile", default="paper")
    c.add_argument("--step-times", default=STEP_TIMES, help="CSV of measured step times (python -m mpe.cost bench "
                                                        "--out); 'none': the FLOP model alone")
    c.add_argument("--shrunk", action="store_true", help="the shrunk paper profile (what make test runs)")
    c.add_argument("--gpus", type=int, default=8, help="GPUs the sweeps' jobs are fanned out over (the hours column)")
    c.add_argument("--out", default=None, help="also write the table to this file")
    sub.add_parser("list")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "run":
            todo = [a.variant] if a.variant is not None else [""]
            if a.variant is None:
                todo += variants(notebook_id(a.notebook), a.profile)
            import yaml

            overrides = {name: yaml.safe_load(value) for name, value in a.parameter}
            failed = []
            for v in todo:  # a failing variant does not stop the others
                try:
                    run(a.notebook, a.profile, a.device, shrunk=a.shrunk, variant=v, overrides=overrides)
                except RuntimeError as err:
                    print(f"error: {err}", file=sys.stderr)
                    failed.append(v or "main")
            if failed:
                return 1
        elif a.cmd == "references":
            references(a.notebooks)
        elif a.cmd == "compare":
            failures = compare(Path(a.run_dir), a.reference)
            for line in failures:
                print(f"FAILED {line}", file=sys.stderr)
            if failures:
                return 1
            print(f"claims of {a.run_dir} agree with the reference")
        elif a.cmd == "summary":
            print(summary(a.profile))
        elif a.cmd == "cost":
            text = cost(a.profile, None if a.step_times == "none" else a.step_times, a.shrunk, a.gpus)
            if a.out:
                Path(a.out).write_text(text)
            print(text)
        else:
            for p in notebooks():
                extra = {pr: variants(notebook_id(p), pr) for pr in PROFILES}
                print(f"{notebook_id(p):24s} {p}" + "".join(f"  ({pr} variants: {', '.join(v)})"
                                                            for pr, v in extra.items() if v))
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
