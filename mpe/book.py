r"""The companion as a book: ``make book`` writes a static site to ``build/book/`` from the executed notebooks.

Three steps, all offline and none of them re-executes a notebook:

1. :func:`stage` lays the book's sources out in ``build/book-src/``: a landing page (the README's introduction), a
   gallery (each figure's thumbnail, its verdict counts and its links), one page per notebook with the outputs
   ``make figures`` stored (``build/<profile>/`` where it ran, else the stored quick-profile outputs in
   ``notebooks/``) and its figure shown after the cell that saves it, and the README's sections as pages;
2. MyST (``mystmd``, the engine of Jupyter Book 2) turns them into a site's content: ``myst build --site`` parses the
   markdown, renders every equation with KaTeX and resolves cross-references and links;
3. :func:`render` writes that content as plain HTML pages with a navigation bar. MyST's own book theme is a
   download that ``mystmd`` fetches from GitHub when it builds HTML, which an offline build cannot do, so the
   pages are drawn here, from MyST's content, by a small renderer of its node types. Equations are MathML (which
   every current browser typesets; no script, no web fonts).

Command line::

    python -m mpe.book [--profile quick|paper] [--out build/book]
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .harness import PROFILES, check_choice, claim_counts, figure_id, figures_dir, notebook_id, notebooks, \
    repo_root, variants

__all__ = ["SECTIONS", "stage", "myst_executable", "myst_site", "render", "build", "main"]

TITLE = "How does a trained model depend on each training example?"
# the notebooks' folders in reading order, with the titles of their parts of the book
SECTIONS = {"mpe": "MPE: the memory-perturbation equation", "lpntk": "lpNTK: sample interaction during learning",
            "regularity": "Sample regularity, with Toneva's and Jiang's measures", "laftr": "LAFTR: function-space distance",
            "compare": "Comparison: which per-example score predicts what?"}
_GUIDE_TITLES = {"Gallery": "Paper items, notebooks and status"}  # README sections whose page needs another title
_LINK = re.compile(r"(!?\[(?:[^\[\]]|\[[^\]]*\])*\])\(([^()\s]+)\)")


# ------------------------------------------------------------------------------------------------------------------
# 1. staging
# ------------------------------------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _split_readme(text: str):
    """(title, introduction, [(section title, body)]) of a markdown file cut at its level-2 headings."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    head = parts[0].strip().splitlines()
    title = head[0].lstrip("# ").strip()
    return title, "\n".join(head[1:]).strip(), list(zip(parts[1::2], (b.strip() for b in parts[2::2])))


class _Stage:
    """What is being staged: where pages go, which repository files they link to (copied under ``files/``)."""

    def __init__(self, dest: Path, profile: str):
        self.root, self.dest, self.profile = repo_root(), dest, profile
        self.pages: dict[Path, Path] = {}  # repository file -> its page in the stage
        self.problems: list[str] = []

    def file(self, path: Path) -> Path:
        """A repository file copied into the stage (once), as a figure or a download."""
        target = self.dest / "files" / path.relative_to(self.root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        return target

    def relink(self, text: str, source: Path, page: Path) -> str:
        """Markdown ``text`` from repository file ``source`` placed at stage file ``page``: each relative link or image
        points at the staged page of its target, or at a staged copy of the file; a link to nothing becomes text."""
        def fix(m):
            label, url = m.groups()
            if re.match(r"[a-z]+:|#", url):
                return m.group(0)
            path, _, anchor = url.partition("#")
            target = (source.parent / path).resolve()
            if target in self.pages:
                staged = self.pages[target]
            elif target.is_file() and self.root in target.parents:
                staged = self.file(target)
            else:
                self.problems.append(f"{source.name}: link to {url}, which does not exist; kept as text")
                return label.lstrip("!")[1:-1]
            rel = Path(os.path.relpath(staged, page.parent)).as_posix()
            return f"{label}({rel}{'#' + anchor if anchor else ''})"
        return _LINK.sub(fix, text)


def _in_order(folder: str) -> list[Path]:
    """The notebooks of one folder in reading order: fig2 before fig10."""
    return sorted((p for p in notebooks() if p.parent.name == folder),
                  key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.stem)])


