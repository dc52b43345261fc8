"""Student and instructor builds of the course (mmelkit.course_build) and the exercise checks
(mmelkit.exercises), on notebooks the tests write."""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mmelkit.course_build import (
    BEGIN,
    END,
    RAISES_TAG,
    CourseBuildError,
    build_course,
    build_notebook,
    find_exercises,
    run_student,
)
from mmelkit.exercises import ExerciseCheckError, check_close, check_equal

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

EXERCISE_1 = f'''def double(x):
    """Return twice x."""
    {BEGIN}
    y = x * 2
    return y
    {END}'''
EXERCISE_2 = f'''import math

def hypotenuse(a, b):
    """The long side of a right triangle with sides a and b."""
    {BEGIN}
    return math.sqrt(a * a + b * b)
    {END}'''


def check(source: str):
    return new_code_cell(source, metadata={"tags": ["check"]})


def write(folder: Path, cells: list, stem: str = "01_demo") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.ipynb"
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)
    (folder / "profiles.yaml").write_text("cpu:\n  01_demo:\n", encoding="utf-8")
    return path


def demo_cells() -> list:
    return [
        new_markdown_cell("# Demo\n\n**Exercise 1.** Write `double`."),
        new_code_cell("base = 3"),
        new_code_cell(EXERCISE_1),
        new_markdown_cell("<details><summary>Hint</summary>Multiply.</details>"),
        check("from mmelkit.exercises import check_equal\ncheck_equal(double(base), 6, 'double(3)')"),
        new_code_cell(EXERCISE_2),
        check("from mmelkit.exercises import check_close\ncheck_close(hypotenuse(3.0, 4.0), 5.0, 'the hypotenuse')"),
        new_code_cell("after = base + 1  # cells after the exercises still run"),
    ]


def test_exercises_are_found_with_their_checks(tmp_path: Path) -> None:
    path = write(tmp_path, demo_cells())
    found = find_exercises(path)
    assert [(e.number, e.name, e.cell_index, e.check_index) for e in found] == [(1, "double", 2, 4), (2, "hypotenuse", 5, 6)]


def test_the_student_version_stubs_each_solution_and_keeps_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, demo_cells())
    student = build_notebook(path, "student")
    source = student.cells[2].source
    assert source.startswith("def double(x):\n    \"\"\"Return twice x.\"\"\"\n    raise NotImplementedError(")
    assert "x * 2" not in source and BEGIN not in source and "Exercise 1 (double) is yours to write" in source
    assert "import math" in student.cells[5].source and "sqrt" not in student.cells[5].source
    assert RAISES_TAG in student.cells[4].metadata["tags"] and RAISES_TAG in student.cells[6].metadata["tags"]
    assert RAISES_TAG not in student.cells[1].metadata.get("tags", [])
    assert student.cells[3].source.startswith("<details>")  # hints stay
    assert len(student.cells) == len(demo_cells())
    compile(source, "exercise", "exec")  # the stub is valid Python at the region's indentation


def test_the_instructor_version_shows_solutions_under_a_collapsed_heading(tmp_path: Path) -> None:
    path = write(tmp_path, demo_cells())
    teacher = build_notebook(path, "instructor")
    headings = [i for i, c in enumerate(teacher.cells) if c.cell_type == "markdown" and c.source.startswith("#### Solution")]
    assert len(headings) == 2 and "`double`" in teacher.cells[headings[0]].source
    solution = teacher.cells[headings[0] + 1]
    assert "y = x * 2" in solution.source and BEGIN not in solution.source and END not in solution.source
    assert solution.metadata["jupyter"]["source_hidden"] is True
    assert not any(RAISES_TAG in c.metadata.get("tags", []) for c in teacher.cells)
    assert len({c.id for c in teacher.cells}) == len(teacher.cells)  # valid, unique cell ids


