"""Peak memory of a benchmark's child process and of every process it starts (vLLM's engine core and its
tensor-parallel workers are processes of their own), sampled from /proc while it runs.

``VmRSS`` is all resident memory; ``RssAnon`` the part the process itself holds. The rest is mapped files
(a checkpoint's pages among them), which the kernel can drop, so both are reported.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

KEYS = ("VmRSS", "RssAnon", "RssFile")


def tree(root: int) -> list[int]:
    """``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def status(pid: int) -> dict[str, str]:
    try:
        return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return {}


def watch(proc: subprocess.Popen, interval: float = 0.5, on_sample: Callable[[dict], None] | None = None) -> dict:
    """Wait for ``proc``. Returns ``{"total": {key: GiB}, "processes": [...]}``: the peak of the tree's summed
    memory, and each process' own peaks (those that held more than 100 MiB), in GiB. ``on_sample`` hears each
    sample of the tree's summed memory (kB), to attribute it to what the process was doing then."""
    total = dict.fromkeys(KEYS, 0)
    per: dict[int, dict] = {}
    while proc.poll() is None:
        now = dict.fromkeys(KEYS, 0)
        for pid in tree(proc.pid):
            st = status(pid)
            if not st:
                continue
            p = per.setdefault(pid, {"name": st.get("Name", "").strip(), **dict.fromkeys(KEYS, 0)})
            for k in KEYS:
                kb = int(st.get(k, "0 kB").split()[0])
                now[k] += kb
                p[k] = max(p[k], kb)
        total = {k: max(total[k], now[k]) for k in KEYS}
        if on_sample is not None:
            on_sample(now)
        time.sleep(interval)
    gib = lambda kb: round(kb / 2**20, 2)  # noqa: E731
    return {"total": {k: gib(v) for k, v in total.items()},
            "processes": [{"pid": pid, "name": p["name"], **{k: gib(p[k]) for k in KEYS}}
                          for pid, p in sorted(per.items()) if p["VmRSS"] > 100 * 1024]}


def run_worker(cmd: list[str]) -> dict | None:
    """Run a benchmark's worker process, which prints its result as one ``RESULT {json}`` line; that result with
    the process tree's ``memory`` (:func:`watch`), or None (its stderr's tail printed) if it failed."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        mem = watch(proc)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    line = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not line:
        print(stderr[-4000:], file=sys.stderr)
        return None
    return {**json.loads(line[-1][len("RESULT "):]), "memory": mem}
