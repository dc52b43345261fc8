"""Long jobs survive interruptions (issue 17): atomic writes, Ctrl-C, killed torchrun workers, damaged files.

The interrupting tests run the job in a subprocess (the tests' network guard installed there too)
and stop it at a known point: the subprocess announces, through a marker file, that it is inside
the step or cell to be interrupted and waits there, so that the signal lands mid-work on any
machine, however slow. The rest of the work then runs here, counted, and the outcome is compared
with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from conftest import make_model, tiny_llava

import mmelkit
from mmelkit import _io
from mmelkit._io import (
    CorruptFileError,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    read_json,
    remove_stale_temporaries,
)
from mmelkit.bench import BenchConfig, run_bench, runner
from mmelkit.bench import vlm as vlm_bench
from mmelkit.cli import main
from mmelkit.training import clip_trainer, vlm_trainer
from mmelkit.training.clip_trainer import ClipTrainConfig, train_clip
from mmelkit.training.megl import build_split, preset, train_megl
from mmelkit.training.megl import trainer as megl_trainer
from mmelkit.training.resume import CorruptCheckpointError, GracefulStop, TrainingInterrupted, trim_log
from mmelkit.training.vlm_trainer import VlmTrainConfig, train_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# The bench job: two cells, the second one is interrupted. The CLI flags and the config are the same run.
METHODS = ["raw_attention", "grad_eclip"]
METRICS = ["deletion_auc", "pointing_game", "insertion_ir"]
BENCH_ARGS = ["--methods", ",".join(METHODS), "--metrics", ",".join(METRICS), "--samples", "4", "--steps", "3",
              "--batch-size", "2", "--device", "cpu", "--quiet"]
BENCH_CONFIG = BenchConfig(methods=METHODS, metrics=METRICS, samples=4, steps=3, batch_size=2)

# The MEGL job: a periodic checkpoint at step 4, interrupted in step 5 (0-based), 8 steps in all.
MEGL_TINY = {"image_size": 16, "width": 4, "train_size": 48, "steps": 8, "batch_size": 8, "checkpoint_every": 4}
MEGL_PRESET = "megl-no-tsv"  # the rationale generator and the map losses, no CLIP needed for pseudo-masks
MEGL_HOLD_CALL = 6

# What every subprocess runs first: offline settings, the network guard of conftest's block_network
# (only loopback and unix sockets; restated here because importing conftest would load transformers
# and cost every job seconds), one thread, and a plain Ctrl-C (a process started from a
# non-interactive shell may inherit an ignored SIGINT).
PREAMBLE = textwrap.dedent("""\
    import ipaddress, os, signal, socket, sys, time
    from pathlib import Path
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    def _local(address):
        if not isinstance(address, tuple):
            return True
        if address[0] in ("localhost", "", None):
            return True
        try:
            return ipaddress.ip_address(address[0]).is_loopback
        except ValueError:
            return False

    def _guard(real):
        def guarded(self, address):
            if not _local(address):
                raise OSError(f"tests must not use the network (tried to connect to {address!r})")
            return real(self, address)
        return guarded

    def _resolve(host, *args, _real=socket.getaddrinfo, **kwargs):
        if host not in (None, "localhost") and not _local((host,)):
            raise OSError(f"tests must not resolve host names off this machine ({host!r})")
        return _real(host, *args, **kwargs)

    socket.socket.connect = _guard(socket.socket.connect)
    socket.socket.connect_ex = _guard(socket.socket.connect_ex)
    socket.getaddrinfo = _resolve
    import torch
    torch.set_num_threads(1)
