"""The documentation site, checked rather than trusted: it builds in strict mode (a broken link, a page
missing from the navigation or a stale API name fails), every ``bash`` and ``python`` block of the getting
started and how-to pages runs as written, and both tutorial notebooks run as the site is built."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_PAGES = [DOCS / "getting-started.md", *sorted((DOCS / "howto").glob("*.md"))]
NOTEBOOKS = sorted((DOCS / "tutorials").glob("*.ipynb"))
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "NO_MKDOCS_2_WARNING": "1",  # Material's banner about MkDocs 2, not a warning of this site's
    }


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced blocks that run: (language, code) for ``bash`` and ``python``, in order."""
    return [(lang, code) for lang, code in FENCE.findall(page.read_text()) if lang in ("bash", "python")]


def test_the_site_builds_strictly_with_the_generated_references_and_the_run_tutorials(tmp_path):
    site = tmp_path / "site"
    env = _env()
    del env["MPLBACKEND"]  # the notebooks' kernel then draws inline, as in Jupyter: the page shows the plot
    env["PFEDLORA_DOCS_EXECUTE"] = "true"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    # MkDocs' own warnings (the notebooks' kernel may warn of its local TCP transport: not the site's)
    assert not re.search(r"^WARNING\s+-", built.stderr, re.MULTILINE), built.stderr[-4000:]
    reference = (site / "reference" / "configuration" / "index.html").read_text()
    assert "<!-- pfedlora:configuration-reference -->" not in reference
    from pfedlora.config import default_options, flat_config, load_config

    for key in flat_config(load_config(None, [])):  # every key of every section, with its docstring's words
        section = key.split(".")[0]
        if section not in default_options():
            assert f"<code>{key}</code>" in reference, key
    for algorithm in default_options():
        assert f"<code>[{algorithm}]</code>" in reference, algorithm
    api = (site / "reference" / "api" / "index.html").read_text()
    assert "run_experiment" in api and ":func:" not in api and ":class:" not in api
    # The build ran every tutorial (a cell that raises fails it): each page shows what its cells printed,
    # and the federation tutorial its plot.
    pages = {n.stem: (site / "tutorials" / n.stem / "index.html").read_text() for n in NOTEBOOKS}
    assert re.search(r"last mean accuracy \d+\.\d\d%, \d+\.\d\d MB sent", pages["federation-from-python"])
    assert "data:image/png;base64," in pages["federation-from-python"]
    assert all("jp-OutputArea-output" in page for page in pages.values())
    stderr = re.compile(r'<div [^>]*data-mime-type="application/vnd.jupyter.stderr"')  # a warning shown
    assert not any(stderr.search(page) for page in pages.values())


@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.name)
def test_every_snippet_of_the_page_runs_as_written(tmp_path, page):
    runnable = blocks(page)
    assert runnable, f"{page.name} shows no runnable example"
    python = "\n\n".join(code for lang, code in runnable if lang == "python")
    for lang, code in runnable:
        if lang == "bash":
            result = _run(["bash", "-euo", "pipefail", "-c", code], tmp_path)
            assert result.returncode == 0, f"{code}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    if python:
        result = _run([sys.executable, "-c", python], tmp_path)
        assert result.returncode == 0, f"{result.stdout[-2000:]}{result.stderr[-3000:]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_tutorial_notebook_is_saved_without_outputs(notebook):
    """The site's build runs it (above): outputs saved in the file would only go stale."""
    book = nbformat.read(notebook, as_version=4)
    assert not any(cell.get("outputs") for cell in book.cells if cell.cell_type == "code")


def test_there_are_two_tutorials_and_the_readme_fits_on_two_screens():
    assert [n.stem for n in NOTEBOOKS] == ["federation-from-python", "own-algorithm"]
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 100, len(lines)
    assert "make docs" in "\n".join(lines)
