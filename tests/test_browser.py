"""Chapter 02 and its explorer in a real browser: JupyterLab, headless Chromium, Playwright.

The other notebook tests execute the course with nbclient/papermill, which never runs the front
end: a widget that does not render, a plot that does not redraw, or a JavaScript error in an
extension (ipywidgets, anywidget, plotly) would pass them. This test does what a student does:

1. copies ``notebooks/02_model_level_saliency.ipynb`` into a temporary folder with its
   ``parameters`` cell rewritten to the ``cpu`` profile of ``notebooks/profiles.yaml`` (JupyterLab
   does not inject papermill parameters), so the run stays short;
2. starts ``jupyter lab`` (this interpreter, a free port on 127.0.0.1, a random token, its own
   Jupyter config/data/runtime folders and a ``python3`` kernelspec pointing at this interpreter,
   so no user setting or foreign kernel leaks in);
3. opens the notebook in headless Chromium via Playwright's sync API, runs all cells (the
   ``notebook:run-all-cells`` command, what Run > Run All Cells does), waits until every code
   cell has an execution count and the kernel is idle, and fails on any error output;
4. finds the explorer (``mmelkit.viz.explorer.SceneExplorer``: ipywidgets controls above plotly
   ``FigureWidget``) in the DOM, records the plotted data (the traces' ``z`` and the title of the
   plotly graph div), picks another method in its "method" dropdown and checks that the plot's
   data and title change;
5. fails on any front-end error: ``console.error`` messages and uncaught page errors (only the
   benign messages in :data:`BENIGN_CONSOLE_ERRORS`, each explained, are ignored).

JupyterLab is always shut down (REST shutdown, then SIGTERM, then SIGKILL), also on failure.

Browser: Playwright's own Chromium (``python -m playwright install chromium``) when present,
else a system Chromium (``chromium`` on PATH, ``/usr/bin/chromium`` from Debian's ``chromium``
package, ...). ``MMELKIT_TEST_CHROMIUM=/path/to/chrome`` uses that binary only (and fails if it
does not launch); ``MMELKIT_TEST_CHROMIUM=`` (set, empty) hides the system browsers, which is how
a machine without one looks here. When Playwright is not installed or no browser can be launched,
the test is *skipped* with a message naming what is missing and how to install it; every other
problem (JupyterLab, the kernel, the notebook, the widgets) is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest

from mmelkit import course

pytestmark = [pytest.mark.notebooks, pytest.mark.timeout(900)]

CHAPTER = "02_model_level_saliency"
PROFILE = "cpu"
# The explorer's method dropdown starts at the first method; the test switches to this one (cheap:
# one forward pass, and its map differs from grad_eclip's).
FIRST_METHOD, OTHER_METHOD = "grad_eclip", "maskclip"

SERVER_START_TIMEOUT = 120.0  # seconds until JupyterLab answers
RUN_ALL_TIMEOUT = 600.0  # seconds for every cell of the chapter (cpu profile: about 30 s on 2 busy cores)
WIDGET_TIMEOUT = 120.0  # seconds for the plot to follow a widget change

# System browsers, tried in this order (names are looked up on PATH).
SYSTEM_CHROMIUMS = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "/usr/bin/chromium",
    "/usr/lib/chromium/chromium",
)
INSTALL_HINT = (
    "install a browser with `apt-get install chromium` (Debian/Ubuntu; `bash setup.sh test` does this "
    "when it runs as root) or `python -m playwright install chromium`, or point MMELKIT_TEST_CHROMIUM "
    "at a Chromium/Chrome binary"
)

# console.error messages that are not failures of the course. Each entry is a substring of the
# message text; keep this list short and explain every entry.
BENIGN_CONSOLE_ERRORS: tuple[str, ...] = ()


# -- the browser ------------------------------------------------------------------------------------
@dataclass
class BrowserChoice:
    """How Chromium was launched (``executable`` None: Playwright's own build)."""

    executable: str | None
    version: str


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _system_chromium_candidates() -> tuple[list[str], str]:
    """System browsers to try (paths found on PATH or at the usual places), and where they were
    looked for. ``MMELKIT_TEST_CHROMIUM`` set but empty hides them all."""
    if os.environ.get("MMELKIT_TEST_CHROMIUM") == "":
        return [], "not searched (MMELKIT_TEST_CHROMIUM is set and empty)"
    found: list[str] = []
    for name in SYSTEM_CHROMIUMS:
        path = shutil.which(name)
        if path and os.path.realpath(path) not in {os.path.realpath(p) for p in found}:
            found.append(path)
    return found, "not found (looked for " + ", ".join(SYSTEM_CHROMIUMS) + ")"


def launch_chromium(playwright: Any) -> tuple[Any, BrowserChoice]:
    """Launch headless Chromium and say which one it is.

    ``MMELKIT_TEST_CHROMIUM=/path``: that binary only, and a failure to launch it fails the test
    (someone asked for it). Otherwise Playwright's own build first, then the system browsers of
    :data:`SYSTEM_CHROMIUMS`; when none launches, ``pytest.skip`` listing every attempt with its
    error and how to install a browser.
    """
    explicit = os.environ.get("MMELKIT_TEST_CHROMIUM", "")
    if explicit:
        try:
            browser = playwright.chromium.launch(executable_path=explicit, headless=True)
        except Exception as error:
            pytest.fail(f"MMELKIT_TEST_CHROMIUM={explicit} does not launch: {_first_line(error)}")
        return browser, BrowserChoice(explicit, browser.version)
    tried: list[str] = []
    try:
        browser = playwright.chromium.launch(headless=True)
        return browser, BrowserChoice(None, browser.version)
    except Exception as error:  # most often: "Executable doesn't exist at ~/.cache/ms-playwright/..."
        tried.append(f"Playwright's own Chromium: {_first_line(error)}")
    candidates, where = _system_chromium_candidates()
    for path in candidates:
        try:
            browser = playwright.chromium.launch(executable_path=path, headless=True)
            return browser, BrowserChoice(path, browser.version)
        except Exception as error:  # e.g. missing shared libraries
            tried.append(f"system Chromium {path}: {_first_line(error)}")
    if not candidates:
        tried.append(f"system Chromium: {where}")
    pytest.skip("browser test skipped: no Chromium could be launched. " + "; ".join(tried) + ". To run it, "
                + INSTALL_HINT + ".")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium driven by Playwright; skips (saying what is missing) when there is none."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        pytest.skip(
            f"browser test skipped: the Python package 'playwright' is not installed ({error}). "
            "Install it with `pip install playwright` (it is in mmelkit's dev extra: "
            "`pip install -e '.[dev]'`), then " + INSTALL_HINT + "."
        )
    with sync_playwright() as playwright:
        launched, choice = launch_chromium(playwright)
        print(f"[browser] Chromium {choice.version} ({choice.executable or 'Playwright build'})")
        try:
            yield launched
        finally:
            launched.close()