def _notebook_title(nb: dict) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            first = "".join(cell["source"]).strip().splitlines()[0]
            return first.lstrip("# ").strip()
    return ""


def _saved_figures(source: str, nb_id: str, profile: str) -> list[str]:
    """The figure ids a code cell writes with ``savefig(fig, NAME, profile)``: NAME is ``ID`` (the notebook's own
    id), an f-string ``f"{ID}-suffix"``, or a name quoted in the cell (a loop over ids)."""
    ids = []
    for name in re.findall(r"savefig\(\s*\w+\s*,\s*([^,]+?)\s*,", source):
        if name == "ID":
            ids.append(nb_id)
        elif m := re.fullmatch(r"f[\"']\{ID\}(-[\w-]+)[\"']", name):
            ids.append(nb_id + m.group(1))
        else:
            ids += [nb_id] if re.search(r"\(ID\b", source) else []
            ids += [q for q in re.findall(r"[\"']([a-z]+-[\w-]+)[\"']", source) if q != nb_id]
    here = figures_dir(profile)
    return [i for i in dict.fromkeys(ids) if (here / f"{i}.png").exists()]


def _stage_notebook(st: _Stage, nb_path: Path, page: Path) -> str:
    """Copy one executed notebook into the stage with its figures shown after the cells that save them; its title."""
    executed = st.root / "build" / st.profile / nb_path.relative_to(st.root / "notebooks")
    if st.profile == "quick":  # make figures' copy or the stored references, whichever ran last
        src = executed if executed.exists() and executed.stat().st_mtime > nb_path.stat().st_mtime else nb_path
    else:
        src = executed if executed.exists() else nb_path
    nb = json.loads(src.read_text())
    if src == nb_path and st.profile != "quick":
        nb["cells"].insert(1, {"cell_type": "markdown", "metadata": {}, "id": "book-not-run", "source":
                               f":::{{warning}}\nThis notebook has not run on the {st.profile} profile here: the outputs "
                               "below are the quick profile's.\n:::"})
    nb_id = notebook_id(nb_path)
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue  # papermill's copy of the parameters: the parameters cell above already shows them
        cells.append(cell)
        if cell["cell_type"] != "code":
            continue
        for fid in _saved_figures("".join(cell["source"]), nb_id, st.profile):
            files = {ext: st.file(f) for ext in ("png", "pdf", "csv")
                     if (f := figures_dir(st.profile) / f"{fid}.{ext}").exists()}
            rel = {ext: Path(os.path.relpath(f, page.parent)).as_posix() for ext, f in files.items()}
            links = [f"[{ext.upper()}]({r})" for ext, r in rel.items()]
            cells.append({"cell_type": "markdown", "metadata": {}, "id": f"book-{fid}",
                          "source": f"![Figure {fid}]({rel['png']})\n\n*Figure `{fid}` as this run wrote it to "
                                    f"`figures/{st.profile}/`:* {' · '.join(links)}"})
    nb["cells"] = cells
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(json.dumps(nb))
    return _notebook_title(nb)


