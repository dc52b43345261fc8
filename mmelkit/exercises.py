"""Checks for the course's exercises: compare a student's answer with the library's, with a message
that says what is wrong (shape, dtype, which entries, by how much) rather than a bare assertion.

Used in the check cells of the notebooks (see :mod:`mmelkit.course_build`)::

    from mmelkit.exercises import check_close
    check_close(my_channel_weights(acts, grads), reference, "the Grad-CAM channel weights")
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class ExerciseCheckError(AssertionError):
    """The student's answer differs from the reference; the message says how."""


def _as_tensor(value: Any, what: str, role: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, list, tuple, float, int, np.floating, np.integer)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as error:
            raise ExerciseCheckError(f"{what}: {role} cannot be read as numbers ({error})") from None
    raise ExerciseCheckError(
        f"{what}: {role} should be a tensor or an array of numbers; got {type(value).__name__}"
        + (" (did the function return nothing? a missing `return`)" if value is None else "")
    )


def check_close(got: Any, expected: Any, what: str, *, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Raise :class:`ExerciseCheckError` unless ``got`` equals ``expected`` to ``rtol``/``atol``
    (as ``torch.testing.assert_close``), with the same shape. Prints a short "correct" line."""
    mine = _as_tensor(got, what, "your answer")
    reference = _as_tensor(expected, what, "the reference")
    if tuple(mine.shape) != tuple(reference.shape):
        raise ExerciseCheckError(f"{what}: your answer has shape {tuple(mine.shape)}, the reference "
                                 f"{tuple(reference.shape)}; check which dimensions you reduce or keep")
    if mine.is_complex() or reference.is_complex():
        raise ExerciseCheckError(f"{what}: complex numbers are not compared; return real values")
    mine, reference = mine.double(), reference.double()
    if not torch.isfinite(mine).all() and torch.isfinite(reference).all():
        bad = (~torch.isfinite(mine)).nonzero()[0].tolist()
        raise ExerciseCheckError(f"{what}: your answer holds NaN or infinity (first at index {bad}); "
                                 "a division by zero, or a log of zero?")
    wrong = ~torch.isclose(mine, reference, rtol=rtol, atol=atol, equal_nan=True)
    if wrong.any():
        first = wrong.nonzero()[0].tolist()
        gap = (mine - reference).abs()[wrong]
        finite = gap[torch.isfinite(gap)]
        infinite = int((~torch.isfinite(gap)).sum())
        size = (f"largest difference {float(finite.max()):.3g}" if finite.numel() else "") + (
            f"{'; ' if finite.numel() else ''}{infinite} where one side is infinite" if infinite else "")
        raise ExerciseCheckError(
            f"{what}: {int(wrong.sum())} of {wrong.numel()} entries differ from the reference ({size}); "
            f"first at index {first}: yours {float(mine[tuple(first)]):.6g}, reference "
            f"{float(reference[tuple(first)]):.6g}"
        )
    print(f"correct: {what} matches the library ({mine.numel()} values)")


def check_equal(got: Any, expected: Any, what: str) -> None:
    """Raise :class:`ExerciseCheckError` unless ``got == expected`` (for words, counts, lists)."""
    if got != expected:
        raise ExerciseCheckError(f"{what}: you returned {got!r}, the expected answer is {expected!r}")
    print(f"correct: {what}")
