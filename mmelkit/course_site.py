"""A static, offline HTML site of the course: the course map as the index page, one page per
executed chapter (the HTML `mmelkit course run` writes, plotly.js embedded, so the plots stay
interactive without a network).

The index page is rendered by nbconvert, like the chapters: the course map
(``notebooks/README.md``) becomes one markdown cell whose links to ``NN_name.ipynb`` point at the
chapter pages. ``bash setup.sh course`` writes the site to ``build/site/`` after running the course;
``mmelkit course site`` does it on its own from ``build/html/``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat

from mmelkit.course import course_notebooks, notebooks_dir

MAP_FILE = "README.md"
_CHAPTER_LINK = re.compile(r"\]\((\d\d_[^)/]+)\.ipynb\)")


def build_site(html_dir: str | Path = "build/html", out_dir: str | Path = "build/site",
               notebooks_path: str | Path | None = None) -> list[Path]:
    """Write ``out_dir/index.html`` (the course map) and copy each chapter's page from ``html_dir``;
    returns the pages written. A chapter without a page (not executed yet) stays in the map, its
    link marked "(not executed)"."""
    from nbconvert import HTMLExporter

    folder = notebooks_dir(notebooks_path)
    source = folder / MAP_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no course map at {source}: the index page is made from it")
    html_dir, out = Path(html_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages: list[Path] = []
    executed = set()
    for notebook in course_notebooks(folder):
        page = html_dir / f"{notebook.stem}.html"
        if page.is_file():
            shutil.copyfile(page, out / page.name)
            pages.append(out / page.name)
            executed.add(notebook.stem)

    def link(match: re.Match[str]) -> str:
        stem = match.group(1)
        return f"]({stem}.html)" if stem in executed else f"]({stem}.ipynb) (not executed)"

    text = _CHAPTER_LINK.sub(link, source.read_text(encoding="utf-8"))
    index = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(text)])
    body, _ = HTMLExporter(exclude_input_prompt=True).from_notebook_node(index, resources={"metadata": {"name": "mmelkit course"}})
    (out / "index.html").write_text(body, encoding="utf-8")
    return [out / "index.html", *pages]