def _gallery(st: _Stage, titles: dict) -> str:
    """The gallery page: per part of the book, one row per figure (a notebook's, and each variant's)."""
    lines = [f"# Gallery ({st.profile} profile)", "",
             "Every figure this companion computes, with the verdicts of its claims check: paper claims (the papers' "
             "own, quoted, paraphrased or reconstructed) and companion checks (ours). R = reproduced, NR = not "
             "reproduced, I = inconclusive (the interval straddles the threshold), NT = not testable here. Click a "
             "thumbnail for the figure, a title for its notebook.", ""]
    here = figures_dir(st.profile)
    for folder, part in SECTIONS.items():
        rows = _in_order(folder)
        if not rows:
            continue
        lines += [f"## {part}", "", "| figure | notebook | paper claims R / NR / I / NT | companion checks R / NR / I / NT |",
                  "|---|---|---|---|"]
        for nb in rows:
            nb_id = notebook_id(nb)
            page = st.pages[(st.root / nb).resolve()]
            for v in ["", *variants(nb_id, st.profile)]:
                fid = figure_id(nb_id, v)
                png, claims = here / f"{fid}.png", here / f"{fid}.json"
                rel = Path(os.path.relpath(page, st.dest)).as_posix()
                img = Path(os.path.relpath(st.file(png), st.dest)).as_posix() if png.exists() else None
                thumb = f"[![{fid}]({img})]({img})" if img else "—"
                found = _claims(claims)
                counts = _counts(found) if found is not None else ["not run" if not claims.exists() else "failed"] * 2
                name = titles[nb].split("—", 1)[-1].strip() + (f" (variant `{v}`)" if v else "")
                lines.append(f"| {thumb} | [{name}]({rel}) `{fid}` | {counts[0]} | {counts[1]} |")
        lines.append("")
    return "\n".join(lines)


def _claims(path: Path) -> list | None:
    """The claims of a figure's ``<id>.json``; None where it has not run or its run failed."""
    if not path.exists() or (data := json.loads(path.read_text())).get("status", "ok") != "ok":
        return None
    return data["claims"]


def _counts(claims: list) -> list[str]:
    """"R / NR / I / NT" of the paper claims and of the companion checks."""
    return [" / ".join(str(n) for n in g.values()) for g in claim_counts(claims).values()]


def _parts(profile: str) -> str:
    """The landing page's reading guide: each part of the book, its first notebook and its verdict counts."""
    lines = ["## Reading this book", "",
             f"[The gallery](gallery.md) shows every figure with the verdicts of its claims check ({profile} "
             "profile); the parts follow the four papers, one page per notebook, then the comparison and the guide "
             "(the README). Paper claims: R = reproduced, NR = not reproduced, I = inconclusive, NT = not testable "
             "here.", "", "| part | notebooks | paper claims R / NR / I / NT | companion checks R / NR / I / NT |",
             "|---|---|---|---|"]
    for folder, part in SECTIONS.items():
        nbs = _in_order(folder)
        if not nbs:
            continue
        rows = []
        for nb in nbs:
            for v in ["", *variants(notebook_id(nb), profile)]:
                rows += _claims(figures_dir(profile) / f"{figure_id(notebook_id(nb), v)}.json") or []
        counts = _counts(rows)
        lines.append(f"| [{part}]({nbs[0].as_posix()}) | {len(nbs)} | {counts[0]} | {counts[1]} |")
    return "\n".join(lines) + "\n"


