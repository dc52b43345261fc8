"""The mmelkit command line (mmelkit.cli)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from mmelkit.cli import main

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def test_help_lists_commands():
    done = subprocess.run(
        [sys.executable, "-m", "mmelkit", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for command in ("course", "models"):
        described = [line for line in lines if line.split()[:1] == [command]]
        assert described and len(described[0].split()) > 1, f"{command} is not listed with a description"


def test_models_lists_the_zoo(capsys: pytest.CaptureFixture[str]):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "toy-random" in out
    assert any(line.split()[:2] == ["scene-llava", "vlm"] for line in out.splitlines())


def test_no_command_shows_usage(capsys: pytest.CaptureFixture[str]):
    assert main([]) == 2
    assert "course" in capsys.readouterr().err


def test_course_list(capsys: pytest.CaptureFixture[str]):
    assert main(["course", "list"]) == 0
    out = capsys.readouterr().out
    assert "00_tour.ipynb" in out and "num_images" in out and "cpu" in out and "gpu" in out


@pytest.fixture
def failing_notebooks(tmp_path: Path) -> Path:
    folder = tmp_path / "nbs"
    folder.mkdir()
    notebook = new_notebook(
        cells=[
            new_code_cell("n = 1  # a number", metadata={"tags": ["parameters"]}),
            new_code_cell("assert n < 0, f'n is {n}'"),
        ],
        metadata={"kernelspec": KERNELSPEC},
    )
    nbformat.write(notebook, folder / "01_broken.ipynb")
    (folder / "profiles.yaml").write_text("cpu:\n  01_broken:\n    n: 5\n", encoding="utf-8")
    return folder


def test_course_run_failure_exits_1(
    failing_notebooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    argv = ["course", "run", "--profile", "cpu", "--notebooks", str(failing_notebooks)]
    code = main([*argv, "--out", str(tmp_path / "out"), "--no-html", "--quiet"])
    assert code == 1
    captured = capsys.readouterr()
    assert "01_broken.ipynb" in captured.err and "cell 1" in captured.err
    assert "AssertionError: n is 5" in captured.err
    assert "Traceback" not in captured.err
    assert (tmp_path / "out" / "notebooks" / "01_broken.ipynb").is_file()


def test_course_run_bad_profile_exits_2(
    failing_notebooks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code = main(
        ["course", "run", "--profile", "huge", "--notebooks", str(failing_notebooks), "--out", str(tmp_path)]
    )
    assert code == 2
    assert "unknown profile 'huge'" in capsys.readouterr().err


def test_course_run_rejects_negative_timeout(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as caught:
        main(["course", "run", "--timeout", "-1"])
    assert caught.value.code == 2
