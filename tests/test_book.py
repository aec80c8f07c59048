"""The book (``make book``): its renderer on hand-made MyST trees, then the whole book in headless Chromium: every page
loads, no internal link or image is broken, every equation is typeset, every gallery thumbnail is there."""
import functools
import http.server
import json
import re
import shutil
import threading

import pytest

from mpe import book
from mpe.harness import figure_id, notebook_id, notebooks, repo_root, variants

ARTEFACTS = repo_root() / "build" / "test-artefacts"


def _render(tree):
    r = book._Renderer(lambda n: n.get("url", ""))
    return r(tree), r.problems


def test_equations_are_mathml_and_unrendered_ones_are_reported():
    katex = ('<span class="katex"><span class="katex-mathml"><math xmlns="http://www.w3.org/1998/Math/MathML">'
             '<semantics><mi>x</mi></semantics></math></span><span class="katex-html">x</span></span>')
    html, problems = _render({"type": "paragraph", "children": [
        {"type": "inlineMath", "value": "x", "html": katex}, {"type": "math", "value": "x", "html": katex}]})
    assert html.count("<math") == 2 and 'display="block"' in html and "katex-html" not in html and not problems
    html, problems = _render({"type": "inlineMath", "value": r"\badmacro{x}"})
    assert "math-source" in html and problems == [r"equation not rendered by MyST: \badmacro{x}"]


def test_text_is_escaped_and_unknown_nodes_are_reported():
    html, problems = _render({"type": "root", "children": [
        {"type": "paragraph", "children": [{"type": "text", "value": "a < b & c"}]},
        {"type": "someNewNode", "children": [{"type": "text", "value": "kept"}]}]})
    assert html == "<p>a &lt; b &amp; c</p>kept"
    assert problems == ["node type 'someNewNode' drawn as its children"]


def test_outputs_streams_html_and_images():
    html, problems = _render({"type": "outputs", "children": [
        {"type": "output", "jupyter_data": {"output_type": "stream", "name": "stderr", "text": "\x1b[31mwarn <x>\n"}},
        {"type": "output", "jupyter_data": {"output_type": "execute_result", "data": {
            "text/html": {"content": "<table></table>"}, "text/plain": {"content": "df"}}}},
        {"type": "output", "jupyter_data": {"output_type": "display_data", "data": {
            "image/png": {"path": "/a-123.png"}, "text/plain": {"content": "<Figure>"}}}}]})
    assert '<pre class="output stderr">warn &lt;x&gt;\n</pre>' in html  # colour codes stripped
    assert "<table></table>" in html and "df" not in html and '<img class="output" src="/a-123.png"' in html
    assert not problems


def test_saved_figures_are_read_off_the_savefig_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("MPE_FIGURES_DIR", str(tmp_path))
    (tmp_path / "quick").mkdir()
    for name in ("mpe-fig4", "mpe-fig7", "regularity-testselection-never"):
        (tmp_path / "quick" / f"{name}.png").write_bytes(b"")
    loop = 'for fig_id in [(ID, False), ("mpe-fig7", True)]:\n    plots.savefig(fig, fig_id, profile)'
    assert book._saved_figures(loop, "mpe-fig4", "quick") == ["mpe-fig4", "mpe-fig7"]
    assert book._saved_figures('savefig(fig2, f"{ID}-never", profile)', "regularity-testselection", "quick") == [
        "regularity-testselection-never"]
    assert book._saved_figures("savefig(fig, ID, profile)", "mpe-fig2", "quick") == []  # no such figure written


def test_relinking_points_at_staged_pages_and_files(tmp_path):
    st = book._Stage(tmp_path, "quick")
    root = repo_root()
    nb = root / "notebooks" / "mpe" / "fig2_estimated_vs_true_deviation.ipynb"
    st.pages[nb.resolve()] = tmp_path / "notebooks" / "mpe" / nb.name
    text = ("[nb](notebooks/mpe/fig2_estimated_vs_true_deviation.ipynb#claims) ![f](figures/quick/mpe-fig2.png) "
            "[web](https://arxiv.org) [gone](no/such/file.txt)")
    out = st.relink(text, root / "README.md", tmp_path / "guide" / "page.md")
    assert out == ("[nb](../notebooks/mpe/fig2_estimated_vs_true_deviation.ipynb#claims) "
                   "![f](../files/figures/quick/mpe-fig2.png) [web](https://arxiv.org) gone")
    assert (tmp_path / "files" / "figures" / "quick" / "mpe-fig2.png").exists()
    assert st.problems == ["README.md: link to no/such/file.txt, which does not exist; kept as text"]