def stage(profile: str = "quick", dest: Path | None = None) -> tuple[Path, list[str]]:
    """Lay out the book's sources in ``dest`` (default ``build/book-src``) with its ``myst.yml``; returns the folder
    and the problems found (links to missing files)."""
    check_choice("profile", profile, PROFILES)
    root = repo_root()
    dest = Path(dest or root / "build" / "book-src")
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "theme").mkdir(parents=True)
    # a site template that needs nothing: MyST writes the site's content, mpe.book draws the pages
    (dest / "theme" / "template.yml").write_text("myst: v1\nkind: site\ntitle: mpe.book static pages\n")
    st = _Stage(dest, profile)
    readme = (root / "README.md").read_text()
    title, intro, sections = _split_readme(readme)
    guide = {s: dest / "guide" / f"{_slug(_GUIDE_TITLES.get(s, s))}.md" for s, _ in sections}
    # markdown files the README links to become pages of their own
    linked = [(root / u.partition("#")[0]).resolve() for u in re.findall(r"\]\(([^()\s]+\.md)(?:#[^)]*)?\)", readme)
              if not re.match(r"[a-z]+:", u)]
    extra = {p: dest / "files" / p.relative_to(root) for p in dict.fromkeys(linked) if p.is_file()}
    st.pages.update({(root / nb).resolve(): dest / nb for nb in notebooks()} | extra)
    st.pages[(root / "README.md").resolve()] = dest / "index.md"

    titles = {nb: _stage_notebook(st, root / nb, dest / nb) for nb in notebooks()}
    (dest / "index.md").write_text(f"# {title}\n\n" + st.relink(intro, root / "README.md", dest / "index.md")
                                   + "\n\n" + _parts(profile))
    (dest / "gallery.md").write_text(_gallery(st, titles))
    for (s, body), page in zip(sections, guide.values()):
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(f"# {_GUIDE_TITLES.get(s, s)}\n\n" + st.relink(body, root / "README.md", page))
    for src, page in extra.items():  # a figure's table has no title of its own
        text = src.read_text()
        head = "" if text.startswith("# ") else f"# Figure `{src.stem}`: its table ({src.parent.name} profile)\n\n"
        page.parent.mkdir(parents=True, exist_ok=True)
        page.write_text(head + st.relink(text, src, page))

    toc = [{"file": "index.md"}, {"file": "gallery.md"}]
    for folder, part in SECTIONS.items():
        nbs = [nb.as_posix() for nb in _in_order(folder)]
        if nbs:
            toc.append({"title": part, "children": [{"file": f} for f in nbs]})
    toc.append({"title": "Guide", "children": [{"file": p.relative_to(dest).as_posix()} for p in guide.values()]
                + [{"file": p.relative_to(dest).as_posix(), **({"hidden": True} if p.parent.name == profile else {})}
                   for p in extra.values()]})
    config = {"version": 1, "project": {"title": TITLE, "toc": toc}, "site": {"template": "./theme"}}
    (dest / "myst.yml").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")  # JSON is YAML
    return dest, st.problems


# ------------------------------------------------------------------------------------------------------------------
# 2. MyST
# ------------------------------------------------------------------------------------------------------------------
def myst_executable() -> str | None:
    """The ``myst`` command of this environment (the ``book`` extra), else the one on the PATH, else None."""
    exe = Path(sys.executable).with_name("myst")
    return str(exe) if exe.exists() else shutil.which("myst")