# -- the notebook -----------------------------------------------------------------------------------
def profile_notebook(source: Path, target: Path, profile: str = PROFILE) -> dict[str, Any]:
    """Copy ``source`` to ``target`` with its parameters cell set to ``profile``'s values.

    The assignments from ``profiles.yaml`` are appended to the parameters cell (later assignments
    win, as with papermill's injected cell). Every profile value must name a parameter the cell
    defines. Returns the values applied.
    """
    notebook = nbformat.read(source, as_version=4)
    cells = course.parameters_cells(notebook)
    assert len(cells) == 1, f"{source.name}: expected one cell tagged 'parameters', found {len(cells)}"
    values = course.load_profiles(source.parent).get(profile, {}).get(source.stem, {})
    known = {p.name for p in course.describe_parameters(source)}
    unknown = sorted(set(values) - known)
    assert not unknown, f"profile {profile!r} sets {unknown}, which {source.name}'s parameters cell does not define"
    cell = notebook.cells[cells[0]]
    lines = [f"{name} = {value!r}" for name, value in values.items()]
    cell.source = cell.source.rstrip() + f"\n\n# profile {profile!r} (tests/test_browser.py)\n" + "\n".join(lines) + "\n"
    nbformat.write(notebook, target)
    return values


# -- JupyterLab -------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: its URL, token, root folder and log file."""

    process: subprocess.Popen
    port: int
    token: str
    root: Path
    log: Path
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.base}/{path.lstrip('/')}?token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 5.0) -> Any:
        request = urllib.request.Request(
            f"{self.base}/api/{path}", method=method, data=b"" if method == "POST" else None,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _isolated_jupyter_env(home: Path) -> dict[str, str]:
    """Environment for the server: its own Jupyter folders, a python3 kernel of this interpreter,
    notebook cells all rendered (no windowing), no network look-ups, one thread per kernel."""
    config, data, runtime = home / "config", home / "data", home / "runtime"
    kernel = data / "kernels" / "python3"
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mmelkit test)",
        "language": "python",
    }))
    # Render every cell (JupyterLab 4 may virtualise cells outside the viewport, leaving them out
    # of the DOM), never autosave into the copy, and show no news pop-up.
    settings = config / "lab" / "user-settings" / "@jupyterlab"
    (settings / "notebook-extension").mkdir(parents=True)
    (settings / "notebook-extension" / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    (settings / "docmanager-extension").mkdir(parents=True)
    (settings / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    (settings / "apputils-extension").mkdir(parents=True)
    (settings / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    runtime.mkdir()
    env = dict(os.environ)
    env.update({
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_DATA_DIR": str(data),
        "JUPYTER_RUNTIME_DIR": str(runtime),
        "JUPYTER_PREFER_ENV_PATH": "0",  # our data folder (and its python3 kernelspec) first
        "JUPYTER_PLATFORM_DIRS": "0",
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: extra threads only contend on small CI boxes
    return env


def _die_with_parent() -> None:
    """In the server process before exec (Linux): SIGTERM it when the test process dies, so a
    pytest killed outright (a hard timeout, Ctrl-C twice) leaves no JupyterLab behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_lab(root: Path, home: Path) -> Lab:
    """Start ``jupyter lab`` serving ``root`` and wait until its REST API answers."""
    port, token = free_port(), secrets.token_hex(16)
    log = home / "jupyterlab.log"
    command = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",  # jupyter_server 2.x (ServerApp.token is deprecated)
        f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: commands and the notebook model
        f"--LabApp.workspaces_dir={home / 'workspaces'}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",  # no PyPI queries from the extension manager
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")  # CI containers often run as root
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=_isolated_jupyter_env(home), start_new_session=True,
                                   preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    lab = Lab(process, port, token, root, log)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {process.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("status")
            return lab
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            stop_lab(lab)
            raise RuntimeError(f"jupyter lab did not answer within {SERVER_START_TIMEOUT:.0f} s:\n{lab.log_tail()}")
        time.sleep(0.5)


def stop_lab(lab: Lab) -> None:
    """Shut JupyterLab and its kernels down: REST shutdown, then SIGTERM, then SIGKILL of its group."""
    if lab.process.poll() is None:
        try:
            lab.api("shutdown", method="POST")
        except Exception:
            pass  # already going, or not answering: the signals below do it
    for sig, wait in ((None, 15.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if sig is not None and lab.process.poll() is None:
            try:
                os.killpg(lab.process.pid, sig)
            except ProcessLookupError:
                break
        try:
            lab.process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def lab(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """JupyterLab serving a folder with chapter 02 set to the cpu profile (browser first: a
    machine without one skips before anything starts)."""
    home = tmp_path_factory.mktemp("browser")
    root = home / "notebooks"
    root.mkdir()
    source = course.notebooks_dir() / f"{CHAPTER}.ipynb"
    values = profile_notebook(source, root / source.name)
    print(f"[lab] {source.name} with profile {PROFILE!r}: {values}")
    running = start_lab(root, home)
    try:
        yield running
    finally:
        stop_lab(running)


# -- in the page ------------------------------------------------------------------------------------
# The open notebook's state, read from JupyterLab's own model (window.jupyterapp).
NOTEBOOK_STATE_JS = """
() => {
  const app = window.jupyterapp;
  const panel = app && app.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model || !panel.sessionContext) return null;
  const session = panel.sessionContext.session;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const errors = [];
    const outputs = cell.model.outputs;
    for (let j = 0; j < outputs.length; j++) {
      const out = outputs.get(j).toJSON();
      if (out.output_type === 'error') errors.push(`${out.ename}: ${out.evalue}`);
    }
    const source = cell.model.sharedModel.getSource();
    cells.push({index, count: cell.model.executionCount, errors,
                explorer: source.includes('SceneExplorer(')});
  });
  return {kernel: session && session.kernel ? session.kernel.status : null, cells};
}
"""

# The explorer's plotly graph div: data (typed arrays as lists) and title, as JSON.
PLOT_STATE_JS = """
(gd) => {
  const plain = (key, value) => ArrayBuffer.isView(value) ? Array.from(value) : value;
  const title = gd.layout && gd.layout.title;
  return JSON.stringify({
    traces: (gd.data || []).map(t => ({type: t.type, z: t.z})),
    title: title && typeof title === 'object' ? title.text : title,
  }, plain);
}
"""


@dataclass
class FrontEndErrors:
    """console.error messages and uncaught exceptions of the page."""

    messages: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        if message.type != "error":
            return
        text = f"console.error: {message.text} ({message.location.get('url', '')})"
        (self.ignored if any(b in message.text for b in BENIGN_CONSOLE_ERRORS) else self.messages).append(text)

    def page_error(self, error: Any) -> None:
        self.messages.append(f"uncaught page error: {error}")


def _wait_for_run_all(page: Any, timeout: float) -> dict[str, Any]:
    """Poll the notebook until every code cell ran and the kernel is idle; fail fast on an error output."""
    deadline, state, last_report = time.monotonic() + timeout, None, 0.0
    while time.monotonic() < deadline:
        state = page.evaluate(NOTEBOOK_STATE_JS)
        if state is not None:
            errors = [(c["index"], e) for c in state["cells"] for e in c["errors"]]
            assert not errors, "cells failed in the browser: " + "; ".join(f"cell {i}: {e}" for i, e in errors)
            done = sum(c["count"] is not None for c in state["cells"])
            if done == len(state["cells"]) and state["kernel"] == "idle":
                return state
            if time.monotonic() - last_report > 15:
                print(f"[run] {done}/{len(state['cells'])} cells, kernel {state['kernel']}")
                last_report = time.monotonic()
        page.wait_for_timeout(500)
    missing = [c for c in (state or {}).get("cells", []) if c["count"] is None]
    raise AssertionError(
        f"the notebook did not finish within {timeout:.0f} s: kernel {state and state['kernel']}, "
        f"{len(missing)} cells without an execution count (first: {missing[:1]})"
    )


def _plot_state(plot: Any) -> tuple[str, str | None]:
    """(sha256 of the traces' data, title) of a plotly graph div."""
    state = json.loads(plot.evaluate(PLOT_STATE_JS))
    data = json.dumps(state["traces"], sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest(), state["title"]


def test_chapter_02_explorer_runs_and_redraws_in_jupyterlab(lab: Lab, browser: Any,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """Run all of chapter 02 in JupyterLab; the explorer's plot must follow its method dropdown."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = FrontEndErrors()
    page.on("console", errors.console)
    page.on("pageerror", errors.page_error)
    started = time.monotonic()
    try:
        page.goto(lab.url(f"lab/tree/{CHAPTER}.ipynb"), wait_until="domcontentloaded")
        # the notebook is open and its kernel has started
        page.wait_for_function(
            "() => { const p = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
            " return !!(p && p.sessionContext && p.sessionContext.session && p.sessionContext.session.kernel"
            " && p.sessionContext.session.kernel.status === 'idle'); }",
            timeout=SERVER_START_TIMEOUT * 1000,
        )
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        state = _wait_for_run_all(page, RUN_ALL_TIMEOUT)
        print(f"[run] {len(state['cells'])} code cells ran in {time.monotonic() - started:.0f} s")

        # the explorer: the cell that builds a SceneExplorer, its widget box and plotly div
        explorers = [c["index"] for c in state["cells"] if c["explorer"]]
        assert explorers, "no cell of the chapter builds a SceneExplorer"
        index = explorers[-1]
        page.evaluate(
            "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].node"
            ".setAttribute('data-mmelkit-test', 'explorer')", index,
        )
        cell = page.locator("[data-mmelkit-test=explorer]")
        plot = cell.locator(".widget-vbox .js-plotly-plot").first
        plot.wait_for(state="visible", timeout=WIDGET_TIMEOUT * 1000)
        plot.scroll_into_view_if_needed()
        before, title_before = _plot_state(plot)
        assert title_before and title_before.startswith(FIRST_METHOD), f"unexpected first title {title_before!r}"
        dropdown = cell.locator(".widget-dropdown").filter(has=page.locator("label", has_text="method"))
        dropdown.locator("select").select_option(label=OTHER_METHOD)

        deadline, after, title_after = time.monotonic() + WIDGET_TIMEOUT, before, title_before
        while time.monotonic() < deadline:
            after, title_after = _plot_state(plot)
            if after != before and title_after and title_after.startswith(OTHER_METHOD):
                break
            page.wait_for_timeout(250)
        assert after != before, f"the explorer's plot data did not change after choosing {OTHER_METHOD}"
        assert title_after and title_after.startswith(OTHER_METHOD), (
            f"the explorer's title did not follow the method dropdown: {title_before!r} -> {title_after!r}"
        )
        print(f"[explorer] {title_before!r} data {before[:12]} -> {title_after!r} data {after[:12]}")
        final = _wait_for_run_all(page, WIDGET_TIMEOUT)  # the update ran cleanly; the kernel is idle again
        assert all(not c["errors"] for c in final["cells"])
        page.wait_for_timeout(500)  # let late console messages arrive
        assert not errors.messages, "front-end errors:\n" + "\n".join(errors.messages)
        print(f"[browser] done in {time.monotonic() - started:.0f} s; ignored: {errors.ignored}")
    except BaseException:
        shot = tmp_path_factory.mktemp("browser-failure") / "page.png"
        try:
            page.screenshot(path=str(shot), full_page=False)
            print(f"[browser] screenshot of the failure: {shot}")
        except Exception as error:
            print(f"[browser] no screenshot: {error}")
        print("[browser] front-end errors so far:\n" + "\n".join(errors.messages + errors.ignored))
        print("[lab] log tail:\n" + lab.log_tail())
        raise
    finally:
        context.close()
