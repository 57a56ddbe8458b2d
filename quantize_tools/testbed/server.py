"""A ``kbvq-serve`` subprocess that is healthy when entered and stopped when left.

The demo and the end-to-end tests both need vLLM's real OpenAI-compatible server on
loopback; starting it, waiting for ``/health`` and reporting a crash with the end of its
log is the same job in both, so it lives here once.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerError(RuntimeError):
    pass


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def require_free_port(host: str, port: int) -> None:
    if port_in_use(host, port):
        raise ServerError(f"port {port} on {host} is already in use (another server running?); "
                          "stop it or choose another port")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


class ServerProcess:
    """``with ServerProcess(ckpt, log, port=...) as base_url:`` runs ``kbvq-serve ckpt`` until the block ends."""

    def __init__(self, model: str | Path, log: str | Path, *, host: str = "127.0.0.1", port: int = 8000,
                 args: tuple[str, ...] = (), env: dict | None = None, startup_timeout: float = 600):
        self.model, self.log_path, self.host, self.port = str(model), Path(log), host, port
        self.args, self.env, self.startup_timeout = tuple(args), env or {}, startup_timeout
        self.url = f"http://{host}:{port}"
        self.proc: subprocess.Popen | None = None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> str:
        require_free_port(self.host, self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        # --shutdown-timeout: vLLM's default 0 kills its engine core at once on SIGTERM, before the engine
        # removes its shared-memory queues (Python's resource tracker then removes them, warning of "leaked
        # shared_memory objects"); with a timeout the engine shuts down its workers and queues itself
        cmd = [sys.executable, "-m", "vllm_kbvq.serve", self.model, "--host", self.host, "--port", str(self.port),
               "--shutdown-timeout", "10", *self.args]
        # its own process group: vLLM's engine core and workers are its children, and stop() must reach
        # them even if the server itself is gone
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                     start_new_session=True)
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"the server exited with status {self.proc.returncode} while starting; "
                                  f"end of {self.log_path}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the server was not healthy after {self.startup_timeout:.0f} s; "
                                  f"end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(2)

    def stop(self, timeout: float = 60, grace: float = 10) -> None:
        """SIGTERM to the server, which shuts its engine down (vLLM's own cleanup: its processes, shared
        memory); after ``timeout`` seconds, or once the server is gone, what is left of its process group
        gets SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(grace)
        self.proc.wait()

    def _kill_group(self, grace: float) -> None:
        """Children of the server still in its process group (an engine core it did not reap) get SIGTERM,
        then SIGKILL after ``grace`` seconds."""
        pgid = self.proc.pid  # start_new_session: the group is the server's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0)):
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                return  # nothing left in the group
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                try:
                    os.killpg(pgid, 0)
                except (ProcessLookupError, PermissionError):
                    return
                time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self.stop()
