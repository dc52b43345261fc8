"""Run the course notebooks with papermill, one parameter profile at a time.

The course is every notebook named ``NN_*.ipynb`` (two digits, an underscore, a name) in the
``notebooks/`` folder at the repository root, run in sorted order. ``notebooks/profiles.yaml``
holds parameter profiles::

    cpu:                 # small enough for CI on two CPU cores
      00_tour:
        num_images: 4
    gpu:                 # full size
      00_tour:
        device: cuda

A profile maps a notebook's file stem to values for parameters of that notebook's
``parameters``-tagged cell; a notebook a profile does not mention runs with its defaults.

From Python::

    from mmelkit.course import run_course
    results = run_course("cpu", out_dir="build")

or from a shell: ``mmelkit course run --profile cpu``. Executed notebooks go to
``<out_dir>/notebooks/<name>.ipynb`` and HTML renderings to ``<out_dir>/html/<name>.html``.

Everything that can be checked without running anything (the profile exists, the notebooks it
names exist, every parameter it sets is defined in that notebook's parameters cell) is checked
before the first notebook starts; such problems raise :class:`CourseConfigError`, a
``ValueError``. A notebook that fails while running raises :class:`CourseError`, after its
partly executed copy has been written.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import time
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

NOTEBOOK_PATTERN = re.compile(r"^\d\d_.+\.ipynb$")
PROFILES_FILE = "profiles.yaml"
PARAMETERS_TAG = "parameters"
DEFAULT_CELL_TIMEOUT = 600.0  # seconds one cell may run unless the caller says otherwise
DEFAULT_NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


class CourseConfigError(ValueError):
    """The course cannot start: unknown profile or notebook, a parameter no notebook defines..."""


class CourseError(RuntimeError):
    """A course notebook failed while it ran.

    ``notebook`` is the source notebook, ``output`` the executed (partial) copy, ``cell_index``
    the index of the failing cell in the source notebook (``None`` when unknown), ``ename`` and
    ``evalue`` the exception's name and message as the kernel reported them, ``results`` the
    notebooks that completed before it.
    """

    def __init__(
        self,
        message: str,
        *,
        notebook: Path,
        output: Path | None,
        cell_index: int | None,
        ename: str,
        evalue: str,
    ) -> None:
        super().__init__(message)
        self.notebook = notebook
        self.output = output
        self.cell_index = cell_index
        self.ename = ename
        self.evalue = evalue
        self.results: list[NotebookResult] = []


@dataclass
class NotebookResult:
    """One executed notebook."""

    name: str  # file name, e.g. "00_tour.ipynb"
    path: Path  # the executed notebook
    html: Path | None  # its HTML rendering, if one was asked for
    seconds: float  # wall time, kernel start included
    profile: str  # the profile it ran under ("auto" already resolved)
    parameters: dict[str, Any] = field(default_factory=dict)  # the values the profile set


@dataclass(frozen=True)
class Parameter:
    """One assignment in a notebook's parameters cell."""

    name: str
    default: Any  # the value, or the right-hand side as written when it is not a literal
    source: str  # the right-hand side as written
    help: str  # the comment on the assignment's line(s), else the comment lines right above it
    literal: bool  # whether ``default`` is the evaluated value


# -- finding notebooks and profiles ----------------------------------------------------------------
def notebooks_dir(path: str | Path | None = None) -> Path:
    """The notebooks folder: ``path`` if given, else the course's own ``notebooks/``."""
    folder = Path(path).expanduser().resolve() if path is not None else DEFAULT_NOTEBOOKS_DIR
    if not folder.is_dir():
        raise CourseConfigError(f"notebooks folder {folder} does not exist")
    return folder


def course_notebooks(path: str | Path | None = None) -> list[Path]:
    """The course notebooks (``NN_*.ipynb``) in the notebooks folder, in the order they run."""
    folder = notebooks_dir(path)
    return sorted(p for p in folder.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))


