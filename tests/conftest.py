"""Shared test fixtures: paths to the project and to the test data (tokenizers), and running commands that fork."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))


def openllama_tokenizer(name: str) -> Path:
    """Path of an OpenLLaMA tokenizer in tests/data (see its README.md)."""
    return TEST_DATA / name


def run_process_group(command, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run a command that starts processes of its own (torchrun) in a new process group, and leave nothing behind.

    On a timeout the whole group is killed, not just its leader; after the command ends, any member still alive
    (a worker its launcher orphaned) is killed too and fails the test.
    """
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{command[:4]}... did not finish in {timeout} s; its processes were killed")
    if _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{command[:4]}... left processes behind (killed)")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False
