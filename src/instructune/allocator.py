"""The C allocator a CPU run trains under: tcmalloc where this machine has it, glibc's malloc otherwise.

Training on a CPU allocates and frees every pass's activations; their shapes vary from batch to batch (length-grouped
batches, shared prefixes, generating validation), and glibc's heap fragments under that: a process keeps 1.7-1.9x the
bytes it uses above the model (`benchmarks/cpu_allocator.py`: SmolLM2-135M LoRA on the e-mail shapes, 4.3-4.7 GB
above the model under glibc, 2.58 GB under tcmalloc, 2.51 GB with every block its own mapping) at the same speed.
So the `instructune` command starts itself again with tcmalloc preloaded (`LD_PRELOAD`, before any library is
loaded: an allocator cannot be swapped once memory is allocated) when it finds the library:

- `INSTRUCTUNE_TCMALLOC=/path/libtcmalloc_minimal.so.4`, else the copy `make setup` unpacks into the environment
  (`<venv>/lib/tcmalloc/`, from Debian's `libtcmalloc-minimal4`), else the system's (`/usr/lib/*/`);
- `INSTRUCTUNE_ALLOCATOR=system` keeps glibc's malloc (the memory plan then counts what glibc keeps); any value but
  auto and system, or an INSTRUCTUNE_TCMALLOC that is not a library, is refused (exit 2).

Processes started from the command (torchrun's workers) inherit the preload. The memory plan asks `name()` which
allocator this process runs under (`train.memory.allocator_share`)."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

LIBRARY = "libtcmalloc_minimal.so.4"
# tcmalloc reports every allocation above 1 GiB on stderr ("tcmalloc: large alloc ..."): a model's embeddings are one
REPORT_THRESHOLD = str(1 << 50)


def find_tcmalloc() -> Path | None:
    """The tcmalloc library to preload: $INSTRUCTUNE_TCMALLOC, the environment's copy, the system's; None if none."""
    if env := os.environ.get("INSTRUCTUNE_TCMALLOC"):
        return Path(env) if Path(env).is_file() else None
    candidates = [Path(sys.prefix) / "lib" / "tcmalloc" / LIBRARY]
    candidates += [Path(p) for p in sorted(glob.glob(f"/usr/lib/*/{LIBRARY}")) + [f"/usr/lib64/{LIBRARY}"]]
    return next((p for p in candidates if p.is_file()), None)


def name() -> str:
    """The allocator this process runs under: "tcmalloc", "jemalloc" or "glibc" (the system's, elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "glibc"
    return next((n for n in ("tcmalloc", "jemalloc") if f"lib{n}" in maps), "glibc")


def chosen() -> str:
    """The allocator a process started like this one runs under once `preload` has run: tcmalloc where it would be
    preloaded, else this process's own."""
    return "tcmalloc" if preload_command() else name()


def preload_command() -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment that start this process again with tcmalloc preloaded, or None: not on
    Linux, asked not to, already preloaded (by us or the user: any LD_PRELOAD allocator), or no tcmalloc found."""
    if not sys.platform.startswith("linux") or os.environ.get("INSTRUCTUNE_ALLOCATOR", "auto") != "auto":
        return None
    preload = os.environ.get("LD_PRELOAD", "")
    if "malloc" in preload or (library := find_tcmalloc()) is None:
        return None
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [str(library), preload])),
               INSTRUCTUNE_ALLOCATOR="tcmalloc", TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=REPORT_THRESHOLD)
    return [sys.executable, *sys.orig_argv[1:]], env


def check_environment() -> None:
    """Refuse (one line naming the variable, exit 2) an INSTRUCTUNE_ALLOCATOR other than auto or system, and an
    INSTRUCTUNE_TCMALLOC that is not a shared library: asked for by name, it must not be ignored in silence."""
    choice = os.environ.get("INSTRUCTUNE_ALLOCATOR", "auto")
    if choice not in ("auto", "system", "tcmalloc"):  # tcmalloc: what `preload` sets in the process it starts
        _refuse("INSTRUCTUNE_ALLOCATOR", f"expected auto (tcmalloc where found) or system, not {choice!r}")
    library = os.environ.get("INSTRUCTUNE_TCMALLOC")
    if library and choice == "auto":
        try:
            with open(library, "rb") as f:
                elf = f.read(4) == b"\x7fELF"
        except OSError as e:
            _refuse("INSTRUCTUNE_TCMALLOC", f"cannot read {library}: {e.strerror or e}")
        if not elf:
            _refuse("INSTRUCTUNE_TCMALLOC", f"{library} is not a shared library (expected libtcmalloc_minimal.so.4)")


def _refuse(key: str, message: str) -> None:
    print(f"error: {key}: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def preload() -> None:
    """Replace this process with itself under tcmalloc where `preload_command` says so (same pid, same exit status);
    otherwise return. Call it first thing: the `instructune` command does (`cli.command`)."""
    check_environment()
    if started := preload_command():
        argv, env = started
        os.execve(argv[0], argv, env)