def load_profiles(path: str | Path | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``profiles.yaml`` of the notebooks folder: profile -> notebook stem -> parameter values.

    A missing file means no profiles; empty entries (``00_tour:`` with nothing after it) mean
    "no overrides".
    """
    import yaml

    file = notebooks_dir(path) / PROFILES_FILE
    if not file.is_file():
        return {}
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CourseConfigError(f"{file} is not valid YAML: {error}") from error
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise CourseConfigError(f"{file}: the top level must map profile names to notebooks")
    profiles: dict[str, dict[str, dict[str, Any]]] = {}
    for profile, notebooks in raw.items():
        notebooks = notebooks or {}
        if not isinstance(notebooks, dict):
            raise CourseConfigError(f"{file}: profile {profile!r} must map notebook names to parameters")
        entries: dict[str, dict[str, Any]] = {}
        for stem, values in notebooks.items():
            values = values or {}
            if not isinstance(values, dict):
                raise CourseConfigError(
                    f"{file}: profile {profile!r}, notebook {stem!r}: expected a mapping of parameter "
                    f"names to values, got {values!r}"
                )
            entries[_stem(str(stem))] = {str(k): v for k, v in values.items()}
        profiles[str(profile)] = entries
    return profiles


def list_profiles(path: str | Path | None = None) -> list[str]:
    """Names of the parameter profiles in ``profiles.yaml``."""
    return list(load_profiles(path))


def resolve_profile(profile: str) -> str:
    """``"auto"`` -> ``"gpu"`` when CUDA is available, else ``"cpu"``; other names unchanged."""
    if profile != "auto":
        return profile
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# -- reading parameters cells ----------------------------------------------------------------------
def parameters_cells(notebook: nbformat.NotebookNode) -> list[int]:
    """Indices of the cells tagged ``parameters``."""
    return [
        index
        for index, cell in enumerate(notebook.cells)
        if PARAMETERS_TAG in (cell.get("metadata", {}).get("tags") or [])
    ]


def describe_parameters(path: str | Path) -> list[Parameter]:
    """The parameters a notebook's ``parameters``-tagged cell defines, in the order written.

    A notebook without such a cell has none. More than one such cell, or one that is not valid
    Python, is a :class:`CourseConfigError` (papermill would silently use the first).
    """
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    cells = parameters_cells(notebook)
    if not cells:
        return []
    if len(cells) > 1:
        raise CourseConfigError(
            f"{path.name}: {len(cells)} cells are tagged 'parameters' (cells {cells}); keep one"
        )
    return _parse_parameters(notebook.cells[cells[0]].source, path.name)


def notebook_parameters(path: str | Path) -> dict[str, Any]:
    """Parameter names of a notebook with their default values (the source text for non-literals)."""
    return {p.name: p.default for p in describe_parameters(path)}


def _parse_parameters(source: str, where: str) -> list[Parameter]:
    # IPython magics and shell escapes are not Python; blank them, keeping line numbers.
    lines = source.splitlines()
    python = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)
    try:
        tree = ast.parse(python)
    except SyntaxError as error:
        raise CourseConfigError(f"{where}: the parameters cell is not valid Python: {error}") from error
    comments = _comments_by_line(python)

    found: dict[str, Parameter] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        help_text = _help_for(node, comments)
        for target in targets:
            for name, part in _names_and_values(target, value):
                text = ast.get_source_segment(python, part) or ""
                try:
                    default, literal = ast.literal_eval(part), True
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    default, literal = text, False
                found[name] = Parameter(name, default, text, help_text, literal)
    return list(found.values())


def _names_and_values(target: ast.expr, value: ast.expr) -> list[tuple[str, ast.expr]]:
    if isinstance(target, ast.Name):
        return [(target.id, value)]
    if isinstance(target, (ast.Tuple, ast.List)):
        values = value.elts if isinstance(value, (ast.Tuple, ast.List)) else None
        if values is not None and len(values) == len(target.elts):
            return [
                pair for t, v in zip(target.elts, values, strict=True) for pair in _names_and_values(t, v)
            ]
        return [(t.id, value) for t in target.elts if isinstance(t, ast.Name)]
    return []  # attribute or subscript assignments are not parameters


def _comments_by_line(python: str) -> dict[int, tuple[str, bool]]:
    """line number -> (comment text, whether the line holds nothing but the comment)."""
    comments: dict[int, tuple[str, bool]] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(python).readline):
            if token.type == tokenize.COMMENT:
                own_line = token.line[: token.start[1]].strip() == ""
                comments[token.start[0]] = (token.string.lstrip("#").strip(), own_line)
    except (tokenize.TokenError, IndentationError):
        pass
    return comments


def _help_for(node: ast.stmt, comments: dict[int, tuple[str, bool]]) -> str:
    end = node.end_lineno or node.lineno
    trailing = [comments[n][0] for n in range(node.lineno, end + 1) if n in comments and not comments[n][1]]
    if trailing:
        return " ".join(trailing)
    above: list[str] = []
    line = node.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    return " ".join(above)


# -- planning --------------------------------------------------------------------------------------
def _stem(name: str) -> str:
    return name[: -len(".ipynb")] if name.endswith(".ipynb") else name


def plan_course(
    profile: str = "auto",
    notebooks: Sequence[str] | None = None,
    notebooks_path: str | Path | None = None,
) -> tuple[str, list[tuple[Path, dict[str, Any]]]]:
    """Check everything that can be checked before running; return the resolved profile name and
    ``(notebook, parameters)`` pairs in run order. Raises :class:`CourseConfigError`."""
    folder = notebooks_dir(notebooks_path)
    available = {p.stem: p for p in course_notebooks(folder)}
    profiles = load_profiles(folder)
    resolved = resolve_profile(profile)
    if resolved not in profiles:
        known = ", ".join(profiles) or f"none: {folder / PROFILES_FILE} defines no profiles"
        chosen = (
            f" ('auto' chose it: CUDA is {'' if resolved == 'gpu' else 'not '}available)"
            if profile == "auto"
            else ""
        )
        raise CourseConfigError(f"unknown profile {resolved!r}{chosen}; profiles: {known} (or 'auto')")
    if isinstance(notebooks, str):
        notebooks = [notebooks]

    if notebooks is None:
        selected = list(available.values())
    else:
        wanted = [_stem(Path(n).name) for n in notebooks]
        missing = [n for n in wanted if n not in available]
        if missing:
            raise CourseConfigError(
                f"no course notebook named {', '.join(map(repr, missing))} in {folder}; "
                f"notebooks: {', '.join(available) or 'none'}"
            )
        selected = [available[n] for n in sorted(set(wanted))]
    if not selected:
        raise CourseConfigError(f"no course notebooks (NN_*.ipynb) in {folder}")

    settings = profiles[resolved]
    unknown = [stem for stem in settings if stem not in available]
    if unknown:
        raise CourseConfigError(
            f"profile {resolved!r} in {folder / PROFILES_FILE} names notebook(s) that do not exist: "
            f"{', '.join(map(repr, unknown))}; notebooks: {', '.join(available) or 'none'}"
        )
    for stem, values in settings.items():
        if not values:
            continue
        defined = notebook_parameters(available[stem])
        if not defined:
            raise CourseConfigError(
                f"profile {resolved!r} sets {', '.join(values)} for {stem}.ipynb, which has no cell tagged "
                "'parameters'"
            )
        extra = [name for name in values if name not in defined]
        if extra:
            raise CourseConfigError(
                f"profile {resolved!r} sets {', '.join(map(repr, extra))} for {stem}.ipynb, whose parameters "
                f"cell does not define {'it' if len(extra) == 1 else 'them'}; parameters: {', '.join(defined)}"
            )
    return resolved, [(path, dict(settings.get(path.stem, {}))) for path in selected]


# -- running ---------------------------------------------------------------------------------------
def _kernel_manager_class(current_python: bool) -> type:
    """A jupyter_client kernel manager class for one notebook run.

    ``current_python``: start ipykernel with this very interpreter and ignore kernelspecs. The
    ``python3`` kernelspec Jupyter finds first is not necessarily this interpreter's: ``ipykernel
    install --user`` run from another environment writes one with that environment's absolute
    path, which would run the course without mmelkit.
    """
    import zmq
    from ipykernel.kernelspec import RESOURCES, get_kernel_dict
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    traits = set(KernelSpec.class_trait_names())
    spec = {k: v for k, v in get_kernel_dict().items() if k in traits}
    # Encrypt the localhost ZMQ traffic where both sides can (jupyter_client >= 8.10 with
    # ipykernel >= 7); that also keeps ipykernel from warning about plain TCP at every start.
    encrypt = (
        current_python
        and "transport_encryption" in AsyncKernelManager.class_trait_names()
        and zmq.has("curve")
    )

    class CourseKernelManager(AsyncKernelManager):
        if current_python:

            @property
            def kernel_spec(self) -> KernelSpec:
                if self._kernel_spec is None:
                    self._kernel_spec = KernelSpec(resource_dir=RESOURCES, name="python3", **spec)
                return self._kernel_spec

        if encrypt:

            @default("transport_encryption")
            def _encrypt_by_default(self) -> str:
                return "auto"

    return CourseKernelManager


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip():
            return line.strip()
    return "(empty cell)"


def _source_index(
    source_nb: nbformat.NotebookNode, executed_nb: nbformat.NotebookNode, index: int
) -> int | None:
    """Index in the source notebook of cell ``index`` of the executed one (papermill inserts a
    cell with the injected parameters); ``None`` if it is that injected cell."""
    cell = executed_nb.cells[index]
    if "injected-parameters" in (cell.get("metadata", {}).get("tags") or []):
        return None
    cell_id = cell.get("id")
    if cell_id:
        for i, original in enumerate(source_nb.cells):
            if original.get("id") == cell_id:
                return i
    injected = [
        i
        for i, c in enumerate(executed_nb.cells)
        if "injected-parameters" in (c.get("metadata", {}).get("tags") or [])
    ]
    return index - sum(1 for i in injected if i < index)


def _describe_cell(
    source_nb: nbformat.NotebookNode, executed_nb: nbformat.NotebookNode, index: int
) -> tuple[int | None, str]:
    source_index = _source_index(source_nb, executed_nb, index)
    cell = executed_nb.cells[index]
    count = f" (In [{cell.execution_count}])" if cell.get("execution_count") else ""
    if source_index is None:
        return None, f"the injected-parameters cell{count}"
    return source_index, f"cell {source_index}{count} `{_first_line(cell.source)}`"


def _running_cell(executed_nb: nbformat.NotebookNode) -> int | None:
    """The last cell papermill started (the one that was running when execution stopped)."""
    started = [
        i
        for i, cell in enumerate(executed_nb.cells)
        if cell.get("metadata", {}).get("papermill", {}).get("start_time")
    ]
    return started[-1] if started else None


PLOTLY_MIME = "application/vnd.plotly.v1+json"


def _plotly_outputs_as_html(notebook: nbformat.NotebookNode) -> None:
    """Give every plotly figure output an HTML version, which nbconvert can render.

    In a kernel outside JupyterLab, plotly emits only its own mimetype, which HTML exports drop.
    plotly.js is embedded once per page, so the HTML works offline.
    """
    first = True
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            data = output.get("data") or {}
            if PLOTLY_MIME not in data or "text/html" in data:
                continue
            import plotly.io as pio

            figure = dict(data[PLOTLY_MIME])
            config = figure.pop("config", None)
            data["text/html"] = pio.to_html(
                figure, config=config, include_plotlyjs=first, full_html=False, validate=False
            )
            first = False


def _export_html(notebook: Path, target: Path) -> Path:
    from nbconvert import HTMLExporter

    node = nbformat.read(notebook, as_version=4)
    _plotly_outputs_as_html(node)
    body, _ = HTMLExporter().from_notebook_node(node, resources={"metadata": {"name": notebook.stem}})
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(body, encoding="utf-8")
    return target


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def run_course(
    profile: str = "auto",
    out_dir: str | Path = "build",
    notebooks: Sequence[str] | None = None,
    html: bool = True,
    kernel_name: str | None = None,
    progress: bool = True,
    *,
    timeout: float | None = DEFAULT_CELL_TIMEOUT,
    notebooks_path: str | Path | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list[NotebookResult]:
    """Execute the course notebooks under a parameter profile; return one result per notebook.

    ``profile``: a name from ``profiles.yaml``, or ``"auto"`` (``"gpu"`` when CUDA is available,
    else ``"cpu"``). ``notebooks``: run only these (file stems or names); default all, in order.
    ``html``: also render each executed notebook to HTML. ``kernel_name``: a Jupyter kernelspec
    to run them with; default: ipykernel on the interpreter running this function, whatever
    kernelspecs are installed. ``progress``: one line per notebook on stderr. ``timeout``: seconds
    one cell may run (``None``: no limit). ``notebooks_path``: another notebooks folder.
    ``overrides``: notebook stem -> parameter values that replace the profile's (checked like them).

    Each notebook runs with the notebooks folder as its working directory. Executed notebooks are
    written to ``out_dir/notebooks/``, HTML to ``out_dir/html/``. Configuration problems raise
    :class:`CourseConfigError` before anything runs; the first notebook that fails raises
    :class:`CourseError` (its partial copy, and HTML if asked for, are written first) and the
    rest do not run.
    """
    import papermill
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    resolved, plan = plan_course(profile, notebooks, notebooks_path)
    folder = notebooks_dir(notebooks_path)
    chosen = {p.stem: p for p, _ in plan}
    for stem, values in (overrides or {}).items():
        if stem not in chosen:
            raise CourseConfigError(f"overrides name {stem!r}, which is not among the notebooks to run: {', '.join(chosen)}")
        unknown = [name for name in values if name not in notebook_parameters(chosen[stem])]
        if unknown:
            raise CourseConfigError(f"overrides set {', '.join(map(repr, unknown))} for {stem}.ipynb, whose parameters "
                                    "cell does not define them")
    plan = [(path, {**parameters, **(overrides or {}).get(path.stem, {})}) for path, parameters in plan]
    current_python = kernel_name is None
    if not current_python:
        _check_kernel(kernel_name)
    kernel, language = ("python3", "python") if current_python else (kernel_name, None)
    out = Path(out_dir).expanduser().resolve()  # absolute: papermill changes directory while it runs
    (out / "notebooks").mkdir(parents=True, exist_ok=True)

    results: list[NotebookResult] = []
    for number, (source, parameters) in enumerate(plan, start=1):
        executed = out / "notebooks" / source.name
        html_path = out / "html" / f"{source.stem}.html" if html else None
        shown = ", ".join(f"{k}={v!r}" for k, v in parameters.items()) or "defaults"
        _say(progress, f"[{number}/{len(plan)}] {source.name} ({resolved}: {shown}) ...")
        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                cwd=str(folder),
                kernel_name=kernel,
                language=language,
                progress_bar=False,
                log_output=False,
                execution_timeout=timeout,
                kernel_manager_class=_kernel_manager_class(current_python),
            )
        except (PapermillExecutionError, CellTimeoutError, DeadKernelError) as error:
            failure = error
        seconds = time.perf_counter() - started

        if failure is None:
            if html_path is not None:
                _export_html(executed, html_path)
            _say(progress, f"[{number}/{len(plan)}] {source.name} done in {seconds:.1f} s")
            results.append(NotebookResult(source.name, executed, html_path, seconds, resolved, parameters))
            continue

        _say(progress, f"[{number}/{len(plan)}] {source.name} FAILED after {seconds:.1f} s")
        error = _course_error(source, executed, html_path, failure, timeout)
        error.results = results
        raise error from failure
    return results


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel as error:
        known = ", ".join(sorted(KernelSpecManager().find_kernel_specs())) or "none"
        raise CourseConfigError(
            f"no Jupyter kernel named {kernel_name!r}; installed kernels: {known}"
        ) from error


def _course_error(
    source: Path,
    executed: Path,
    html_path: Path | None,
    failure: BaseException,
    timeout: float | None,
) -> CourseError:
    from papermill.exceptions import PapermillExecutionError
    from papermill.execute import remove_error_markers

    source_nb = nbformat.read(source, as_version=4)
    executed_nb = None
    if executed.is_file():
        # papermill's cell_index counts cells before it added its error-marker cells to the file.
        executed_nb = remove_error_markers(nbformat.read(executed, as_version=4))

    if isinstance(failure, PapermillExecutionError):
        index: int | None = failure.cell_index
        ename, evalue = failure.ename, failure.evalue
    elif executed_nb is not None:
        index = _running_cell(executed_nb)
        if type(failure).__name__ == "CellTimeoutError":
            ename, evalue = (
                "CellTimeoutError",
                f"the cell ran longer than the per-cell timeout of {timeout} s",
            )
        else:
            ename, evalue = type(failure).__name__, str(failure) or "the kernel died"
    else:
        index, ename, evalue = None, type(failure).__name__, str(failure)

    where, source_index = "an unknown cell", None
    if executed_nb is not None and index is not None and index < len(executed_nb.cells):
        source_index, where = _describe_cell(source_nb, executed_nb, index)
    elif index is not None:
        where = f"cell {index}"

    lines = [f"{source.name} failed in {where}", f"    {ename}: {evalue}".rstrip()]
    if executed.is_file():
        if html_path is not None:
            try:
                _export_html(executed, html_path)
            except Exception:  # the HTML is a convenience; the notebook itself is what matters
                html_path = None
        lines.append(f"The partly executed notebook is {executed}")
        if html_path is not None:
            lines.append(f"(HTML: {html_path})")
    return CourseError(
        "\n".join(lines),
        notebook=source,
        output=executed if executed.is_file() else None,
        cell_index=source_index,
        ename=ename,
        evalue=evalue,
    )
