"""Offline check of the docs site (Quarto itself only runs in the GitHub deploy workflow).

Every notebook in nbs/ goes through nbdev's docs processors (what `nbdev_proc_nbs` does before Quarto, here
into a temporary folder, so nothing is written into the repository), then through `nbconvert --to html`
without execution: the committed outputs are what the site shows. Each page must embed every image output
of its notebook (cells hidden with `#| hide`, `#| include: false` or `#| output: false` excepted) and
contain no error output. Then the pages with figures are opened in headless Chromium, which must decode and
lay out every image; a screenshot of each of them (from its largest figure on) is saved for people to look
at.

    python .ci/render_docs.py                   # all of the above; fails if no browser is found
    python .ci/render_docs.py --no-browser      # HTML checks only
    python .ci/render_docs.py --browser PATH    # a given chromium / chrome binary
    python .ci/render_docs.py --which-browser   # print the browser that would be used (exit 1: none)

Pages are written to `_docs_html/` (git-ignored). Run from anywhere; the repository root is found from
this file's location."""
import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.utils.base import NbConvertBase

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
OUT = ROOT / "_docs_html"
NOTEBOOK_GLOBS = ("*.ipynb", "tutorials/*.ipynb")
FIGURE_PAGES = ("00_data", "04_metrics", "05_visualization", "05a_genomap", "tutorials/aml_walkthrough", "tutorials/kang_walkthrough")  # must have figures, and show them in the browser
IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
BROWSERS = ("chromium", "google-chrome", "google-chrome-stable", "chromium-browser")
# Without the networking switches headless Chromium waits on refused connections (no internet here).
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", "--virtual-time-budget=10000")
# Appended to a copy of each page: once everything has loaded, count the images, the decoded ones and the
# ones laid out with a size. Decoded: a size from the header (naturalWidth > 0) and a painted last row of
# pixels, which catches truncated data (Chromium shows the rows it could read, the rest stays transparent;
# matplotlib figures have an opaque background).
PROBE = """<script>
function lastRowPainted(image) {
  var canvas = document.createElement("canvas");
  canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
  var context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  var row = context.getImageData(0, canvas.height - 1, canvas.width, 1).data;
  for (var k = 3; k < row.length; k += 4) if (row[k] > 0) return true;
  return false;
}
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var decoded = images.filter(function (i) { return i.complete && i.naturalWidth > 0 && lastRowPainted(i); });
  var shown = decoded.filter(function (i) { var r = i.getBoundingClientRect(); return r.width > 0 && r.height > 0; });
  document.body.setAttribute("data-render-check", [images.length, decoded.length, shown.length].join(" "));
});
</script>
"""
# For the screenshot copy: drop the cells above the largest figure so that it is in view (headless
# screenshots of a scrolled page come out blank).
FROM_LARGEST_FIGURE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var area = function (i) { return i.naturalWidth * i.naturalHeight; };
  var largest = images.reduce(function (a, b) { return area(b) > area(a) ? b : a; }, images[0]);
  var cell = largest && largest.closest(".jp-Cell");
  while (cell && cell.previousElementSibling) cell.previousElementSibling.remove();
});
</script>
"""


class CheckFailed(Exception): pass


@contextmanager
def env_var(name, value):
    "Set an environment variable for the duration of a block, then restore it."
    old = os.environ.get(name)
    os.environ[name] = value
    try: yield
    finally:
        if old is None: del os.environ[name]
        else: os.environ[name] = old


def nbdev_process(src: Path,  # a notebook in nbs/
                  dst: Path,  # where to write the processed notebook
                  ) -> tuple[dict, list[str]]:
    "Run nbdev's docs processors on one notebook as `nbdev_proc_nbs` does; return its frontmatter and nbdev's warnings."
    from execnb.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults
    nb = read_nb(src)
    with warnings.catch_warnings(record=True) as caught, env_var("IN_TEST", "1"):  # nbdev.serve_drv sets IN_TEST
        warnings.simplefilter("always")
        FilterDefaults()(nb)
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    notes = [note(str(w.message)) for w in caught if "nbdev" in Path(w.filename).parts]
    return dict(getattr(nb, "frontmatter_", {}) or {}), notes


def note(warning: str) -> str:
    "One line for an nbdev warning: its first line, and the first line of the cell it quotes, if any."
    first, *quoted = warning.strip().split("\n---\n")
    return first.splitlines()[0] + (f" (cell starting {quoted[0].splitlines()[0]!r})" if quoted else "")


def cell_options(source: str) -> tuple[dict, str]:
    "Quarto's leading `#| key: value` cell options, and the code without them."
    lines = source.splitlines()
    n = next((i for i, line in enumerate(lines) if not line.startswith("#|")), len(lines))
    options = dict(line[2:].split(":", 1) for line in lines[:n] if ":" in line)
    return {k.strip(): v.strip() for k, v in options.items()}, "\n".join(lines[n:])


def strip_link_attributes(markdown: str) -> str:
    "Drop pandoc attributes after links (`[source](url){target=...}` from show_doc), which only Quarto reads."
    return re.sub(r"(\]\([^)\s]*\))\{[^}\n]*\}", r"\1", markdown)


def quarto_like(nb, frontmatter: dict):
    "Do what Quarto does with nbdev's output and nbconvert does not: title block from frontmatter, cell options."
    cells = []
    for cell in nb.cells:
        if cell.cell_type == "raw" and cell.source.startswith("---"): continue  # the frontmatter: title block below
        if cell.cell_type == "markdown": cell.source = strip_link_attributes(cell.source)
        if cell.cell_type == "code":
            options, cell.source = cell_options(cell.source)
            if options.get("include") == "false": continue
            if options.get("output") == "false": cell.outputs = []
            if options.get("echo") == "false": cell.metadata["transient"] = {"remove_source": True}
            for out in cell.outputs:
                if "text/markdown" in out.get("data", {}):
                    out.data["text/markdown"] = strip_link_attributes(out.data["text/markdown"])
        cells.append(cell)
    title = frontmatter.get("title", "")
    header = f"# {title}" + (f"\n\n> {frontmatter['description']}" if frontmatter.get("description") else "")
    nb.cells = ([nbformat.v4.new_markdown_cell(header)] if title else []) + cells
    nb.metadata["title"] = title
    return nb


def shown_mime(output) -> str | None:
    "The mime type nbconvert renders for an output (its display priority), or None for streams and errors."
    data = output.get("data", {})
    return next((m for m in NbConvertBase().display_data_priority if m in data), None)


def image_outputs(nb) -> list[tuple[str, str]]:
    "(mime type, data) of every output the page shows as an image."
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [(m, o["data"][m]) for o in outputs if (m := shown_mime(o)) in IMAGE_MIMES]


def data_uri(mime: str, data: str) -> str:
    "The `src` nbconvert gives the `<img>` of an image output."
    if mime == "image/svg+xml": return f"data:{mime};base64," + base64.b64encode(data.encode()).decode()
    return f"data:{mime};base64," + re.sub(r"\s", "", data)


def check_html(name: str, nb, html: str) -> int:
    "Fail unless the page embeds each image output of the processed notebook and shows no error; return the count."
    errors = [c for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    if errors: raise CheckFailed(f"{len(errors)} error output(s) on the page (first in: {errors[0].source[:60]!r})")
    images = image_outputs(nb)
    missing = [i for i, (mime, data) in enumerate(images) if data_uri(mime, data) not in html]
    if missing: raise CheckFailed(f"image output(s) {missing} of {len(images)} are not embedded in the HTML")
    if name in FIGURE_PAGES and not images:
        raise CheckFailed("this page should show figures but its notebook has no image outputs (outputs cleared?)")
    return len(images)


def find_browser(path: str | None) -> str | None:
    "The browser binary: `path` if given (a name on PATH or a file), else the first of BROWSERS on PATH."
    if path: return shutil.which(path) or (path if Path(path).is_file() else None)
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def run_browser(browser: str, work: Path, *args: str) -> str:
    "Run headless Chromium with a fresh profile; return its stdout."
    profile = Path(tempfile.mkdtemp(prefix="profile_", dir=work))
    cmd = [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args]
    try: res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired: raise CheckFailed(f"browser timed out after 180 s: {' '.join(cmd)}")
    if res.returncode != 0:
        raise CheckFailed(f"browser exited with {res.returncode}: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return res.stdout


def with_script(html: str, script: str, path: Path) -> str:
    "Write a copy of the page with `script` before `</body>`; return its file URI."
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html.replace("</body>", script + "</body>", 1) if "</body>" in html else html + script)
    return path.as_uri()


def check_in_browser(name: str, html: str, n_images: int, browser: str, work: Path):
    "Fail unless the browser finds `n_images` images on the page, all decoded and laid out with a size."
    dom = run_browser(browser, work, "--dump-dom", with_script(html, PROBE, work / "probe" / f"{name}.html"))
    found = re.search(r'data-render-check="(\d+) (\d+) (\d+)"', dom)
    if not found: raise CheckFailed("the page's load event never fired in the browser (no probe result)")
    total, decoded, shown = map(int, found.groups())
    if not total == decoded == shown == n_images:
        raise CheckFailed(f"browser found {total} images, {decoded} decoded, {shown} laid out; "
                          f"expected {n_images} figures, all decoded and shown")


def screenshot(name: str, html: str, png: Path, browser: str, work: Path):
    "Save a screenshot of the page from its largest figure on."
    uri = with_script(html, FROM_LARGEST_FIGURE, work / "shot" / f"{name}.html")
    run_browser(browser, work, "--window-size=1280,1000", f"--screenshot={png}", uri)
    if not png.exists() or png.stat().st_size < 20_000: raise CheckFailed(f"screenshot {png} is missing or blank")


def notebooks() -> list[Path]:
    "Every notebook of the site, in order."
    return sorted(p for g in NOTEBOOK_GLOBS for p in NBS.glob(g) if not p.name.startswith(("_", ".")))


def render_page(src: Path, out: Path, browser: str | None, work: Path) -> tuple[str, list[str]]:
    "Process, convert and check one notebook; return its summary and nbdev's warnings."
    rel = src.relative_to(NBS)
    name = rel.with_suffix("").as_posix()
    frontmatter, notes = nbdev_process(src, work / "proc" / rel)
    nb = quarto_like(nbformat.read(work / "proc" / rel, as_version=4), frontmatter)
    exporter = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True)  # Quarto shows no prompts
    html, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}})
    page = out / rel.with_suffix(".html")
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(html)
    n_images = check_html(name, nb, html)
    n_hidden = len(image_outputs(nbformat.read(src, as_version=4))) - n_images
    summary = f"{n_images:2d} figures in the HTML" + (f" ({n_hidden} in hidden cells)" if n_hidden else "")
    summary += f", {len(html) / 1e6:.1f} MB"
    if browser and n_images:
        check_in_browser(name, html, n_images, browser, work)
        png = out / rel.with_suffix(".png")
        screenshot(name, html, png, browser, work)
        summary += f"; browser: {n_images}/{n_images} decoded and shown, screenshot {png.relative_to(out)}"
    return summary, notes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-browser", action="store_true", help="only the HTML checks, no headless browser")
    parser.add_argument("--browser", help=f"browser binary (default: first of {', '.join(BROWSERS)} on PATH)")
    parser.add_argument("--which-browser", action="store_true", help="print the browser found and exit (1: none)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the HTML pages and screenshots")
    args = parser.parse_args(argv)
    browser = None if args.no_browser else find_browser(args.browser)
    if args.which_browser:
        print(browser or "none")
        return 0 if browser else 1
    if not args.no_browser and browser is None:
        print(f"render_docs: FAIL: no headless browser found (tried {args.browser or ', '.join(BROWSERS)}). "
              "Install one (Debian: apt-get install chromium), pass --browser PATH, "
              "or run with --no-browser to check the HTML only.", file=sys.stderr)
        return 2
    pages = notebooks()
    absent = [p for p in FIGURE_PAGES if NBS / f"{p}.ipynb" not in pages]
    if absent:
        print(f"render_docs: FAIL: pages that must show figures are missing: {absent} (update FIGURE_PAGES)", file=sys.stderr)
        return 1
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    os.environ.setdefault("MPLBACKEND", "Agg")
    out, start, failed = args.out.resolve(), time.time(), []
    if out == OUT: shutil.rmtree(out, ignore_errors=True)  # no stale pages or screenshots from an earlier run
    with tempfile.TemporaryDirectory(prefix="render_docs_") as tmp:
        for src in pages:
            name, t0 = src.relative_to(NBS).with_suffix("").as_posix(), time.time()
            try:
                summary, notes = render_page(src, out, browser, Path(tmp))
                print(f"ok    {name:<26} {summary} [{time.time() - t0:.1f} s]", flush=True)
                for line in notes: print(f"      nbdev warning: {line}")
            except Exception as e:  # a check that failed, or nbdev / nbconvert unable to process the notebook
                failed.append(name)
                print(f"FAIL  {name:<26} {e if isinstance(e, CheckFailed) else f'{type(e).__name__}: {e}'}", flush=True)
    where = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    took = f"{len(pages)} pages in {time.time() - start:.0f} s, HTML in {where}/"
    if failed:
        print(f"render_docs: FAIL: {', '.join(failed)} ({took})", file=sys.stderr)
        return 1
    print(f"render_docs: OK: {took}; " + (f"figures checked in {browser}" if browser else
                                          "HTML only, NO BROWSER CHECK (--no-browser)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