""")

# The bench job on the tiny CLIP (pickled by the test): through `mmelkit bench` ("cli") or, under
# torchrun, run_bench itself ("api"). Logs every cell it computes ("<attempt> <rank> <method>") and,
# in the first attempt (ATTEMPT unset or 0), waits inside the HOLD cell once its samples are computed but before it is
# summarised and saved, after writing holding-<rank> (with its pid) beside the log.
BENCH_JOB = PREAMBLE + textwrap.dedent("""\
    import mmelkit
    from mmelkit.bench import runner

    out, log, model_file, hold, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    restart, rank = os.environ.get("ATTEMPT", "0"), os.environ.get("RANK", "0")
    run_cell, summarise = runner.run_cell, runner._summarise_cell

    def counted(model, data, method, config, progress=True):
        with log.open("a") as file:
            file.write(f"{restart} {rank} {method}\\n")
        return run_cell(model, data, method, config, progress=progress)

    def held(model, data, method, *args, **kwargs):
        if method == hold and restart == "0":
            (log.parent / f"holding-{rank}").write_text(str(os.getpid()))
            for _ in range(3000):
                time.sleep(0.05)
            raise SystemExit("never interrupted")
        return summarise(model, data, method, *args, **kwargs)

    runner.run_cell, runner._summarise_cell = counted, held
    tiny = mmelkit.load_model(torch.load(model_file, weights_only=False), device="cpu")
    if mode == "cli":
        from mmelkit.cli import main

        mmelkit.load_model = lambda spec, device="auto", **kw: tiny
        sys.exit(main(["bench", *sys.argv[6:], "--out", str(out)]))
    import json
    import torch.distributed as dist
    from mmelkit.bench import BenchConfig, run_bench
    from mmelkit.bench.distributed import init_from_environment

    init_from_environment("cpu")
    result = run_bench(tiny, BenchConfig(**json.loads(sys.argv[6])), out=out, progress=False)
    if dist.get_rank() == 0:
        print(result.to_markdown())
    dist.destroy_process_group()
""")

# train_megl on a tiny split; waits at the start of step MEGL_HOLD_CALL - 1 (after writing
# `holding`) until the test has signalled it and created `release`.
MEGL_JOB = PREAMBLE + textwrap.dedent("""\
    import json
    from mmelkit.training.megl import build_split, preset, train_megl
    from mmelkit.training.megl import trainer
    from mmelkit.training.resume import TrainingInterrupted

    out, release, name, sizes, hold = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), int(sys.argv[5])
    config = preset(name, **sizes)
    split = build_split(config.task(), "train", config.train_size)
    loss, calls = trainer.megl_loss, []

    def held(*args):
        calls.append(1)
        if len(calls) == hold:
            (release.parent / "holding").write_text("")
            while not release.exists():
                time.sleep(0.02)
        return loss(*args)

    trainer.megl_loss = held
    try:
        train_megl(config, split, out, device="cpu", progress=False)
    except TrainingInterrupted as error:
        print(error, file=sys.stderr)
        sys.exit(128 + error.signum)
    sys.exit("finished without being interrupted")
""")


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return env


def _start(command: list[str], **extra_env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(command, cwd=REPO, env={**_environment(), **extra_env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _script(folder: Path, name: str, text: str) -> str:
    path = folder / name
    path.write_text(text)
    return str(path)


def _wait_for(paths: list[Path], process: subprocess.Popen[str], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if process.poll() is not None:
            _, stderr = process.communicate()
            pytest.fail(f"the job ended (code {process.returncode}) before reaching its hold:\n{stderr[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the job did not reach its hold within {timeout:.0f} s")
        time.sleep(0.05)


def _kill(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def _finish(process: subprocess.Popen[str], timeout: float = 180.0) -> tuple[str, str]:
    try:
        return process.communicate(timeout=timeout)
    finally:
        _kill(process)


def _fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture
def plain_sigint() -> Iterator[None]:
    """Ctrl-C raising KeyboardInterrupt, as in a terminal, whatever this process inherited."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP, pickled for the jobs (the same weights as ``tiny``, hence the same cell keys)."""
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(make_model("open_clip-default"), path)
    return path


