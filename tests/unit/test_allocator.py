"""The command-line tools re-execute themselves under jemalloc (rsvl_jax/allocator.py)."""
import os
import subprocess
import sys

import pytest

from rsvl_jax import allocator

LIB = "/opt/lib/libjemalloc.so.2"


def test_preload_environment_keeps_what_the_user_set():
    env = allocator.preload_environment({"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:2", "PATH": "/bin"}, LIB)
    assert env["LD_PRELOAD"] == f"{LIB}:/x/libfoo.so"
    assert env["MALLOC_CONF"] == "narenas:2"  # the user's jemalloc options win
    assert env["PATH"] == "/bin"
    fresh = allocator.preload_environment({}, LIB)
    assert fresh["LD_PRELOAD"] == LIB and fresh["MALLOC_CONF"] == allocator.MALLOC_CONF


@pytest.mark.parametrize("environ, library", [
    ({"RSVL_ALLOCATOR": "system"}, LIB),  # turned off
    ({}, None),  # no jemalloc on this machine
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, LIB),  # preloaded already
    ({"RSVL_SAVED_LD_PRELOAD": ""}, LIB),  # this is the re-executed process
])
def test_no_reexecution_when_there_is_nothing_to_do(environ, library):
    assert allocator.preload_environment(environ, library) is None


def test_a_named_library_must_exist(tmp_path):
    assert allocator.find_jemalloc({"RSVL_JEMALLOC": str(tmp_path / "missing.so")}) is None
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert allocator.find_jemalloc({"RSVL_JEMALLOC": str(tmp_path / "libjemalloc.so.2")}) == str(tmp_path / "libjemalloc.so.2")


def _run(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "RSVL_ALLOCATOR")}
    env.update(extra)
    out = subprocess.run([sys.executable, "-m", "rsvl_jax"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(allocator.find_jemalloc() is None, reason="libjemalloc is not installed (apt install libjemalloc2)")
def test_a_command_runs_under_jemalloc_and_its_children_do_not_inherit_it():
    out = _run()
    assert "allocator: jemalloc (" in out, out
    assert "LD_PRELOAD=''" in out, out  # given back: Java or a browser started from here runs as before
    assert "allocator: system malloc" in _run(RSVL_ALLOCATOR="system")