@pytest.mark.notebooks
def test_built_versions_run_as_promised(tmp_path: Path) -> None:
    write(tmp_path / "src", demo_cells())
    written = build_course(out_dir=tmp_path / "build", notebooks_path=tmp_path / "src")
    assert (tmp_path / "build" / "student" / "profiles.yaml").is_file()
    run = run_student(written["student"][0], tmp_path / "out" / "student.ipynb")
    assert run.ok, run.problems
    assert run.stubbed == [4, 6]
    # the instructor version runs clean: every check passes
    from mmelkit.course import run_course

    (result,) = run_course("cpu", out_dir=tmp_path / "teacher", html=False, progress=False,
                           notebooks_path=tmp_path / "build" / "instructor")
    executed = nbformat.read(result.path, as_version=4)
    printed = "".join(o.get("text", "") for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert printed.count("correct:") == 2


@pytest.mark.notebooks
def test_a_student_run_reports_what_is_not_the_stub(tmp_path: Path) -> None:
    cells = demo_cells()
    cells[1] = new_code_cell("base = undefined_name")  # a broken cell that is no exercise
    cells[6] = check("print('this check forgot to call the exercise')")
    write(tmp_path / "src", cells)
    written = build_course(["student"], out_dir=tmp_path / "build", notebooks_path=tmp_path / "src")
    run = run_student(written["student"][0], tmp_path / "out.ipynb")
    assert not run.ok
    assert any("NameError" in p and "cell 1" in p for p in run.problems)
    assert any("passed against a stub" in p and "cell 6" in p for p in run.problems)


@pytest.mark.parametrize(
    ("change", "message", "cell"),
    [
        (lambda c: c.__setitem__(2, new_code_cell(f"def f():\n    {BEGIN}\n    return 1")), "never closed", 2),
        (lambda c: c.__setitem__(2, new_code_cell(f"def f():\n    return 1\n    {END}")), "without a", 2),
        (lambda c: c.__setitem__(2, new_code_cell(f"{BEGIN}\n{BEGIN}\nx = 1\n{END}")), "inside an open", 2),
        (lambda c: c.__delitem__(4), "no check cell before the next exercise", 2),
        (lambda c: c.__delitem__(6), "has no check cell", 5),
        (lambda c: c.insert(1, check("check_equal(1, 1, 'x')")), "without an exercise", 1),
        (lambda c: c.__setitem__(4, check(f"{BEGIN}\nx = 1\n{END}")), "must not hold", 4),
    ],
)
def test_broken_markup_names_the_notebook_and_cell(tmp_path: Path, change, message: str, cell: int,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    cells = demo_cells()
    change(cells)
    path = write(tmp_path / "src", cells)
    with pytest.raises(CourseBuildError, match=message) as caught:
        find_exercises(path)
    assert caught.value.notebook == path and caught.value.cell_index == cell
    assert str(caught.value).startswith(f"01_demo.ipynb, cell {cell}:")
    # the command refuses too, and writes nothing
    from mmelkit.cli import main

    assert main(["course", "build", "--notebooks", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    assert "01_demo.ipynb, cell" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_build_command_writes_the_versions_asked_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmelkit.cli import main

    write(tmp_path / "src", demo_cells())
    assert main(["course", "build", "--student", "--notebooks", str(tmp_path / "src"), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "student" / "01_demo.ipynb").is_file() and not (tmp_path / "o" / "instructor").exists()
    out = capsys.readouterr().out
    assert "01_demo.ipynb" in out and "2 exercise(s)" in out
    assert main(["course", "build", "--notebooks", str(tmp_path / "src"), "--out", str(tmp_path / "b")]) == 0
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"student", "instructor"}


# -- the checks ------------------------------------------------------------------------------------
def test_check_close_accepts_equal_answers_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    check_close(torch.tensor([1.0, 2.0]), np.array([1.0, 2.0 + 1e-7]), "the weights")
    assert "correct: the weights" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("got", "expected", "message"),
    [
        (torch.zeros(2, 3), torch.zeros(3), r"shape \(2, 3\), the reference \(3,\)"),
        (torch.tensor([1.0, 2.5, 3.0]), torch.tensor([1.0, 2.0, 3.0]), r"1 of 3 entries differ.*index \[1\]"),
        (None, torch.zeros(1), "missing `return`"),
        (torch.tensor([float("nan")]), torch.tensor([0.0]), "NaN"),
        ("red", torch.zeros(1), "cannot be read as numbers|should be a tensor"),
    ],
)
def test_check_close_says_what_is_wrong(got, expected, message: str) -> None:
    with pytest.raises(ExerciseCheckError, match=message):
        check_close(got, expected, "the answer")


def test_check_equal() -> None:
    check_equal("red", "red", "the colour")
    with pytest.raises(ExerciseCheckError, match="you returned 'blue', the expected answer is 'red'"):
        check_equal("blue", "red", "the colour")


# -- the site ----------------------------------------------------------------------------------------
def test_the_site_indexes_the_course_map_and_links_executed_chapters(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from mmelkit.cli import main
    from mmelkit.course_site import build_site

    source = tmp_path / "src"
    write(source, demo_cells(), "01_demo")
    write(source, demo_cells(), "02_more")
    (source / "README.md").write_text("# Map\n\n| 01 | [Demo](01_demo.ipynb) |\n| 02 | [More](02_more.ipynb) |\n")
    html = tmp_path / "html"
    html.mkdir()
    (html / "01_demo.html").write_text("<html><body>chapter one</body></html>")
    pages = build_site(html, tmp_path / "site", source)
    assert [p.name for p in pages] == ["index.html", "01_demo.html"]
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'href="01_demo.html"' in index and "02_more.ipynb" in index and "(not executed)" in index
    assert (tmp_path / "site" / "01_demo.html").read_text() == "<html><body>chapter one</body></html>"
    (source / "README.md").unlink()
    assert main(["course", "site", "--notebooks", str(source), "--html", str(html), "--out", str(tmp_path / "s2")]) == 2
    assert "no course map" in capsys.readouterr().err
