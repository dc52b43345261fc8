"""The course runner (mmelkit.course) and the notebooks it runs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mmelkit import course
from mmelkit.course import CourseConfigError, CourseError, run_course

NOTEBOOKS = course.course_notebooks()
PROFILES = course.load_profiles()
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def write_course(folder: Path, notebooks: dict[str, list], profiles: str) -> Path:
    """A notebooks folder with the given notebooks (stem -> cells) and profiles.yaml text."""
    folder.mkdir(parents=True, exist_ok=True)
    for stem, cells in notebooks.items():
        nbformat.write(
            new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), folder / f"{stem}.ipynb"
        )
    (folder / "profiles.yaml").write_text(profiles, encoding="utf-8")
    return folder


def parameters_cell(source: str):
    return new_code_cell(source, metadata={"tags": ["parameters"]})


@pytest.fixture
def failing_course(tmp_path: Path) -> Path:
    return write_course(
        tmp_path / "nbs",
        {
            "01_fail": [
                new_markdown_cell("# A notebook that fails"),
                parameters_cell("x = 1  # a number"),
                new_code_cell("y = x + 1"),
                new_code_cell("raise ValueError(f'boom {y}')\nprint('unreachable')"),
                new_code_cell("print('never runs')"),
            ]
        },
        "cpu:\n  01_fail:\n    x: 2\n",
    )


# -- the repository's notebooks ------------------------------------------------------------------
def test_there_is_a_course():
    assert NOTEBOOKS, "no NN_*.ipynb notebooks found"
    assert {"cpu", "gpu"} <= set(PROFILES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has stored outputs"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
        assert "papermill" not in cell.metadata, f"{path.name}: cell {index} has papermill metadata"
    assert "papermill" not in notebook.metadata, f"{path.name} was saved from a papermill run"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_has_one_documented_parameters_cell(path: Path):
    notebook = nbformat.read(path, as_version=4)
    assert len(course.parameters_cells(notebook)) == 1, (
        f"{path.name} needs exactly one cell tagged 'parameters'"
    )
    parameters = course.describe_parameters(path)
    assert parameters, f"{path.name}: the parameters cell defines nothing"
    for parameter in parameters:
        assert parameter.help, f"{path.name}: parameter {parameter.name} has no comment explaining it"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_parameters_exist(profile: str):
    by_stem = {p.stem: p for p in NOTEBOOKS}
    for stem, values in PROFILES[profile].items():
        assert stem in by_stem, f"profile {profile} names a notebook that does not exist: {stem}"
        defined = course.notebook_parameters(by_stem[stem])
        unknown = set(values) - set(defined)
        assert not unknown, f"profile {profile}, {stem}: parameters not in the parameters cell: {unknown}"
    # The whole profile passes the runner's own checks.
    resolved, plan = course.plan_course(profile)
    assert resolved == profile and [p for p, _ in plan] == NOTEBOOKS


# Chapter 04 caches its training runs in out_dir (relative to the notebook's folder): both builds
# share the source notebooks' cache, so the second run of the suite loads what the first trained.
SHARED = {"04_training_level": {"out_dir": str(course.DEFAULT_NOTEBOOKS_DIR / "build" / "train" / "megl-notebook")}}


@pytest.fixture(scope="session")
def built_course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The student and instructor versions of the course, built once for the session."""
    from mmelkit.course_build import build_course

    out = tmp_path_factory.mktemp("course")
    build_course(out_dir=out)
    return out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_every_chapter_has_graded_exercises_with_checks(path: Path):
    from mmelkit.course_build import find_exercises

    exercises = find_exercises(path)  # also checks the markup: every exercise has its check cell
    assert len(exercises) >= 3, f"{path.name} has {len(exercises)} exercise(s); the course asks for 3 or more"
    notebook = nbformat.read(path, as_version=4)
    for exercise in exercises:
        cell = notebook.cells[exercise.cell_index]
        assert '"""' in cell.source, f"{path.name}: exercise {exercise.name} has no docstring stating the task"
        before = notebook.cells[exercise.cell_index - 1]
        assert before.cell_type == "markdown" and "Exercise" in before.source, (
            f"{path.name}: exercise {exercise.name} is not introduced by an 'Exercise' markdown cell")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs_under_cpu_profile(path: Path, tmp_path: Path, built_course: Path):
    """The instructor version (solutions in) runs top to bottom: every check passes."""
    html = path == NOTEBOOKS[0]  # the HTML export is checked once; it adds seconds per notebook
    (result,) = run_course("cpu", out_dir=tmp_path, notebooks=[path.stem], html=html, progress=False,
                           notebooks_path=built_course / "instructor", overrides={k: v for k, v in SHARED.items()
                                                                                  if k == path.stem})
    assert result.name == path.name and result.profile == "cpu"
    assert result.path == tmp_path / "notebooks" / path.name and result.path.is_file()
    assert result.parameters == {**PROFILES["cpu"].get(path.stem, {}), **SHARED.get(path.stem, {})}
    executed = nbformat.read(result.path, as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "some code cells did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    checks = [c for c in code if "check" in c.metadata.get("tags", [])]
    printed = ["".join(o.get("text", "") for o in c.outputs) for c in checks]
    assert checks and all("correct:" in text for text in printed), "an exercise check printed no 'correct:'"
    # papermill injected the profile's values after the parameters cell
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == (1 if result.parameters else 0)
    if html:
        assert result.html == tmp_path / "html" / f"{path.stem}.html"
        text = result.html.read_text(encoding="utf-8")
        if any(course.PLOTLY_MIME in o.get("data", {}) for c in code for o in c.outputs):
            assert "Plotly.newPlot" in text  # figures survive the export
    else:
        assert result.html is None


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_student_version_fails_only_by_its_stubs(path: Path, tmp_path: Path, built_course: Path):
    """The student version runs top to bottom; each check fails with its stub's NotImplementedError
    and nothing else fails."""
    from mmelkit.course_build import find_exercises, run_student

    parameters = {**PROFILES["cpu"].get(path.stem, {}), **SHARED.get(path.stem, {})}
    run = run_student(built_course / "student" / path.name, tmp_path / path.name, parameters=parameters)
    assert run.ok, "\n".join(run.problems)
    assert len(run.stubbed) == len(find_exercises(path))


# -- the runner, on notebooks the tests write ----------------------------------------------------
def test_failing_notebook_raises_course_error(failing_course: Path, tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(CourseError) as caught:
        run_course("cpu", out_dir=out, notebooks_path=failing_course, progress=False)
    error = caught.value
    message = str(error)
    assert "01_fail.ipynb" in message
    assert "cell 3" in message and "raise ValueError(f'boom {y}')" in message
    assert "ValueError: boom 3" in message  # the profile's x=2 reached the kernel
    assert (error.cell_index, error.ename, error.evalue) == (3, "ValueError", "boom 3")
    assert error.notebook == failing_course / "01_fail.ipynb"

    # the partly executed notebook is there, error included, later cells not run
    partial = out / "notebooks" / "01_fail.ipynb"
    assert error.output == partial and partial.is_file()
    assert str(partial) in message
    cells = nbformat.read(partial, as_version=4).cells
    failed = [c for c in cells if c.cell_type == "code" and c.source.startswith("raise ValueError")]
    assert [o.ename for o in failed[0].outputs if o.output_type == "error"] == ["ValueError"]
    never = [c for c in cells if c.source == "print('never runs')"]
    assert never[0].execution_count is None and never[0].outputs == []
    assert (out / "html" / "01_fail.html").is_file()


def test_cell_timeout_raises_course_error(tmp_path: Path):
    folder = write_course(
        tmp_path / "nbs",
        {"01_slow": [new_code_cell("print('fast')"), new_code_cell("import time\ntime.sleep(60)")]},
        "cpu:\n",
    )
    with pytest.raises(CourseError) as caught:
        run_course(
            "cpu", out_dir=tmp_path / "out", notebooks_path=folder, html=False, progress=False, timeout=2
        )
    message = str(caught.value)
    assert "01_slow.ipynb" in message and "cell 1" in message and "import time" in message
    assert "timeout" in message
    assert (tmp_path / "out" / "notebooks" / "01_slow.ipynb").is_file()


def test_later_notebooks_do_not_run_after_a_failure(failing_course: Path, tmp_path: Path):
    nbformat.write(
        new_notebook(cells=[new_code_cell("1")], metadata={"kernelspec": KERNELSPEC}),
        failing_course / "02_after.ipynb",
    )
    with pytest.raises(CourseError):
        run_course("cpu", out_dir=tmp_path / "out", notebooks_path=failing_course, html=False, progress=False)
    assert not (tmp_path / "out" / "notebooks" / "02_after.ipynb").exists()


def test_unknown_profile(failing_course: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"unknown profile 'nope'.*cpu"):
        run_course("nope", out_dir=tmp_path / "out", notebooks_path=failing_course, progress=False)
    assert not (tmp_path / "out").exists()  # nothing ran


def test_unknown_parameter(failing_course: Path, tmp_path: Path):
    (failing_course / "profiles.yaml").write_text("cpu:\n  01_fail:\n    x: 2\n    z: 3\n", encoding="utf-8")
    with pytest.raises(CourseConfigError, match=r"'z' for 01_fail\.ipynb.*parameters: x"):
        run_course("cpu", out_dir=tmp_path / "out", notebooks_path=failing_course, progress=False)
    assert not (tmp_path / "out").exists()


def test_profile_naming_a_missing_notebook(failing_course: Path, tmp_path: Path):
    (failing_course / "profiles.yaml").write_text("cpu:\n  07_gone:\n    x: 1\n", encoding="utf-8")
    with pytest.raises(CourseConfigError, match=r"do not exist: '07_gone'"):
        run_course("cpu", out_dir=tmp_path / "out", notebooks_path=failing_course, progress=False)


def test_parameters_for_a_notebook_without_parameters_cell(tmp_path: Path):
    folder = write_course(
        tmp_path / "nbs", {"01_plain": [new_code_cell("x = 1")]}, "cpu:\n  01_plain:\n    x: 2\n"
    )
    with pytest.raises(CourseConfigError, match="no cell tagged 'parameters'"):
        course.plan_course("cpu", notebooks_path=folder)


def test_unknown_notebook_selection(failing_course: Path):
    with pytest.raises(CourseConfigError, match="no course notebook named '99_x'"):
        course.plan_course("cpu", ["99_x"], notebooks_path=failing_course)
    # stems and file names both select
    assert course.plan_course("cpu", ["01_fail.ipynb"], notebooks_path=failing_course)[1][0][1] == {"x": 2}


def test_only_numbered_notebooks_are_course_notebooks(tmp_path: Path):
    folder = write_course(
        tmp_path / "nbs",
        {"10_b": [], "02_a": [], "scratch": [], "3_short": []},
        "cpu:\n",
    )
    assert [p.name for p in course.course_notebooks(folder)] == ["02_a.ipynb", "10_b.ipynb"]


def test_list_profiles_and_auto():
    assert course.list_profiles() == list(PROFILES)
    assert course.resolve_profile("auto") in ("cpu", "gpu")
    assert course.resolve_profile("cpu") == "cpu"


def test_notebook_parameters_parsing(tmp_path: Path):
    source = (
        "# how many\n"
        "n = 3\n"
        "name: str = 'a'  # a name\n"
        "%matplotlib inline\n"
        "a, b = 1, 2.5  # a pair\n"
        "path = str(n) * 2  # not a literal\n"
        "print('not a parameter')\n"
    )
    folder = write_course(tmp_path / "nbs", {"01_p": [parameters_cell(source)]}, "")
    path = folder / "01_p.ipynb"
    assert course.notebook_parameters(path) == {"n": 3, "name": "a", "a": 1, "b": 2.5, "path": "str(n) * 2"}
    described = {p.name: p for p in course.describe_parameters(path)}
    assert described["n"].help == "how many"
    assert described["name"].help == "a name"
    assert described["b"].help == "a pair"
    assert not described["path"].literal and described["path"].source == "str(n) * 2"


def test_two_parameters_cells_are_an_error(tmp_path: Path):
    folder = write_course(
        tmp_path / "nbs", {"01_two": [parameters_cell("a = 1"), parameters_cell("b = 2")]}, ""
    )
    with pytest.raises(CourseConfigError, match="2 cells are tagged 'parameters'"):
        course.describe_parameters(folder / "01_two.ipynb")


def test_kernel_is_this_python_in_the_notebooks_folder(tmp_path: Path):
    import sys

    folder = write_course(
        tmp_path / "nbs",
        {"01_where": [new_code_cell("import os, sys\nprint(sys.executable)\nprint(os.getcwd())")]},
        "cpu:\n",
    )
    (result,) = run_course("cpu", out_dir=tmp_path / "out", notebooks_path=folder, html=False, progress=False)
    (output,) = nbformat.read(result.path, as_version=4).cells[0].outputs
    executable, cwd = output.text.splitlines()
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert Path(cwd).resolve() == folder.resolve()


def test_overrides_replace_profile_values(failing_course: Path, tmp_path: Path):
    with pytest.raises(CourseConfigError, match="does not define them"):
        run_course("cpu", out_dir=tmp_path, progress=False, notebooks_path=failing_course, overrides={"01_fail": {"z": 1}})
    with pytest.raises(CourseConfigError, match="not among the notebooks"):
        run_course("cpu", out_dir=tmp_path, progress=False, notebooks_path=failing_course, overrides={"02_x": {"x": 1}})
    with pytest.raises(CourseError, match="boom 6"):  # x = 5 replaced the profile's 2
        run_course("cpu", out_dir=tmp_path, html=False, progress=False, notebooks_path=failing_course,
                   overrides={"01_fail": {"x": 5}})
