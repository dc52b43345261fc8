"""Student and instructor versions of the course notebooks, built from one source of truth.

Each source notebook in ``notebooks/`` holds its exercises *with* their solutions, marked as
nbgrader marks them: inside a code cell, the lines between ``### BEGIN SOLUTION`` and
``### END SOLUTION`` are the solution. Such a cell is an **exercise**; the function it defines is
what the student writes (its docstring states the task and stays in both versions). The next code
cell tagged ``check`` tests it against the library (see :mod:`mmelkit.exercises`). Hints are
ordinary markdown cells, kept in both versions.

* **student** (``build/course/student/``): every solution region becomes one
  ``raise NotImplementedError(...)`` line naming the exercise; check cells carry Jupyter's
  ``raises-exception`` tag, so "Run All" (and papermill) goes on past an exercise not done yet.
  Outputs are cleared.
* **instructor** (``build/course/instructor/``): the solutions in, markers removed, each preceded
  by a "Solution" heading (collapsible in JupyterLab) and its source collapsed until opened.

Running the source notebooks is running the instructor version: the markers are comments.

A solution region left open, an ``### END SOLUTION`` without its begin, an exercise without a check
cell (or a check cell without an exercise) stops the build with a :class:`CourseBuildError` naming
the notebook and the cell.
"""

from __future__ import annotations

import ast
import copy
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import nbformat

from mmelkit.course import PROFILES_FILE, course_notebooks, notebooks_dir

Version = Literal["student", "instructor"]
VERSIONS: tuple[Version, ...] = ("student", "instructor")
BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
CHECK_TAG = "check"
EXERCISE_TAG = "exercise"  # set by the build on the cells that held a solution
RAISES_TAG = "raises-exception"  # Jupyter's own tag: the cell may raise, execution goes on
DEFAULT_OUT = Path("build") / "course"
_MARKER = re.compile(r"^(\s*)### (BEGIN|END) SOLUTION\s*$")


class CourseBuildError(ValueError):
    """A source notebook's exercise markup is broken; names the notebook and the cell."""

    def __init__(self, message: str, *, notebook: Path, cell_index: int) -> None:
        super().__init__(f"{notebook.name}, cell {cell_index}: {message}")
        self.notebook = notebook
        self.cell_index = cell_index


@dataclass(frozen=True)
class Exercise:
    """One exercise of a notebook: the cell holding the solution and the check cell testing it."""

    notebook: Path
    number: int  # 1, 2, ... within the notebook
    name: str  # the function (or first name) the exercise cell defines
    cell_index: int
    check_index: int


def _regions(source: str, notebook: Path, index: int) -> list[tuple[int, int, str]]:
    """(begin line, end line, indentation) of each solution region of a cell's source."""
    regions, opened = [], None
    for number, line in enumerate(source.splitlines()):
        match = _MARKER.match(line)
        if match is None:
            continue
        indent, kind = match.groups()
        if kind == "BEGIN":
            if opened is not None:
                raise CourseBuildError(f"'{BEGIN}' on line {number + 1} inside an open solution region",
                                       notebook=notebook, cell_index=index)
            opened = (number, indent)
        else:
            if opened is None:
                raise CourseBuildError(f"'{END}' on line {number + 1} without a '{BEGIN}' before it",
                                       notebook=notebook, cell_index=index)
            regions.append((opened[0], number, opened[1]))
            opened = None
    if opened is not None:
        raise CourseBuildError(f"the solution region opened on line {opened[0] + 1} is never closed ('{END}')",
                               notebook=notebook, cell_index=index)
    return regions


