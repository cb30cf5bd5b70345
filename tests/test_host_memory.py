"""glibc malloc on transparent huge pages: when entry points restart, and that it works."""

import os
import subprocess
import sys
import textwrap

import pytest

from maskgit_jax import host_memory

GLIBC = (2, 36)


def test_restarts_with_the_tunable_where_the_kernel_advises_huge_pages():
    environment, why = host_memory.huge_page_environment({"HOME": "/h"}, "madvise", GLIBC)
    assert environment == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert why == "restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1"


def test_keeps_the_users_other_tunables():
    environ = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    environment, _ = host_memory.huge_page_environment(environ, "madvise", GLIBC)
    assert environment["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert environ == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}  # not modified


@pytest.mark.parametrize(
    "environ, thp_mode, glibc, reason",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, "as set"),
        ({"MASKGIT_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC, "MASKGIT_JAX_HUGE_PAGES=0"),
        ({}, "madvise", (2, 31), "glibc 2.35"),
        ({}, "madvise", None, "glibc 2.35"),
        ({}, "always", GLIBC, "always"),
        ({}, "never", GLIBC, "never"),
        ({}, None, GLIBC, "unknown"),
    ],
)
def test_no_restart_where_it_cannot_help_or_was_decided(environ, thp_mode, glibc, reason):
    environment, why = host_memory.huge_page_environment(environ, thp_mode, glibc)
    assert environment is None
    assert reason in why


def test_reads_the_kernels_mode(tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    assert host_memory.transparent_huge_page_mode(str(setting)) == "madvise"
    assert host_memory.transparent_huge_page_mode(str(tmp_path / "missing")) is None


def _huge_pages_available() -> bool:
    """Whether this machine is one where `host_memory` restarts (its own decision, not a copy)."""
    environment, _ = host_memory.huge_page_environment(
        {}, host_memory.transparent_huge_page_mode(), host_memory.glibc_version()
    )
    return sys.platform == "linux" and environment is not None


# Relaunches, then reports its pid, GLIBC_TUNABLES and how much of a freshly written 256 MiB
# malloc block sits on huge pages (malloc itself: numpy advises its own large buffers).
_PROBE = textwrap.dedent(
    """
    import os, sys
    print("started", os.getpid(), flush=True)
    from maskgit_jax import host_memory
    why = host_memory.relaunch_with_huge_pages(__name__)
    import ctypes
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    with open("/proc/self/smaps_rollup") as rollup:
        kib = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
    print("done", os.getpid(), os.environ.get("GLIBC_TUNABLES"), kib >> 10, why, flush=True)
    """
)


@pytest.mark.skipif(not _huge_pages_available(), reason="needs Linux THP madvise, glibc >= 2.35")
@pytest.mark.parametrize("opt_out", [False, True])
def test_relaunched_process_allocates_on_huge_pages(tmp_path, opt_out):
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if opt_out:
        env[host_memory.OPT_OUT_VARIABLE] = "0"
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    started = [line.split()[1] for line in lines if line.startswith("started")]
    done = next(line for line in lines if line.startswith("done"))
    _, pid, tunables, huge_mib, *why = done.split()
    assert set(started) == {pid}  # re-executed in place: same process
    if opt_out:
        assert len(started) == 1 and tunables == "None" and int(huge_mib) < 64, result.stdout
        assert "MASKGIT_JAX_HUGE_PAGES=0" in " ".join(why)
    else:
        assert len(started) == 2, result.stdout  # once before the restart, once after
        assert tunables == host_memory.TUNABLE
        assert int(huge_mib) >= 128, result.stdout


def test_an_imported_module_never_restarts(monkeypatch):
    def refuse(*args):
        raise AssertionError("execve called")

    monkeypatch.setattr(os, "execve", refuse)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert "imported" in host_memory.relaunch_with_huge_pages("maskgit_jax.main")
