"""An interrupted build of the native CPU kernels never blocks a later start (issue 44, item 7).

In a fresh ``KBVQ_CACHE_DIR``: a build (``python -m vllm_kbvq.kernels.cpu_moe``) stopped half-way by
SIGTERM, then one stopped by SIGKILL (each must start compiling at once, not wait on what the one
before left); then a load while another process holds the build lock says that it waits, and builds
once the holder dies; then a load finds the finished folder and uses it without building. One full
build in all (about a minute on 2 cores, with MAX_JOBS=1). The processes are started in their own
process groups, and each group (ninja, the compilers) is killed when its step ends.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vllm_kbvq.kernels import cpu_moe

pytestmark = pytest.mark.skipif(cpu_moe._disabled(), reason="KBVQ_CPU_KERNELS=0")

STARTS_S = 150      # an import of torch and the start of a compiler, on a busy 2-core machine
BUILD_S = 300       # a full build there takes 40-90 s; a hang is forever
FAST_LOAD_S = 60    # a load of a finished build: no compiler

# faulthandler on SIGUSR1: a step that runs out of time dumps where its process is stuck
PRELUDE = "import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
BUILD = PRELUDE + "import runpy; runpy.run_module('vllm_kbvq.kernels.cpu_moe', run_name='__main__', alter_sys=True)"
LOAD = PRELUDE + ("from vllm_kbvq.kernels import cpu_moe; ok = cpu_moe.available(); import torch; "
                  "print('built-in-process', 'torch.utils.cpp_extension' in sys.modules, flush=True); "
                  "print('isa', torch.ops.kbvq_cpu.isa() if ok else None, flush=True); sys.exit(0 if ok else 3)")
HOLD = ("import fcntl, os, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.truncate(0); f.write(f'{os.getpid()}\\n'); f.flush(); print('locked', flush=True); time.sleep(3600)")


class Procs:
    """Subprocesses in their own process groups, output to a file each; every group killed at the end."""

    def __init__(self, tmp_path: Path, cache: Path):
        self.tmp, self.cache, self.started = tmp_path, cache, []
        self.env = {**os.environ, "KBVQ_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "MAX_JOBS": "1",
                    "KBVQ_CPU_KERNELS": "1", "PYTHONUNBUFFERED": "1"}

    def start(self, name: str, code: str, *args: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        with open(log, "wb") as f:  # cwd: tmp_path, so the package comes from sys.path as in the test process
            p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=self.tmp, env=self.env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        p.log, p.t0 = log, time.monotonic()
        self.started.append(p)
        return p

    @staticmethod
    def output(p) -> str:
        return p.log.read_text(errors="replace")

    def stack(self, p) -> str:
        """The process's Python stack (faulthandler), for a failure message."""
        if p.poll() is None:
            os.kill(p.pid, signal.SIGUSR1)
            time.sleep(1.0)
        return self.output(p)[-4000:]

    def listing(self) -> str:
        return "\n".join(sorted(str(q.relative_to(self.cache)) for q in self.cache.rglob("*")
                                if len(q.relative_to(self.cache).parts) <= 2)) or "(empty)"

    @staticmethod
    def members(pgid: int) -> list[tuple[int, str]]:
        """(pid, command name) of the live processes in a process group."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
            if int(rest[2]) == pgid and rest[0] != "Z":
                out.append((int(d.name), comm))
        return out

    def kill_group(self, p) -> None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        deadline = time.monotonic() + 30
        while self.members(p.pid) and time.monotonic() < deadline:
            time.sleep(0.2)

    def close(self) -> None:
        for p in self.started:
            self.kill_group(p)


@pytest.fixture
def procs(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("KBVQ_CACHE_DIR", str(cache))  # for build_dir() in this process: the same folder
    ps = Procs(tmp_path, cache)
    yield ps
    ps.close()


def _wait(cond, timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return cond()


def _interrupt_build(procs: Procs, sig: int, timings: dict) -> None:
    """Start a build, stop it with ``sig`` a few seconds into compiling; it must have started compiling."""
    name = signal.Signals(sig).name
    p = procs.start(f"build-{name}", BUILD)
    def compiling():  # ninja running: the build folder is written and the compiler starts
        return any(comm == "ninja" for _, comm in procs.members(p.pid))

    if not _wait(lambda: compiling() or p.poll() is not None, STARTS_S):
        pytest.fail(f"the build to be stopped by {name} never started compiling in {STARTS_S} s: it waits on what "
                    f"an earlier, stopped build left.\ncache folder:\n{procs.listing()}\n"
                    f"its output and stack:\n{procs.stack(p)}")
    assert p.poll() is None, f"the build ended before it was stopped:\n{procs.output(p)}"
    timings[f"{name} build compiling after"] = time.monotonic() - p.t0
    time.sleep(3.0)  # half-way: objects being compiled, nothing linked
    assert p.poll() is None and not list(procs.cache.rglob("*.so")), procs.listing()
    os.kill(p.pid, sig)  # the Python process only, as `timeout`, `docker stop` or the OOM killer stop it
    assert p.wait(30) == -sig
    procs.kill_group(p)  # its compilers, orphaned now, would only slow the next steps down


def test_interrupted_builds_do_not_block_later_loads(procs):
    timings = {}
    out, lock = cpu_moe.build_dir(), cpu_moe.build_dir().with_name(cpu_moe.build_dir().name + ".lock")

    _interrupt_build(procs, signal.SIGTERM, timings)
    _interrupt_build(procs, signal.SIGKILL, timings)  # it started compiling although SIGTERM's build left things
    leftovers = procs.listing()

    # A live holder of the lock (as a build in another process): the load says that it waits, and goes on once
    # the holder dies (SIGKILL here, a finished build usually).
    holder = procs.start("holder", HOLD, str(lock))
    assert _wait(lambda: "locked" in procs.output(holder) or holder.poll() is not None, 30), procs.output(holder)
    assert holder.poll() is None, procs.output(holder)
    loader = procs.start("load-waits", LOAD)
    if not _wait(lambda: "another process" in procs.output(loader) or loader.poll() is not None, STARTS_S):
        pytest.fail(f"a load waiting on the lock said nothing in {STARTS_S} s:\n{procs.stack(loader)}")
    assert loader.poll() is None, f"the load did not wait for the lock's holder:\n{procs.output(loader)}"
    message = next(line for line in procs.output(loader).splitlines() if "another process" in line)
    assert str(lock) in message and f"pid {holder.pid}" in message, message
    timings["load said it waits after"] = time.monotonic() - loader.t0
    time.sleep(2.0)
    assert loader.poll() is None and procs.output(loader).count("another process") == 1, procs.output(loader)
    procs.kill_group(holder)
    t0 = time.monotonic()
    try:
        rc = loader.wait(BUILD_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the load after the stopped builds did not finish in {BUILD_S} s.\nleft by the stopped "
                    f"builds:\n{leftovers}\nits output and stack:\n{procs.stack(loader)}")
    timings["build after the holder died"] = time.monotonic() - t0
    text = procs.output(loader)
    assert rc == 0 and "building the native CPU kernels" in text, text
    isa = text.split("isa ", 1)[1].split()[0]
    assert isa in ("amx", "avx512", "avx2", "portable"), text
    # the finished folder, complete; the stopped builds' private folders cleared; the lock free
    assert (out / "complete").is_file() and len(list(out.glob("*.so"))) == 1, procs.listing()
    assert not list(out.parent.glob("*.tmp-*")), procs.listing()
    assert not (out / "lock").exists(), procs.listing()

    # A later start loads the finished library without the build tools (vLLM's workers start fast).
    fast = procs.start("load-fast", LOAD)
    rc = fast.wait(FAST_LOAD_S)
    text = procs.output(fast)
    timings["load of the finished build"] = time.monotonic() - fast.t0
    assert rc == 0 and f"isa {isa}" in text and "building" not in text and "another process" not in text, text
    assert "built-in-process False" in text, "the finished build was loaded through torch's cpp_extension\n" + text
    print("  ".join(f"{k}: {v:.1f} s" for k, v in timings.items()))
