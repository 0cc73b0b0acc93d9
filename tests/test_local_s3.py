"""Which moto_server the demo and the tests start (jobs.support.local_s3)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from jobs.support.local_s3 import moto_server_executable


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_the_demo_starts_the_venvs_moto_server_not_the_first_on_path(monkeypatch, tmp_path):
    venv = make_executable(tmp_path / "venv" / "bin" / "moto_server")
    other = make_executable(tmp_path / "global" / "bin" / "moto_server")
    monkeypatch.setenv("PATH", f"{other.parent}{os.pathsep}{venv.parent}")
    monkeypatch.setattr(sys, "executable", str(venv.parent / "python"))
    assert moto_server_executable() == str(venv)
    venv.unlink()   # a Python without moto beside it: the one on PATH
    assert moto_server_executable() == str(other)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match=r"pip install 'moto\[server\]'"):
        moto_server_executable()
