"""The `instructune` command trains under tcmalloc where it finds it (`instructune.allocator`), and the memory plan
counts what the allocator the process runs under keeps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from instructune import allocator
from instructune.train import memory

LIBRARY = allocator.find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(LIBRARY is None or not sys.platform.startswith("linux"),
                                    reason="no tcmalloc here (`make setup` unpacks Debian's into the environment)")
PROBE = """
import os, sys
from instructune import allocator
allocator.preload()
print(allocator.name(), os.getpid(), os.environ.get("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"), sys.argv[1:])
sys.exit(3)
"""


def _probe(env: dict, *args: str) -> subprocess.CompletedProcess:
    """The probe in a fresh process (its pid in `.pid`): the allocator it ends up under, its pid, and so on."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "INSTRUCTUNE_ALLOCATOR")} | env
    with subprocess.Popen([sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env) as p:
        out, err = p.communicate(timeout=60)
    done = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    done.pid = p.pid
    return done


@needs_tcmalloc
def test_the_process_starts_again_under_tcmalloc_with_its_arguments_pid_and_exit_status():
    """Replaced in place (execve): the same pid (a launcher such as torchrun keeps watching it), the same
    arguments, the exit status of what runs; tcmalloc's "large alloc" reports off; stderr silent."""
    done = _probe({}, "run", "a b.yaml")
    assert done.returncode == 3, done.stderr
    name, pid, threshold, args = done.stdout.split(maxsplit=3)
    assert name == "tcmalloc" and int(pid) == done.pid and int(threshold) >= 1 << 40
    assert args.strip() == "['run', 'a b.yaml']"
    assert done.stderr == ""


@needs_tcmalloc
def test_asked_for_the_system_allocator_or_already_preloaded_it_runs_as_it_is():
    assert _probe({"INSTRUCTUNE_ALLOCATOR": "system"}).stdout.split()[0] == "glibc"
    # an allocator the user preloads is kept (and nothing preloaded twice)
    done = _probe({"LD_PRELOAD": str(LIBRARY)})
    assert done.returncode == 3 and done.stdout.split()[0] == "tcmalloc" and done.stdout.split()[2] == "None"


def test_no_library_means_no_restart(monkeypatch, tmp_path):
    """No tcmalloc found: the process runs as it is, under glibc (`chosen` says so)."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("INSTRUCTUNE_ALLOCATOR", raising=False)
    monkeypatch.delenv("INSTRUCTUNE_TCMALLOC", raising=False)
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(allocator.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(allocator, "LIBRARY", "libtcmalloc_minimal.so.4-not-here")
    assert allocator.find_tcmalloc() is None and allocator.preload_command() is None
    assert allocator.chosen() == allocator.name() == "glibc"
    monkeypatch.setenv("INSTRUCTUNE_ALLOCATOR", "system")
    assert allocator.chosen() == "glibc"


@pytest.mark.parametrize("env, message", [
    ({"INSTRUCTUNE_ALLOCATOR": "tcmaloc"}, "error: INSTRUCTUNE_ALLOCATOR: expected auto (tcmalloc where found) or "
                                           "system, not 'tcmaloc'"),
    ({"INSTRUCTUNE_ALLOCATOR": ""}, "error: INSTRUCTUNE_ALLOCATOR: expected auto"),
    ({"INSTRUCTUNE_TCMALLOC": "/nonexistent/libtcmalloc_minimal.so.4"},
     "error: INSTRUCTUNE_TCMALLOC: cannot read /nonexistent/libtcmalloc_minimal.so.4: No such file or directory"),
    ({"INSTRUCTUNE_TCMALLOC": "TEXT"}, "is not a shared library (expected libtcmalloc_minimal.so.4)"),
    ({"INSTRUCTUNE_TCMALLOC": "EMPTY"}, "is not a shared library"),
    ({"INSTRUCTUNE_TCMALLOC": "DIR"}, "error: INSTRUCTUNE_TCMALLOC: cannot read"),
])
def test_a_bad_allocator_setting_is_refused_in_one_line(tmp_path, env, message):
    """Asked for by name, a wrong setting is not ignored in silence (nor left to the loader's warning at every
    start): one line naming the variable, exit 2, before anything runs."""
    (tmp_path / "text.so").write_text("not a library\n")
    (tmp_path / "empty.so").write_bytes(b"")
    places = {"TEXT": str(tmp_path / "text.so"), "EMPTY": str(tmp_path / "empty.so"), "DIR": str(tmp_path)}
    done = _probe({k: places.get(v, v) for k, v in env.items()})
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout, done.stderr)
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_the_plan_counts_what_the_processs_allocator_keeps(monkeypatch):
    """The allocator term is the share of this process's allocator (glibc keeps far more than tcmalloc); CUDA's
    caching allocator is the same whatever the host's."""
    shape = memory.Shape(parameters=10_000_000, trainable=100_000, root=2_000_000, layer=1_000_000, layers=8,
                         hidden=256, mlp=1024, vocab=8000, kv=128)
    plans = {}
    for name in ("glibc", "tcmalloc"):
        monkeypatch.setattr(allocator, "name", lambda name=name: name)
        assert memory.allocator_share("cuda") == memory.ALLOCATOR["cuda"]
        plans[name] = memory.footprint(shape, "ddp", 1, tokens=4096, supervised=64)
    transient = plans["glibc"].parts["allocator"] / memory.ALLOCATOR["cpu-glibc"]
    assert plans["tcmalloc"].parts["allocator"] == pytest.approx(memory.ALLOCATOR["cpu-tcmalloc"] * transient, abs=1)
    assert plans["glibc"].peak - plans["tcmalloc"].peak == (plans["glibc"].parts["allocator"]
                                                            - plans["tcmalloc"].parts["allocator"]) > 0


def test_checkpointing_shrinks_what_tcmalloc_keeps_not_what_glibc_keeps(monkeypatch):
    """tcmalloc's share is of the bytes live at once (checkpointing: one layer recomputed at a time), glibc's of all
    a pass allocates, checkpointed or not (`memory.LIVE_BYTES`)."""
    shape = memory.Shape(parameters=10_000_000, trainable=100_000, root=2_000_000, layer=1_000_000, layers=8,
                         hidden=256, mlp=1024, vocab=8000, kv=128)
    kept = {}
    for name in ("glibc", "tcmalloc"):
        monkeypatch.setattr(allocator, "name", lambda name=name: name)
        kept[name] = [memory.footprint(shape, "ddp", 1, 4096, 64, checkpointing=c).parts["allocator"]
                      for c in (False, True)]
    assert kept["glibc"][0] == kept["glibc"][1]
    assert kept["tcmalloc"][1] < kept["tcmalloc"][0] / 3