@pytest.fixture(scope="module")
def tiny() -> mmelkit.ClipAdapter:
    return mmelkit.load_model(make_model("open_clip-default"), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny: mmelkit.ClipAdapter, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The bench job run through without interruption: (result, its output folder)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    return run_bench(tiny, BENCH_CONFIG, out=out, progress=False), out


def _counting_cells(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = runner.run_cell

    def counted(model: Any, data: Any, method: str, config: BenchConfig, progress: bool = True) -> dict[str, Any]:
        calls.append(method)
        return real(model, data, method, config, progress=progress)

    monkeypatch.setattr(runner, "run_cell", counted)
    return calls


def _same_result(a: Any, b: Any) -> None:
    pd.testing.assert_frame_equal(a.table, b.table, check_exact=True)
    pd.testing.assert_frame_equal(a.samples, b.samples, check_exact=True)
    assert json.dumps(a.curves, sort_keys=True) == json.dumps(b.curves, sort_keys=True)


# -------------------------------------------------------------------------------------------------
# The atomic writer
# -------------------------------------------------------------------------------------------------


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "cell.json"
    atomic_write_json(target, {"v": 1})

    def disk_full(file: Any) -> None:
        file.write(b'{"v": 2, "cut')
        raise OSError(28, "No space left on device")

    def ctrl_c(file: Any) -> None:
        file.write(b'{"v": 3')
        raise KeyboardInterrupt

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, disk_full)
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, ctrl_c)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):  # fails half-way through the archive
        atomic_torch_save(target, {"weights": torch.zeros(1000), "unpicklable": lambda: None})
    with pytest.raises(TypeError):  # not serialisable: nothing is even created
        atomic_write_json(target, {"v": object()})
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.json"]

    atomic_write_text(target, '{"v": 4}\r\n')  # written as given, no newline translation
    assert target.read_bytes() == b'{"v": 4}\r\n'
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)  # the umask applies
    atomic_torch_save(tmp_path / "deep" / "state.pt", {"step": 3})  # folders are created
    assert torch.load(tmp_path / "deep" / "state.pt")["step"] == 3


def test_damaged_files_are_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text('{"method": "grad_ecl')
    with pytest.raises(CorruptFileError, match="cut.json") as caught:
        read_json(path)
    assert caught.value.path == path and isinstance(caught.value, ValueError)
    state = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.randn(64, 64)}, "step": 2}, state)
    whole = state.read_bytes()
    for cut in (0, 16, len(whole) // 2, len(whole) - 8):
        state.write_bytes(whole[:cut])
        with pytest.raises(CorruptFileError, match="state.pt"):
            _io.load_torch(state)
    with pytest.raises(FileNotFoundError):
        _io.load_torch(tmp_path / "missing.pt")


def test_only_temporaries_of_dead_writers_are_swept(tmp_path: Path) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    mine = tmp_path / _io.temporary_name(tmp_path / "last.pt")
    dead = tmp_path / mine.name.replace(f"+{os.getpid()}+", f"+{finished.pid}+")
    elsewhere = tmp_path / f".last.pt.another-host+{finished.pid}+00ff00ff.tmp"
    unrelated = tmp_path / "notes.tmp"
    for path in (mine, dead, elsewhere, unrelated):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (mine, elsewhere, unrelated))


# -------------------------------------------------------------------------------------------------
# The bench
# -------------------------------------------------------------------------------------------------