def _defined_name(source: str, number: int) -> str:
    """The first function (else class, else assigned name) a cell defines, for messages."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return f"exercise {number}"
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return node.name
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            return node.targets[0].id
    return f"exercise {number}"


def find_exercises(path: str | Path) -> list[Exercise]:
    """The exercises of a source notebook, with its markup checked (see the module docstring)."""
    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    exercises: list[Exercise] = []
    waiting: tuple[int, str] | None = None  # an exercise whose check cell has not come yet
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        is_check = CHECK_TAG in cell.metadata.get("tags", [])
        regions = _regions(cell.source, path, index)
        if regions and is_check:
            raise CourseBuildError("a check cell must not hold a solution region", notebook=path, cell_index=index)
        if regions:
            if waiting is not None:
                raise CourseBuildError(f"exercise '{waiting[1]}' (cell {waiting[0]}) has no check cell before the "
                                       "next exercise", notebook=path, cell_index=waiting[0])
            waiting = (index, _defined_name(cell.source, len(exercises) + 1))
        elif is_check:
            if waiting is None:
                raise CourseBuildError("a check cell without an exercise before it", notebook=path, cell_index=index)
            exercises.append(Exercise(path, len(exercises) + 1, waiting[1], waiting[0], index))
            waiting = None
    if waiting is not None:
        raise CourseBuildError(f"exercise '{waiting[1]}' has no check cell (a code cell tagged '{CHECK_TAG}')",
                               notebook=path, cell_index=waiting[0])
    return exercises


def stub_message(exercise: Exercise) -> str:
    return (f"Exercise {exercise.number} ({exercise.name}) is yours to write: replace this line with your "
            "code (the docstring says what to return; the hint above helps)")


def _student_source(source: str, regions: list[tuple[int, int, str]], message: str) -> str:
    lines = source.splitlines()
    out: list[str] = []
    previous = 0
    for begin, end, indent in regions:
        out += lines[previous:begin]
        out.append(f"{indent}raise NotImplementedError({message!r})")
        previous = end + 1
    out += lines[previous:]
    return "\n".join(out)


def _instructor_source(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if not _MARKER.match(line))


def build_notebook(path: str | Path, version: Version) -> nbformat.NotebookNode:
    """The ``version`` of one source notebook, as a notebook object (nothing written)."""
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}; got {version!r}")
    path = Path(path)
    exercises = {e.cell_index: e for e in find_exercises(path)}
    checks = {e.check_index for e in exercises.values()}
    source = nbformat.read(path, as_version=4)
    built = copy.deepcopy(source)
    cells = []
    for index, cell in enumerate(source.cells):
        cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        exercise = exercises.get(index)
        if exercise is not None:
            tags = [*cell.metadata.get("tags", []), EXERCISE_TAG]
            cell.metadata["tags"] = tags
            if version == "student":
                cell.source = _student_source(cell.source, _regions(cell.source, path, index), stub_message(exercise))
            else:
                cell.source = _instructor_source(cell.source)
                cell.metadata.setdefault("jupyter", {})["source_hidden"] = True
                cells.append(nbformat.v4.new_markdown_cell(
                    f"#### Solution {exercise.number}: `{exercise.name}`\n\n"
                    "(Collapsed: click the bar beside the cell to open it.)"))
        elif index in checks and version == "student":
            cell.metadata["tags"] = [*cell.metadata.get("tags", []), RAISES_TAG]
        cells.append(cell)
    built.cells = cells  # copied cells keep their ids; inserted ones get fresh ones
    nbformat.validate(built)
    return built


def build_course(
    versions: Sequence[Version] = VERSIONS,
    out_dir: str | Path = DEFAULT_OUT,
    notebooks_path: str | Path | None = None,
) -> dict[Version, list[Path]]:
    """Write each version of every course notebook to ``out_dir/<version>/`` (with the profiles, so
    ``run_course(..., notebooks_path=out_dir / version)`` runs a build). Every notebook's markup is
    checked before anything is written."""
    versions = list(versions)
    bad = [v for v in versions if v not in VERSIONS]
    if bad or not versions:
        raise ValueError(f"versions must be among {VERSIONS}; got {versions}")
    folder = notebooks_dir(notebooks_path)
    sources = course_notebooks(folder)
    built = {version: [build_notebook(p, version) for p in sources] for version in versions}
    written: dict[Version, list[Path]] = {}
    for version, notebooks in built.items():
        target = Path(out_dir) / version
        target.mkdir(parents=True, exist_ok=True)
        written[version] = []
        for source, notebook in zip(sources, notebooks, strict=True):
            nbformat.write(notebook, target / source.name)
            written[version].append(target / source.name)
        if (folder / PROFILES_FILE).is_file():
            shutil.copyfile(folder / PROFILES_FILE, target / PROFILES_FILE)
    return written


@dataclass
class StudentRun:
    """A student build executed as a student who has written nothing would run it."""

    notebook: Path  # the executed copy
    stubbed: list[int]  # check cells that failed with the stub's NotImplementedError, as they should
    problems: list[str]  # anything else: another error, a check that passed, a cell that did not run

    @property
    def ok(self) -> bool:
        return not self.problems


def student_problems(executed: nbformat.NotebookNode) -> tuple[list[int], list[str]]:
    """Read an executed student notebook: every check cell must fail with the stub's
    ``NotImplementedError``; no other cell may fail. Returns (stubbed check cells, problems)."""
    stubbed, problems = [], []
    for index, cell in enumerate(executed.cells):
        if cell.cell_type != "code" or "injected-parameters" in cell.metadata.get("tags", []):
            continue
        errors = [o for o in cell.get("outputs", []) if o.output_type == "error"]
        first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
        if RAISES_TAG in cell.metadata.get("tags", []):
            if not errors:
                problems.append(f"cell {index} ({first!r}): a check passed against a stub")
            elif errors[0].ename != "NotImplementedError" or "is yours to write" not in errors[0].evalue:
                problems.append(f"cell {index} ({first!r}): {errors[0].ename}: {errors[0].evalue}, not the stub's")
            else:
                stubbed.append(index)
        elif errors:
            problems.append(f"cell {index} ({first!r}): {errors[0].ename}: {errors[0].evalue}")
        elif cell.execution_count is None and cell.source.strip():
            problems.append(f"cell {index} ({first!r}) did not run")
    return stubbed, problems


def run_student(
    notebook: str | Path, out_path: str | Path, parameters: dict | None = None, timeout: float | None = 600.0
) -> StudentRun:
    """Execute a student-build notebook (every cell, past the stubs) with this Python's kernel, in
    the notebook's folder, and check it with :func:`student_problems`."""
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from papermill.execute import ERROR_MARKER_TAG

    from mmelkit.course import _kernel_manager_class

    notebook, out_path = Path(notebook).resolve(), Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(str(notebook), str(out_path), parameters=parameters or {},
                                   cwd=str(notebook.parent), kernel_name="python3", language="python",
                                   progress_bar=False, log_output=False, execution_timeout=timeout,
                                   kernel_manager_class=_kernel_manager_class(True))
    except PapermillExecutionError:
        pass  # papermill reports the first error output; student_problems reads them all
    executed = nbformat.read(out_path, as_version=4)
    executed.cells = [c for c in executed.cells if ERROR_MARKER_TAG not in c.metadata.get("tags", [])]
    stubbed, problems = student_problems(executed)
    return StudentRun(out_path, stubbed, problems)