def myst_site(src: Path) -> Path:
    """Run ``myst build --site`` in ``src``; the site's content folder (``_build/site``)."""
    exe = myst_executable()
    if exe is None:
        raise RuntimeError("the book needs MyST: pip install -e '.[book]' (mystmd, which also needs Node.js >= 18)")
    if shutil.which("node") is None:
        raise RuntimeError("MyST needs Node.js >= 18 on the PATH (Debian: apt-get install nodejs)")
    shutil.rmtree(src / "_build", ignore_errors=True)
    res = subprocess.run([exe, "build", "--site"], cwd=src, capture_output=True, text=True,
                         env={**os.environ, "MYSTMD_NO_UPDATE_CHECK": "1", "CI": "1"})
    site = src / "_build" / "site"
    if res.returncode != 0 or not (site / "config.json").exists():
        raise RuntimeError(f"myst build --site failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return site


# ------------------------------------------------------------------------------------------------------------------
# 3. the pages
# ------------------------------------------------------------------------------------------------------------------
_ESC = html.escape
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Renderer:
    """MyST's content tree (mdast with MyST's nodes and Jupyter outputs) as HTML."""

    SIMPLE = {"paragraph": "p", "strong": "strong", "emphasis": "em", "superscript": "sup", "subscript": "sub",
              "delete": "del", "blockquote": "blockquote", "tableRow": "tr", "caption": "figcaption",
              "legend": "div", "span": "span", "abbreviation": "abbr", "definitionList": "dl", "definitionTerm": "dt",
              "definitionDescription": "dd", "footnoteDefinition": "div"}
    TRANSPARENT = {"root", "mystDirective", "mystRole", "include", "cite", "citeGroup"}

    def __init__(self, href):
        self.href, self.problems = href, []

    def __call__(self, node) -> str:
        return self.node(node)

    def kids(self, node) -> str:
        return "".join(self.node(c) for c in node.get("children", []))

    def node(self, n) -> str:
        t = n["type"]
        if t == "text":
            return _ESC(n["value"], quote=False)
        if t in self.SIMPLE:
            return f"<{self.SIMPLE[t]}>{self.kids(n)}</{self.SIMPLE[t]}>"
        if t in self.TRANSPARENT:
            return self.kids(n)
        method = getattr(self, "n_" + t, None)
        if method is None:
            self.problems.append(f"node type {t!r} drawn as its children")
            return self.kids(n)
        return method(n)

    # blocks
    def n_block(self, n):
        kind = "cell" if n.get("kind") == "notebook-code" else "block"
        return f'<div class="{kind}" id="{_ESC(n.get("html_id", ""))}">{self.kids(n)}</div>'

    def n_heading(self, n):
        d, i = n["depth"], _ESC(n.get("html_id", n.get("identifier", "")))
        return f'<h{d} id="{i}">{self.kids(n)}<a class="anchor" href="#{i}">#</a></h{d}>'

    def n_thematicBreak(self, n):
        return "<hr>"

    def n_break(self, n):
        return "<br>"

    def n_list(self, n):
        tag = "ol" if n.get("ordered") else "ul"
        start = f' start="{n["start"]}"' if n.get("ordered") and n.get("start", 1) != 1 else ""
        return f"<{tag}{start}>{self.kids(n)}</{tag}>"

    def n_listItem(self, n):
        return f"<li>{self.kids(n)}</li>"

    def n_table(self, n):
        return f'<div class="table"><table>{self.kids(n)}</table></div>'

    def n_tableCell(self, n):
        tag = "th" if n.get("header") else "td"
        align = f' style="text-align:{n["align"]}"' if n.get("align") else ""
        return f"<{tag}{align}>{self.kids(n)}</{tag}>"

    def n_code(self, n):
        cls = f"code language-{_ESC(n.get('lang') or 'text')}"
        return f'<pre class="{cls}"><code>{_ESC(n["value"], quote=False)}</code></pre>'

    def n_inlineCode(self, n):
        return f"<code>{_ESC(n['value'], quote=False)}</code>"

    def n_html(self, n):
        return n["value"]

    def n_comment(self, n):
        return ""

    def n_admonition(self, n):
        return f'<aside class="admonition {_ESC(n.get("kind", "note"))}">{self.kids(n)}</aside>'

    def n_admonitionTitle(self, n):
        return f'<p class="admonition-title">{self.kids(n)}</p>'

    def n_container(self, n):
        return f'<figure id="{_ESC(n.get("html_id", ""))}">{self.kids(n)}</figure>'

    # links, images, references
    def n_link(self, n):
        return f'<a href="{_ESC(self.href(n))}">{self.kids(n)}</a>'

    def n_crossReference(self, n):
        return self.n_link(n)

    def n_image(self, n):
        return f'<img src="{_ESC(self.href(n))}" alt="{_ESC(n.get("alt", ""))}">'

    def n_footnoteReference(self, n):
        return f'<sup><a href="#fn-{_ESC(n.get("identifier", ""))}">{_ESC(str(n.get("enumerator", "*")))}</a></sup>'

    # equations: KaTeX's MathML part (MyST renders every equation with KaTeX, HTML and MathML)
    def _math(self, n, display):
        m = re.search(r"<math\b.*?</math>", n.get("html", ""), re.S)
        if m is None:
            self.problems.append(f"equation not rendered by MyST: {n['value'][:80]}")
            return f'<code class="math-source">{_ESC(n["value"], quote=False)}</code>'
        return (m.group(0).replace("<math ", '<math display="block" ', 1) if display else m.group(0))

    def n_inlineMath(self, n):
        return self._math(n, False)

    def n_math(self, n):
        return f'<div class="math" id="{_ESC(n.get("html_id", ""))}">{self._math(n, True)}</div>'

    # notebook outputs
    def n_outputs(self, n):
        return f'<div class="outputs">{self.kids(n)}</div>' if n.get("children") else ""

    def n_output(self, n):
        out = n["jupyter_data"]
        kind = out["output_type"]
        if kind == "stream":
            text = out["text"] if isinstance(out["text"], str) else "".join(out["text"])
            return f'<pre class="output {_ESC(out.get("name", "stdout"))}">{_ESC(_ANSI.sub("", text), quote=False)}</pre>'
        if kind == "error":
            tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
            return f'<pre class="output error">{_ESC(tb, quote=False)}</pre>'
        data = out.get("data", {})
        for mime in ("image/png", "image/jpeg", "image/svg+xml", "image/gif"):
            if mime in data:
                return f'<img class="output" src="{_ESC(self.href({"url": data[mime].get("path", "")}))}" alt="output">'
        if "text/html" in data:
            return f'<div class="output html">{data["text/html"]["content"]}</div>'
        if "text/plain" in data:
            return f'<pre class="output">{_ESC(data["text/plain"]["content"], quote=False)}</pre>'
        self.problems.append(f"an output with only {sorted(data)} left out")
        return ""


_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde1e8; --accent: #2f5fb3; --code: #f5f6f8; }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); display: flex; }
nav.sidebar { width: 19rem; flex: none; height: 100vh; position: sticky; top: 0; overflow-y: auto; padding: 1rem;
  border-right: 1px solid var(--line); font-size: 0.86rem; background: #fafbfc; }
nav.sidebar a { display: block; color: var(--fg); text-decoration: none; padding: 0.15rem 0.3rem; border-radius: 4px; }
nav.sidebar a:hover { background: #eef1f6; }
nav.sidebar a.current { background: #e1e8f5; font-weight: 600; }
nav.sidebar .book-title { font-weight: 700; font-size: 1rem; margin-bottom: 0.8rem; }
nav.sidebar .part { margin: 0.9rem 0 0.2rem; font-weight: 700; color: var(--muted); text-transform: uppercase;
  font-size: 0.72rem; letter-spacing: 0.04em; }
main { flex: 1; min-width: 0; padding: 1.5rem 2.5rem 4rem; }
article { max-width: 62rem; }
a { color: var(--accent); }
h1 { font-size: 1.7rem; line-height: 1.25; }
h2 { margin-top: 2rem; border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; }
a.anchor { margin-left: 0.4rem; color: var(--line); text-decoration: none; font-weight: 400; }
h1:hover a.anchor, h2:hover a.anchor, h3:hover a.anchor { color: var(--muted); }
pre { background: var(--code); padding: 0.7rem 0.9rem; overflow-x: auto; font-size: 0.82rem; line-height: 1.4;
  border-radius: 6px; }
pre.code { border-left: 3px solid var(--accent); }
pre.output { background: #fff; border: 1px solid var(--line); }
pre.stderr { background: #fff7f5; }
code { font-size: 0.88em; }
.outputs { margin: -0.4rem 0 1.2rem 1rem; }
.output.html { overflow-x: auto; font-size: 0.85rem; }
div.table { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid var(--line); padding: 0.3rem 0.55rem; vertical-align: top; }
th { background: #f2f4f7; }
img { max-width: 100%; height: auto; }
td img { width: 16rem; height: 10rem; max-width: none; object-fit: contain; object-position: left top; }
div.math { overflow-x: auto; margin: 0.8rem 0; }
math { font-size: 1.08em; }
aside.admonition { border-left: 4px solid var(--accent); background: #f3f6fc; padding: 0.4rem 1rem; margin: 1rem 0; }
.badges { margin: -0.4rem 0 1rem; font-size: 0.9rem; }
.badges a { margin-right: 1rem; }
footer.pager { display: flex; justify-content: space-between; max-width: 62rem; margin-top: 3rem; padding-top: 1rem;
  border-top: 1px solid var(--line); }
@media (max-width: 900px) { body { display: block; } nav.sidebar { width: auto; height: auto; position: static; } }
"""


CURRENT = ' class="current"'


def _page_file(slug: str, index: str) -> str:
    return "index.html" if slug == index else f"{slug}.html"


def render(site: Path, out: Path) -> list[str]:
    """Write MyST's site content (``site``: ``config.json``, ``content/``, ``public/``) as HTML pages in ``out``;
    returns the problems met (node types drawn as their children, equations MyST could not render)."""
    config = json.loads((site / "config.json").read_text())
    project = config["projects"][0]
    index = project["index"]
    pages = [p for p in project["pages"] if "slug" in p]
    slugs = [index] + [p["slug"] for p in pages]  # in reading order; then the pages left out of the navigation
    slugs += sorted({f.stem for f in (site / "content").glob("*.json")} - set(slugs))
    titles = {p["slug"]: p["title"] for p in pages}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(site / "public", out, dirs_exist_ok=True)
    (out / "book.css").write_text(_CSS.lstrip())

    def href(n):
        url = n.get("url", "")
        if re.match(r"[a-z]+:", url) or url.startswith("#"):
            return url
        path, _, anchor = url.partition("#")
        anchor = anchor or (n.get("html_id") or n.get("identifier") or "" if n["type"] == "crossReference" else "")
        if n.get("static") or n["type"] == "image" or "." in path.rsplit("/", 1)[-1]:
            target = path.lstrip("/")
        else:
            target = _page_file(path.strip("/") or index, index)
        return target + (f"#{anchor}" if anchor else "")

    problems = []
    for k, slug in enumerate(slugs):
        data = json.loads((site / "content" / f"{slug}.json").read_text())
        r = _Renderer(href)
        body = r(data["mdast"])
        problems += [f"{slug}: {p}" for p in r.problems]
        title = data["frontmatter"].get("title", titles.get(slug, slug))
        nav = [f'<a class="book-title" href="index.html">{_ESC(TITLE)}</a>',
               f'<a{CURRENT if slug == index else ""} href="index.html">Home</a>']
        for p in project["pages"]:
            if "slug" not in p:
                nav.append(f'<div class="part">{_ESC(p["title"])}</div>')
            else:
                cur = CURRENT if p["slug"] == slug else ""
                short = p["title"].split(" — ", 1)[-1]
                nav.append(f'<a{cur} href="{_page_file(p["slug"], index)}">{_ESC(short)}</a>')
        badges = ""
        exports = [e for e in data["frontmatter"].get("exports", []) if e.get("format") == "ipynb"]
        if exports:
            badges = (f'<div class="badges"><a href="{_ESC(exports[0]["url"].lstrip("/"))}" download>'
                      "Download the notebook</a></div>")
        pager = []
        if k > 0:
            pager.append(f'<a href="{_page_file(slugs[k - 1], index)}">← {_ESC(titles.get(slugs[k - 1], "Home"))}</a>')
        if k + 1 < len(slugs) and slugs[k + 1] in titles:
            pager.append(f'<a href="{_page_file(slugs[k + 1], index)}">{_ESC(titles[slugs[k + 1]])} →</a>')
        (out / _page_file(slug, index)).write_text(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_ESC(title)}</title><link rel=\"stylesheet\" href=\"book.css\"></head>\n<body>"
            f"<nav class=\"sidebar\">{''.join(nav)}</nav>\n<main><article><h1>{_ESC(title)}</h1>{badges}\n{body}\n"
            f"</article><footer class=\"pager\">{''.join(pager)}</footer></main></body></html>\n")
    return problems


def build(profile: str = "quick", out: Path | None = None, src: Path | None = None) -> tuple[Path, list[str]]:
    """Stage, build with MyST and render the book into ``out`` (default ``build/book``); (out, problems)."""
    root = repo_root()
    out = Path(out or root / "build" / "book")
    staged, problems = stage(profile, src)
    problems += render(myst_site(staged), out)
    return out, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpe.book", description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="quick", choices=PROFILES)
    ap.add_argument("--out", default=None, help="the site's folder (default build/book)")
    a = ap.parse_args(argv)
    try:
        out, problems = build(a.profile, a.out)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"book: {out}/index.html ({len(list(out.glob('*.html')))} pages)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
