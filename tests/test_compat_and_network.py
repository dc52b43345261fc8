"""The torchvision work-around (pytorch/vision#9085) and the test suite's network block."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import urllib.request

import pytest
import torch
from conftest import NetworkBlocked

from mmelkit import _compat


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_mmelkit_then_open_clip_works() -> None:
    result = _run(
        """
        import mmelkit, open_clip, torchvision
        print("ok", open_clip.__version__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_the_upstream_bug_is_real_here_or_absent() -> None:
    """Documents why _compat exists: without it, open_clip fails on this CPU torch; with a matching
    torchvision build (a GPU box) _compat must leave everything alone."""
    bare = _run("import open_clip")
    patched = _run("from mmelkit import _compat; print(_compat.applied)")  # the package applies it on import
    assert patched.returncode == 0, patched.stderr
    if bare.returncode != 0:
        assert "torchvision::nms does not exist" in bare.stderr
        assert patched.stdout.strip() == "True"
    else:
        assert patched.stdout.strip() == "False"


def test_compat_does_nothing_with_a_cuda_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert not _compat.needs_patch()


def test_compat_does_nothing_once_torchvision_is_imported() -> None:
    import torchvision  # noqa: F401

    assert not _compat.needs_patch()
    assert not _compat.apply()


def test_network_is_blocked() -> None:
    with pytest.raises(NetworkBlocked):
        socket.create_connection(("93.184.216.34", 80), timeout=2)
    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com", timeout=2)


def test_loopback_still_works() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=2)
    client.close()
    server.close()
