"""What the three trainers (CLIP, MEGL, scene-llava) share to stop and resume safely.

Interrupting a run (the behaviour is the same for every trainer):

* The first Ctrl-C (SIGINT), or a SIGTERM from a scheduler or ``docker stop``, does not tear the
  current optimiser step apart: :class:`GracefulStop` notes it, the trainer finishes the step,
  writes a checkpoint of it (atomically, see :mod:`mmelkit._io`) and raises
  :class:`TrainingInterrupted`, a ``KeyboardInterrupt``. Running the same command again resumes
  exactly there; no step is lost or repeated.
* A second Ctrl-C stops at once. The state may then be half-way through a step, so nothing is
  written and the next run resumes from the last checkpoint on disk (the periodic one, or the
  graceful one if that save had finished), which is intact. A SIGKILL behaves the same way.
* Signals are only caught in the main thread and only where nobody chose otherwise: an ignored
  SIGINT stays ignored, a SIGTERM handler someone else installed is left alone.

A checkpoint that cannot be read back is not silently skipped or replaced: saves are atomic, so it
was damaged afterwards (a failing or full disk, a partial copy) and only the user can tell whether
a copy exists. :func:`load_checkpoint` raises :class:`CorruptCheckpointError` naming the file and the
way back (move it away to restart the run from scratch, or restore a copy).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from mmelkit._io import CorruptFileError, atomic_write_text, load_torch, remove_stale_temporaries

# Signals that ask a trainer to stop after the current step.
STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """A run stopped on request after writing a checkpoint of its last finished step.

    A ``KeyboardInterrupt``, so callers that handle Ctrl-C handle it; ``signum`` tells SIGINT from
    SIGTERM (the CLI exits with 128 + signum)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        where = f"checkpoint of step {step} written to {checkpoint}" if checkpoint is not None else f"at step {step}"
        super().__init__(f"training interrupted by {signal.Signals(signum).name}; {where}; run it again with the "
                         "same output folder to resume")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


class CorruptCheckpointError(CorruptFileError):
    """A checkpoint exists but cannot be loaded (see the module docstring for why this is not
    papered over)."""


class GracefulStop:
    """Within ``with GracefulStop() as stop:``, a stop signal sets ``stop.signum`` instead of
    raising; the training loop checks :attr:`requested` between steps. A second signal raises
    ``KeyboardInterrupt`` at once. Outside the main thread (where Python cannot install handlers)
    it does nothing and signals act as usual."""

    def __init__(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            current = signal.getsignal(signum)
            if current in (signal.SIG_IGN, None):  # ignored on purpose, or set outside Python
                continue
            if signum != signal.SIGINT and current is not signal.SIG_DFL:  # someone else's handler
                continue
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nmmelkit: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              "(Ctrl-C again stops at once, resuming from the last checkpoint)", file=sys.stderr, flush=True)

    def stop(self, step: int, checkpoint: Path | None) -> None:
        """Raise :class:`TrainingInterrupted` if a stop was requested (call after the checkpoint)."""
        if self.signum is not None:
            raise TrainingInterrupted(self.signum, step, checkpoint)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and a
    worker that dies of it would make the main process fail with "DataLoader worker exited
    unexpectedly" instead of finishing its step and checkpointing. The main process decides."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_checkpoint(path: str | Path, map_location: Any = "cpu", required: Iterable[str] = ("step",),
                    what: str = "training checkpoint") -> dict[str, Any]:
    """A checkpoint this package wrote, or :class:`CorruptCheckpointError` with the way back."""
    path = Path(path)
    try:
        state = load_torch(path, map_location=map_location)
    except CorruptFileError as error:
        raise CorruptCheckpointError(path, _advice(path, str(error))) from error
    missing = [key for key in required if not isinstance(state, dict) or key not in state]
    if missing:
        raise CorruptCheckpointError(path, _advice(path, f"{path} is not a {what} (no {', '.join(missing)})"))
    return state


def _advice(path: Path, problem: str) -> str:
    return (f"{problem}. Checkpoints are written atomically, so an interrupted save cannot cause this: the file "
            f"was damaged afterwards (full or failing disk, partial copy). To recover, restore a copy of it, or move "
            f"it away (e.g. to {path.name}.bad) and run again: the run then starts over from its beginning.")


def clean_run_folder(folder: str | Path, names: Iterable[str]) -> None:
    """Remove what killed saves of ``names`` left in a run folder: this module's temporaries of dead
    writers and the fixed-name ``<stem>.tmp`` files earlier versions wrote (a run owns its folder)."""
    folder = Path(folder)
    wanted = set(names)
    remove_stale_temporaries(folder, lambda name: name in wanted)
    for name in wanted:
        (folder / name).with_suffix(".tmp").unlink(missing_ok=True)


def trim_log(path: str | Path, step: int) -> None:
    """Keep the complete log records of steps ``<= step`` in a JSON-lines metrics log.

    A run killed after its last checkpoint logged steps that the resumed run will train and log
    again, and a kill mid-write can leave a broken last line; without this the log would repeat
    steps or fail to parse. Rewritten atomically, and only when something has to go."""
    path = Path(path)
    if not path.is_file():
        return
    kept, dropped = [], False
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped = True
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