# ----------------------------------------------------------------------------------------------------------------
# the whole book, in a browser
# ----------------------------------------------------------------------------------------------------------------
def _missing():
    if shutil.which("node") is None:
        return "Node.js is not installed (MyST needs it: apt-get install nodejs)"
    if book.myst_executable() is None:
        return "mystmd is not installed (pip install -e '.[book]')"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[book]')"
    if _chromium() is None:
        return "Chromium is not installed (Debian: apt-get install chromium)"
    return None


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if (why := _missing()) is not None:
        pytest.skip(f"the book is not tested here: {why}")
    tmp = tmp_path_factory.mktemp("book")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MPE_FIGURES_DIR", str(repo_root() / "figures"))  # the stored figures, not a test run's
        out, problems = book.build("quick", out=tmp / "site", src=tmp / "src")
    assert problems == []
    return out


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield chromium.new_page(viewport={"width": 1300, "height": 1000}), f"http://127.0.0.1:{server.server_port}"
        chromium.close()
    server.shutdown()


def test_every_page_loads_with_its_images_links_and_equations(site, browser):
    page, base = browser
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    ids = {f.name: set(re.findall(r'\bid="([^"]+)"', f.read_text())) for f in site.glob("*.html")}
    assert len(ids) >= len(notebooks()) + 2
    bad = []
    for name in sorted(ids):
        page.goto(f"{base}/{name}", wait_until="load")
        state = page.evaluate("""() => {
            const body = document.querySelector('article').cloneNode(true);
            body.querySelectorAll('pre, code').forEach(e => e.remove());
            return {
              images: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src),
              links: Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href')),
              maths: document.querySelectorAll('math').length,
              flat: Array.from(document.querySelectorAll('math')).filter(m => m.getBoundingClientRect().width === 0).length,
              text: body.innerText,
            };
        }""")
        bad += [f"{name}: image not shown {src}" for src in state["images"]]
        bad += [f"{name}: {state['flat']} equations not typeset"] if state["flat"] else []
        bad += [f"{name}: raw TeX {m!r}" for m in re.findall(r"\$[^$\n]{1,60}\$|\\\(|\\\[", state["text"])]
        for href in state["links"]:
            if re.match(r"[a-z]+:", href):
                continue
            target, _, anchor = href.partition("#")
            target = target or name
            if not (site / target).is_file():
                bad.append(f"{name}: broken link {href}")
            elif anchor and target.endswith(".html") and anchor not in ids[target]:
                bad.append(f"{name}: link to a missing anchor {href}")
    assert not bad, "\n".join(bad[:30])
    assert not [f for f in failed if "favicon" not in f]
    page.goto(f"{base}/fig2-estimated-vs-true-deviation.html")
    assert page.evaluate("document.querySelectorAll('math').length") > 10  # the MPE's equations, typeset


def test_the_gallery_has_every_figure(site, browser):
    page, base = browser
    page.goto(f"{base}/gallery.html", wait_until="load")
    figures = repo_root() / "figures" / "quick"
    expected = [figure_id(notebook_id(nb), v) for nb in notebooks() for v in ["", *variants(notebook_id(nb), "quick")]]
    expected = [f for f in expected if (figures / f"{f}.png").exists()]
    thumbs = page.evaluate("Array.from(document.querySelectorAll('td img')).map(i => [i.alt, i.naturalWidth])")
    assert sorted(alt for alt, _ in thumbs) == sorted(expected) and all(w > 0 for _, w in thumbs)
    shown = json.dumps(page.evaluate("document.querySelector('article').innerText"))
    assert all(f in shown for f in expected)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "book-gallery.png"), full_page=True)
