"""jemalloc under the command-line tools: XLA's CPU runtime is much faster with a caching allocator.

Why: XLA's CPU runtime allocates an executable's temporary buffer on every call (2.1 GB for
PIR's train step at batch 8). glibc's malloc maps blocks that large fresh from the kernel and
unmaps them on free, so every step page-faults all of it again: about 540k faults and 1 s of
kernel time per PIR step on 2 cores. jemalloc with `retain` and no decay keeps freed pages
mapped and hands them out again: PIR's step went from 3.9-4.1 s to 3.4 s here, and ResNet-50's
forward ran 7% faster. The trade is the usual one for a training process: memory freed
during the run is not returned to the OS, so the resident size stays at its peak.

`python -m rsvl_jax.<command>` re-executes itself once with jemalloc preloaded when
libjemalloc is installed (Debian/Ubuntu: `apt install libjemalloc2`) and not loaded already.
`RSVL_ALLOCATOR=system` turns this off; `RSVL_JEMALLOC=/path/libjemalloc.so.2` names the
library. The re-executed process puts LD_PRELOAD and MALLOC_CONF back as they were, so the
programs it starts (Java for METEOR/SPICE) do not inherit the preload. Importing rsvl_jax
from your own program never re-executes it: preload jemalloc yourself if you want the gain
(`LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1`).

`python -m rsvl_jax` says which allocator a command runs with.
"""
from __future__ import annotations

import glob
import os
import sys

# Keep every freed page mapped (no decay, retained extents): no page faults on reuse.
MALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set in the re-executed process: the LD_PRELOAD and MALLOC_CONF to give back to its children.
_SAVED = ("RSVL_SAVED_LD_PRELOAD", "RSVL_SAVED_MALLOC_CONF")
_SEARCH = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


def find_jemalloc(environ=os.environ) -> str | None:
    """The jemalloc shared library: $RSVL_JEMALLOC, the environment's own lib/ (conda), the
    system's usual places. None when there is none."""
    named = environ.get("RSVL_JEMALLOC")
    if named:
        return named if os.path.isfile(named) else None
    for path in (*glob.glob(os.path.join(sys.prefix, "lib", "libjemalloc.so.2")), *_SEARCH):
        if os.path.isfile(path):
            return path
    return None


def preload_environment(environ, library: str | None) -> dict | None:
    """The environment to re-execute with, or None when nothing is to be done (turned off,
    already preloaded or re-executed, not Linux, no library)."""
    if environ.get("RSVL_ALLOCATOR", "jemalloc") == "system" or _SAVED[0] in environ:
        return None
    if not sys.platform.startswith("linux") or library is None or "jemalloc" in environ.get("LD_PRELOAD", ""):
        return None
    env = dict(environ)
    preload, conf = environ.get("LD_PRELOAD", ""), environ.get("MALLOC_CONF", "")
    env.update({_SAVED[0]: preload, _SAVED[1]: conf})
    env["LD_PRELOAD"] = ":".join(p for p in (library, preload) if p)
    env["MALLOC_CONF"] = conf or MALLOC_CONF
    return env


_checked = False  # once per process


def use_jemalloc() -> None:
    """Re-executes this command with jemalloc preloaded if that is possible and not done yet;
    in the re-executed process, restores the environment its children should see. Call it
    before anything heavy is imported: the process is replaced (same PID, same arguments)."""
    global _checked
    if _checked:
        return
    _checked = True
    if _SAVED[0] in os.environ:
        for key, saved in zip(("LD_PRELOAD", "MALLOC_CONF"), _SAVED):
            value = os.environ.pop(saved, "")
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
        return
    env = preload_environment(os.environ, find_jemalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def launched_as_command() -> bool:
    """True in `python -m rsvl_jax[.<command>] ...` (while the package is being imported for it)."""
    argv = getattr(sys, "orig_argv", [])
    return len(argv) >= 3 and argv[1] == "-m" and (argv[2] == "rsvl_jax" or argv[2].startswith("rsvl_jax."))


def loaded_allocator() -> str:
    """'jemalloc (<path>)' when jemalloc is mapped into this process, else 'system malloc'."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "jemalloc" in line:
                    return f"jemalloc ({line.split()[-1]})"
    except OSError:
        pass
    return "system malloc"
