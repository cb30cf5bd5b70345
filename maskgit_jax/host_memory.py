"""Host memory for CPU runs: glibc's malloc on transparent huge pages, set before start-up.

XLA:CPU allocates each execution's temporaries afresh: one imagenet256 train step at batch 4
takes a single 2.5 GB block. glibc maps a block that large on every call and unmaps it on
free, so every step faults it back in 4 KiB at a time. glibc's `glibc.malloc.hugetlb=1`
tunable advises such blocks onto 2 MiB transparent huge pages. On a 2-core AMX Xeon,
`/usr/bin/time -v python benchmarks/train_speed.py --batch 4 --steps 3 --dtypes bfloat16`
counted 3.80M minor page faults with `MASKGIT_JAX_HUGE_PAGES=0` and 0.76M without, and the
bf16 step ran 2.74 -> 2.35 s. glibc reads tunables only when a process starts, so the
training entry point re-executes itself once with the tunable set.
`MASKGIT_JAX_HUGE_PAGES=0` keeps the default allocator.
"""

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "MASKGIT_JAX_HUGE_PAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_MINIMUM_GLIBC = (2, 35)  # the first glibc with the hugetlb tunable


def transparent_huge_page_mode(path: str = _THP_SETTING) -> str | None:
    """The kernel's THP mode ("always", "madvise" or "never"); None where it cannot be read."""
    try:
        with open(path) as setting:
            text = setting.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for another C library or platform."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def huge_page_environment(
    environ: Mapping[str, str],
    thp_mode: str | None,
    glibc: tuple[int, int] | None,
) -> tuple[dict[str, str] | None, str]:
    """The environment to restart with (None: keep this process) and why, in a few words.

    Restarting helps only where glibc knows the tunable and the kernel hands out huge pages on
    request ("madvise"); with "always" every large mapping gets them already.
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None, f"as set (GLIBC_TUNABLES={tunables})"
    if environ.get(OPT_OUT_VARIABLE) == "0":
        return None, f"default malloc ({OPT_OUT_VARIABLE}=0)"
    if glibc is None or glibc < _MINIMUM_GLIBC:
        return None, "default malloc (needs glibc 2.35 or later)"
    if thp_mode == "always":
        return None, "default malloc; the kernel backs large blocks with huge pages (THP: always)"
    if thp_mode != "madvise":
        return None, f"default malloc (transparent huge pages: {thp_mode or 'unknown'})"
    environment = dict(environ)
    environment["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return environment, f"restarting with GLIBC_TUNABLES={environment['GLIBC_TUNABLES']}"


def relaunch_with_huge_pages(module_name: str) -> str:
    """Re-executes this process with `TUNABLE` where that helps; returns the allocator in use.

    Call it with the script's `__name__` before its heavy imports. Only a script run as
    `__main__` restarts: the new process starts over with the same command line and
    environment plus the tunable, and keeps the process id. An imported module changes nothing.
    """
    if module_name != "__main__":
        return "not changed (imported, not run)"
    environment, description = huge_page_environment(
        os.environ, transparent_huge_page_mode(), glibc_version()
    )
    if environment is not None and sys.platform == "linux":
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)
    return description
