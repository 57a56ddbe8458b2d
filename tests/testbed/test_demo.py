"""The README's main job as a whole: ``python -m quantize_tools.testbed.demo`` from a clean folder.

build -> quantize -> serve (vLLM's OpenAI server, CPU build) -> one chat answer -> server stopped, in a
subprocess, as ``make demo`` runs it. Only the quantizer's calibration size and k-means iterations and
the port are changed (options that shrink the work; no stage is skipped). Checked: exit status 0, an
answer, every stage's time, the memory line against the checkpoint files (read here from the raw
safetensors headers, not through the demo's code), and that nothing of the server is left behind: no
process naming its port or folder, no new shared-memory object in /dev/shm.
"""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")
TIMEOUT_S = 25 * 60  # the whole demo; measured ~6 min on a 2-core CPU


def _header(f: Path) -> dict:
    """A safetensors file's header: ``name -> {dtype, shape, data_offsets}``."""
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def _tensors(model_dir: Path) -> dict[str, tuple[str, int]]:
    """``name -> (dtype, bytes)`` over a checkpoint's safetensors files."""
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for name, t in _header(f).items():
            begin, end = t["data_offsets"]
            out[name] = (t["dtype"], end - begin)
    return out


def _shm_objects() -> set[str]:
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def _open_shm_objects() -> set[str]:
    """Names in /dev/shm that a live process maps or holds open (another job's objects, not leaks)."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if " /dev/shm/" in line:
                    held.add(line.split("/dev/shm/", 1)[1].split(" ")[0])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target[len("/dev/shm/"):].split(" ")[0])
        except OSError:
            continue
    return held


def _processes_naming(*needles: str) -> list[str]:
    """Command lines of live processes (not this one) that contain any of ``needles``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(n in cmd for n in needles):
            found.append(f"{pid}: {cmd.strip()}")
    return found


def _mib(n: int) -> float:
    return n / 2**20


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    from quantize_tools.testbed.server import free_port

    out = tmp_path / "out"
    port = free_port()
    shm_before = _shm_objects()
    cmd = [sys.executable, "-m", "quantize_tools.testbed.demo", "--out", str(out), "--port", str(port),
           "--nsamples", "4", "--seqlen", "128", "--kmeans-iters", "4"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    seconds = time.time() - t0
    text = r.stdout
    where = f"\n--- stdout ---\n{r.stdout[-6000:]}\n--- stderr ---\n{r.stderr[-6000:]}"
    log = out / "demo-server.log"
    if log.is_file():
        where += f"\n--- end of {log} ---\n{log.read_text(errors='replace')[-4000:]}"
    print(f"demo took {seconds:.0f} s\n{text}")
    assert r.returncode == 0, where

    # every stage ran, and said how long it took
    assert "== building the testbed MoE" in text, where
    assert "== quantizing its experts at 2 bits" in text, where
    assert "== starting vLLM's OpenAI-compatible server" in text, where
    done = re.search(r"^done in (\d+) s \((.*)\); server stopped\.", text, re.M)
    assert done, where
    stages = dict((k.strip(), int(v)) for k, v in re.findall(r"([a-z -]+) (\d+) s", done.group(2)))
    assert set(stages) >= {"build", "quantize", "server start-up", "answer", "server stop"}, done.group(0)

    # the full settings are printed with the results page's numbers
    kbvq_w2 = json.loads((REPO / "docs" / "results" / "kbvq-w2.json").read_text())
    assert f"perplexity {kbvq_w2['perplexity']['wikipedia']:7.2f}" in text, where

    # the answer
    answer = re.search(r"^assistant: (.*)$", text, re.M)
    assert answer and answer.group(1).strip(), where

    # the memory line, against the checkpoints' own headers
    base, qdir = out / "testbed-qwen2_moe-e8", out / "testbed-qwen2_moe-e8-kbvq2"
    original, quantized = _tensors(base), _tensors(qdir)
    assert {dtype for dtype, _ in original.values()} == {"BF16"}, "the testbed is stored in bfloat16"
    carried = {n: v for n, v in quantized.items() if n in original}  # attention, norms, embeddings, routers
    assert carried and all(dtype == "BF16" for dtype, _ in carried.values()), "non-expert tensors stay bfloat16"
    assert all(original[n] == v for n, v in carried.items())
    whole0, whole_q = sum(b for _, b in original.values()), sum(b for _, b in quantized.values())
    config = json.loads((base / "config.json").read_text())
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    expert_weights = layers * 3 * hidden * (config["num_experts"] * config["moe_intermediate_size"]
                                            + config["shared_expert_intermediate_size"])
    experts0 = 2 * expert_weights  # bfloat16
    experts_q = whole_q - sum(b for _, b in carried.values())
    assert whole0 - experts0 == sum(b for _, b in carried.values())  # every other tensor was carried over

    m = re.search(r"^  experts +([\d.]+) MiB -> +([\d.]+) MiB +\(([\d.]+)x smaller\)", text, re.M)
    assert m, where
    assert float(m.group(1)) == pytest.approx(_mib(experts0), abs=0.06)
    assert float(m.group(2)) == pytest.approx(_mib(experts_q), abs=0.06)
    assert float(m.group(3)) == pytest.approx(experts0 / experts_q, abs=0.06)
    m = re.search(r"^  whole model +([\d.]+) MiB -> +([\d.]+) MiB +\(saves ([\d.]+) MiB, (\d+) %", text, re.M)
    assert m, where
    assert float(m.group(1)) == pytest.approx(_mib(whole0), abs=0.06)
    assert float(m.group(2)) == pytest.approx(_mib(whole_q), abs=0.06)
    assert float(m.group(3)) == pytest.approx(_mib(whole0 - whole_q), abs=0.06)
    assert int(m.group(4)) == round(100 * (1 - whole_q / whole0))
    report = json.loads((qdir / "kbvq_report.json").read_text())["summary"]
    assert experts_q * 8 == pytest.approx(report["expert_bits_per_weight"] * report["expert_weights"], rel=1e-9)

    # nothing of the server is left: no process, no shared memory
    deadline = time.time() + 10  # a reaped child's /proc entry may linger a moment
    while (left := _processes_naming(f"--port {port}", str(out))) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left after the demo: {left}"
    # vLLM's default --shutdown-timeout 0 kills its engine core before it removes its shared-memory queues;
    # Python's resource tracker then removes them, warning of "leaked shared_memory objects"
    assert "leaked shared_memory" not in log.read_text(errors="replace"), f"see {log}"
    new = _shm_objects() - shm_before
    leaked = sorted(new - _open_shm_objects())
    assert not leaked, f"shared-memory objects left in {SHM} by the demo: {leaked}"


def test_server_stop_ends_its_whole_process_group(tmp_path):
    """A server that ignores SIGTERM, with a child (as vLLM's API server has its engine core): stop() ends both."""
    from quantize_tools.testbed.server import ServerProcess

    srv = ServerProcess(tmp_path, tmp_path / "log")
    srv.proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 300 & echo $! > child; wait"], cwd=tmp_path,
                                start_new_session=True)
    deadline = time.time() + 30
    while not (tmp_path / "child").is_file() or not (tmp_path / "child").read_text().strip():
        assert time.time() < deadline, "the stand-in server did not start its child"
        time.sleep(0.05)
    child = int((tmp_path / "child").read_text())
    t0 = time.time()
    srv.stop(timeout=1, grace=1)
    assert srv.proc.returncode is not None and time.time() - t0 < 20
    deadline = time.time() + 10
    while _alive(child) and time.time() < deadline:  # reparented: its reaper may take a moment
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