def test_bench_ctrl_c_keeps_finished_cells_and_the_rerun_computes_only_the_rest(
        tiny: mmelkit.ClipAdapter, tiny_file: Path, reference: tuple[Any, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    out, log = tmp_path / "out", tmp_path / "cells.log"
    job = _script(tmp_path, "bench_job.py", BENCH_JOB)
    process = _start([sys.executable, job, str(out), str(log), str(tiny_file), "grad_eclip", "cli", *BENCH_ARGS])
    try:
        _wait_for([tmp_path / "holding-0"], process)
        finished = sorted((out / "cells").iterdir())
        assert [p.name.split("--")[1] for p in finished] == ["raw_attention"]
        before = _fingerprint(finished[0])
        process.send_signal(signal.SIGINT)  # grad_eclip's samples are computed, its cell not yet saved
    except BaseException:
        _kill(process)
        raise
    _, stderr = _finish(process)
    assert process.returncode == 130, stderr[-4000:]
    assert "finished cells are kept" in stderr
    assert sorted((out / "cells").iterdir()) == finished  # nothing half-written, no temporary left
    assert not (out / "results.csv").exists()
    assert log.read_text().splitlines() == ["0 0 raw_attention", "0 0 grad_eclip"]

    calls = _counting_cells(monkeypatch)
    resumed = run_bench(tiny, BENCH_CONFIG, out=out, progress=False)
    assert calls == ["grad_eclip"]  # the finished cell is read, not recomputed
    assert _fingerprint(finished[0]) == before  # nor rewritten
    result, reference_out = reference
    _same_result(resumed, result)
    for name in ("results.csv", "samples.csv", "table.md", "curves.json"):
        assert (out / name).read_bytes() == (reference_out / name).read_bytes(), name


def test_a_damaged_cached_cell_is_recomputed_with_a_warning(
        tiny: mmelkit.ClipAdapter, reference: tuple[Any, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result, reference_out = reference
    cells = tmp_path / "cells"
    cells.mkdir()
    for path in (reference_out / "cells").iterdir():
        (cells / path.name).write_bytes(path.read_bytes())
    damaged = next(p for p in cells.iterdir() if "--grad_eclip--" in p.name)
    kept = next(p for p in cells.iterdir() if "--raw_attention--" in p.name)
    damaged.write_bytes(damaged.read_bytes()[:-100])  # cut short (by a full disk, a partial copy...)
    before = _fingerprint(kept)
    calls = _counting_cells(monkeypatch)
    with pytest.warns(RuntimeWarning, match=damaged.name):
        again = run_bench(tiny, BENCH_CONFIG, out=tmp_path, progress=False)
    assert calls == ["grad_eclip"] and _fingerprint(kept) == before
    assert read_json(damaged)["method"] == "grad_eclip"  # replaced by a whole cell
    _same_result(again, result)

    # valid JSON that is not the cell its name promises is not trusted either
    stranger = cells / "scenes--grad_eclip--000000000000.json"
    atomic_write_json(stranger, {**read_json(damaged)})
    with pytest.warns(RuntimeWarning, match="not the cached bench cell"):
        assert runner.load_cached_cell(stranger, "scenes--grad_eclip--000000000000") is None


def test_the_vlm_bench_caches_each_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vlm = mmelkit.load_vlm(tiny_llava(seed=3), device="cpu")
    config = vlm_bench.VlmBenchConfig(methods=["answer_attention", "answer_gradient_x_input"], samples=1,
                                      deletion_steps=2, batch_size=2)
    first = vlm_bench.run_vlm_bench(vlm, config, progress=False, out=tmp_path)
    cells = sorted((tmp_path / "vlm_cells").iterdir())
    assert [p.name.split("--")[0] for p in cells] == sorted(config.methods)
    score = vlm_bench._score_method
    monkeypatch.setattr(vlm_bench, "_score_method", lambda *a: pytest.fail("a cached method was scored again"))
    again = vlm_bench.run_vlm_bench(vlm, config, progress=False, out=tmp_path)
    pd.testing.assert_frame_equal(again.table, first.table, check_exact=True)
    pd.testing.assert_frame_equal(again.per_item, first.per_item, check_exact=True)
    for method in config.methods:
        assert again.curves[method].dtype == first.curves[method].dtype
        np.testing.assert_array_equal(again.curves[method], first.curves[method])
    # a damaged file is scored again, with a warning naming it
    scored: list[str] = []
    monkeypatch.setattr(vlm_bench, "_score_method", lambda v, o, method, *a: scored.append(method) or score(v, o, method, *a))
    cells[0].write_text(cells[0].read_text()[:40])
    with pytest.warns(RuntimeWarning, match=cells[0].name):
        vlm_bench.run_vlm_bench(vlm, config, progress=False, out=tmp_path)
    assert scored == [cells[0].name.split("--")[0]]


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_torchrun_restart_after_a_killed_worker_keeps_finished_cells(
        tiny_file: Path, reference: tuple[Any, Path], tmp_path: Path) -> None:
    """Two ranks; rank 1 is SIGKILLed inside the second cell, so torchrun stops rank 0 and fails;
    the same command run again computes only the second cell, on both ranks.

    (The restart is a new torchrun rather than ``--max-restarts``: torchelastic's in-place restart
    re-runs the gloo rendezvous on ports the killed group may still hold, which made the test
    depend on timing; what is tested, that finished cells survive and are not recomputed, is the
    same.)"""
    out, log = tmp_path / "out", tmp_path / "cells.log"
    job = _script(tmp_path, "bench_job.py", BENCH_JOB)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--monitor-interval", "0.1", job, str(out), str(log), str(tiny_file), "grad_eclip", "api",
               json.dumps(asdict(BENCH_CONFIG))]
    process = _start(command, ATTEMPT="0")
    try:
        _wait_for([tmp_path / "holding-0", tmp_path / "holding-1"], process, timeout=240)
        finished = sorted((out / "cells").iterdir())
        assert [p.name.split("--")[1] for p in finished] == ["raw_attention"]
        before = _fingerprint(finished[0])
        os.kill(int((tmp_path / "holding-1").read_text()), signal.SIGKILL)
    except BaseException:
        _kill(process)
        raise
    _finish(process, timeout=300)
    assert process.returncode != 0  # the killed worker fails the job
    process = _start(command, ATTEMPT="1")
    stdout, stderr = _finish(process, timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    lines = log.read_text().splitlines()
    first = sorted(line for line in lines if line.startswith("0 "))
    again = sorted(line for line in lines if line.startswith("1 "))
    assert first == ["0 0 grad_eclip", "0 0 raw_attention", "0 1 grad_eclip", "0 1 raw_attention"]
    assert again == ["1 0 grad_eclip", "1 1 grad_eclip"]  # both ranks skip the cell rank 0 finished
    assert _fingerprint(finished[0]) == before
    assert sorted(p.name.split("--")[1] for p in (out / "cells").iterdir()) == sorted(METHODS)
    assert stdout.count("| scenes | grad_eclip |") == 1
    # sharded samples batch differently from one process: equal up to float noise
    one, two = pd.read_csv(reference[1] / "results.csv"), pd.read_csv(out / "results.csv")
    pd.testing.assert_frame_equal(one.drop(columns=["value", "sem"]), two.drop(columns=["value", "sem"]))
    assert np.allclose(one[["value", "sem"]], two[["value", "sem"]], atol=1e-4, rtol=0, equal_nan=True)


# -------------------------------------------------------------------------------------------------
# The trainers
# -------------------------------------------------------------------------------------------------


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_megl_ctrl_c_checkpoints_the_current_step_and_resumes_to_the_same_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, release = tmp_path / "run", tmp_path / "release"
    job = _script(tmp_path, "megl_job.py", MEGL_JOB)
    process = _start([sys.executable, job, str(out), str(release), MEGL_PRESET, json.dumps(MEGL_TINY),
                      str(MEGL_HOLD_CALL)])
    try:
        _wait_for([tmp_path / "holding"], process)
        assert torch.load(out / "last.pt", weights_only=False)["step"] == 4  # the periodic checkpoint
        process.send_signal(signal.SIGINT)
        release.touch()  # the step in progress goes on, now with a stop requested
    except BaseException:
        _kill(process)
        raise
    _, stderr = _finish(process)
    assert process.returncode == 130, stderr[-4000:]
    assert "checkpoint of step 6" in stderr and "SIGINT" in stderr
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 6  # the interrupted step, finished
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]

    config = preset(MEGL_PRESET, **MEGL_TINY)
    split = build_split(config.task(), "train", config.train_size)
    calls: list[int] = []
    loss = megl_trainer.megl_loss
    monkeypatch.setattr(megl_trainer, "megl_loss", lambda *args: calls.append(1) or loss(*args))
    resumed = train_megl(config, split, out, device="cpu", progress=False)
    assert len(calls) == 2  # steps 6 and 7 only
    monkeypatch.undo()
    straight = train_megl(config, split, device="cpu", progress=False)
    _same_state(resumed.classifier.state_dict(), straight.classifier.state_dict())
    assert resumed.generator is not None and straight.generator is not None
    _same_state(resumed.generator.state_dict(), straight.generator.state_dict())
    assert resumed.history == straight.history
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt"]


CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _signal_at(call: int, function: Any, signum: int = signal.SIGINT) -> Any:
    """``function``, sending this process ``signum`` during its ``call``-th call (mid-step).

    Only while the trainer's handler is installed: a regression must fail this test, not end the
    test session (a bare SIGINT here is a KeyboardInterrupt for pytest, a bare SIGTERM kills it)."""
    count = {"n": 0}

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count["n"] += 1
        if count["n"] == call:
            handler = signal.getsignal(signum)
            assert isinstance(getattr(handler, "__self__", None), GracefulStop), "no stop handler while training"
            signal.raise_signal(signum)
        return function(*args, **kwargs)

    return wrapped


def test_clip_trainer_stops_after_the_step_and_the_log_is_not_repeated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plain_sigint: None) -> None:
    config = ClipTrainConfig(model=CLIP_TINY, steps=5, batch_size=8, warmup_steps=2, checkpoint_every=100,
                             log_every=1, workers=0)
    straight = torch.load(train_clip(config, tmp_path / "straight", device="cpu", progress=False), weights_only=False)
    run = tmp_path / "run"
    monkeypatch.setattr(clip_trainer, "multi_positive_info_nce", _signal_at(3, clip_trainer.multi_positive_info_nce))
    with pytest.raises(KeyboardInterrupt) as caught:
        train_clip(config, run, device="cpu", progress=False)
    monkeypatch.undo()
    assert isinstance(caught.value, TrainingInterrupted)
    assert caught.value.step == 3 and caught.value.checkpoint == run / "last.pt"
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 3
    # what a run killed later would add: a step past the checkpoint and a torn last line
    with (run / "log.jsonl").open("a") as log:
        log.write('{"step": 4, "loss": 9.0, "seconds": 1.0}\n{"step": 5, "lo')
    resumed = torch.load(train_clip(config, run, device="cpu", progress=False), weights_only=False)
    assert resumed["step"] == 5
    _same_state(resumed["model"], straight["model"])
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_vlm_trainer_stops_after_the_step_on_sigterm_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process handles SIGTERM itself; the trainer leaves such a handler alone")
    config = VlmTrainConfig(text={"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2},
                            vision={"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 1, "heads": 2},
                            vision_from_scene_clip=False, batch_size=4, steps=4, steps_per_epoch=2, warmup_steps=2)
    straight = torch.load(train_vlm(config, tmp_path / "straight", device="cpu", progress=False), weights_only=False)
    run = tmp_path / "run"
    monkeypatch.setattr(vlm_trainer, "answer_loss", _signal_at(3, vlm_trainer.answer_loss, signal.SIGTERM))
    with pytest.raises(KeyboardInterrupt) as caught:
        train_vlm(config, run, device="cpu", progress=False)
    monkeypatch.undo()
    assert isinstance(caught.value, TrainingInterrupted)
    assert caught.value.signum == signal.SIGTERM and caught.value.step == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    assert torch.load(run / "last.pt", weights_only=False)["step"] == 3  # not an epoch boundary
    resumed = torch.load(train_vlm(config, run, device="cpu", progress=False), weights_only=False)
    _same_state(resumed["model"], straight["model"])


def test_the_command_line_says_where_an_interrupted_run_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], plain_sigint: None) -> None:
    monkeypatch.setattr(clip_trainer, "multi_positive_info_nce", _signal_at(1, clip_trainer.multi_positive_info_nce))
    argv = ["train", "clip", "--out", str(tmp_path), "--steps", "3", "--batch-size", "4", "--workers", "0",
            "--checkpoint-every", "100", "--quiet"]
    assert main(argv) == 130
    assert f"checkpoint of step 1 written to {tmp_path / 'last.pt'}" in capsys.readouterr().err
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 1


def test_the_first_signal_waits_for_the_step_a_second_one_stops_at_once(plain_sigint: None) -> None:
    with GracefulStop() as stop:
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pytest.fail("the first Ctrl-C was not deferred")
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with pytest.raises(TrainingInterrupted, match="step 7"):
            stop.stop(7, Path("last.pt"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a job started in the background: leave it so
    with GracefulStop() as stop:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    assert not stop.requested


def test_trim_log_keeps_complete_records_up_to_the_checkpoint(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    before = _fingerprint(log)
    trim_log(log, 2)
    assert _fingerprint(log) == before  # nothing to drop: not rewritten
    log.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"st')
    trim_log(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def _truncated_checkpoint(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 2, "model": {"w": torch.randn(128, 128)}}, path)
    path.write_bytes(path.read_bytes()[:5000])
    return path.read_bytes()


def test_a_truncated_checkpoint_is_refused_with_the_way_back(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clip_run, megl_run, vlm_run, cli_run = (tmp_path / name for name in ("clip", "megl", "vlm", "cli"))
    cases = [
        (clip_run / "last.pt", lambda: train_clip(ClipTrainConfig(model=CLIP_TINY, steps=2, batch_size=4, workers=0),
                                                  clip_run, device="cpu", progress=False)),
        (vlm_run / "last.pt", lambda: train_vlm(VlmTrainConfig(
            text={"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2},
            vision={"image_size": 32, "patch_size": 8, "hidden_size": 32, "layers": 1, "heads": 2},
            vision_from_scene_clip=False, batch_size=2, steps=2), vlm_run, device="cpu", progress=False)),
    ]
    megl_config = preset(MEGL_PRESET, **MEGL_TINY)
    split = build_split(megl_config.task(), "train", megl_config.train_size)
    cases += [(megl_run / name, lambda: train_megl(megl_config, split, megl_run, device="cpu", progress=False))
              for name in ("model.pt", "last.pt")]
    for path, train in cases:
        for other in path.parent.glob("*.pt"):
            other.unlink()
        before = _truncated_checkpoint(path)
        with pytest.raises(CorruptCheckpointError, match="move it away") as caught:
            train()
        assert caught.value.path == path and str(path) in str(caught.value)
        assert path.read_bytes() == before  # left for the user to inspect or restore
    # the command line: a message, no traceback, exit 1
    before = _truncated_checkpoint(cli_run / "last.pt")
    assert main(["train", "clip", "--out", str(cli_run), "--steps", "1", "--workers", "0", "--quiet"]) == 1
    assert str(cli_run / "last.pt") in capsys.readouterr().err
    assert (cli_run / "last.pt").read_bytes() == before
    vlm_cli_run = tmp_path / "cli-vlm"
    before = _truncated_checkpoint(vlm_cli_run / "last.pt")
    assert main(["train", "vlm", "--out", str(vlm_cli_run), "--steps", "1", "--quiet"]) == 1
    assert str(vlm_cli_run / "last.pt") in capsys.readouterr().err
    assert (vlm_cli_run / "last.pt").read_bytes() == before
