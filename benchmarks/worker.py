"""Long-lived benchmark worker processes, one per contender.

Each contender (ours, the peer, Adam, the bound) runs in its own Python process so that

* its peak resident memory is its own (read by the parent with ``wait4`` when it exits), and
* the parent can *interleave* contenders round by round on this noisy 2-core machine without
  paying a fresh ``import torch`` (and the peer's ``import pytorch_lightning``) every round.

Protocol: the parent writes one JSON object per line to the worker's stdin,
``{"module": "peer", "func": "step_times", "kwargs": {...}}``, and reads one JSON line back,
``{"ok": true, "result": ..., "rss_mb": ...}`` or ``{"ok": false, "error": "..."}``.
The worker's own stdout is redirected to stderr so that prints from libraries (progress bars,
Lightning banners) cannot corrupt the protocol.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT, child_env, configure_threads, peak_rss_mb, wait_with_rusage

MODULES = ("ours", "peer", "adam", "bound", "scipy_lm")


class WorkerError(RuntimeError):
    """A worker call raised, timed out, or the worker died."""


class Worker:
    """Parent-side handle of a worker process serving one adapter module."""

    def __init__(self, module: str, log_path: Path | None = None) -> None:
        if module not in MODULES:
            raise ValueError(f"Invalid worker module: {module!r} (expected one of {MODULES})")
        self.module = module
        self.peak_rss_mb: float | None = None
        self.last_rss_mb: float | None = None  # the worker's peak RSS after the last call
        self._log = open(log_path, "a") if log_path else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            cwd=REPO_ROOT, env=child_env(), text=True, bufsize=1,
        )

    def call(self, func: str, timeout: float = 600.0, **kwargs: Any) -> Any:
        """Run ``benchmarks.<module>.<func>(**kwargs)`` in the worker; return its result."""
        if self._proc.returncode is not None:
            raise WorkerError(f"{self.module} worker is not running")
        request = {"module": self.module, "func": func, "kwargs": kwargs}
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError as exc:
            raise WorkerError(f"{self.module} worker died") from exc
        reply = self._read_reply(timeout)
        self.last_rss_mb = reply.get("rss_mb")
        if not reply["ok"]:
            raise WorkerError(f"{self.module}.{func} failed:\n{reply['error']}")
        return reply["result"]

    def _read_reply(self, timeout: float) -> dict:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerError(f"{self.module} worker timed out after {timeout:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            self.close()
            raise WorkerError(f"{self.module} worker exited (code {self._proc.returncode})")
        return json.loads(line)

    def kill(self) -> None:
        if self._proc.returncode is None:
            self._proc.kill()
        self.close()

    def close(self) -> float | None:
        """Stop the worker and return its lifetime peak RSS in MB (``wait4``)."""
        if self._proc.returncode is None:
            try:
                self._proc.stdin.close()
            except BrokenPipeError:
                pass
            self.peak_rss_mb = wait_with_rusage(self._proc)
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.close()
        return self.peak_rss_mb

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- child side


def _serve(proto) -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["module"] not in MODULES:
                raise ValueError(f"unknown module {request['module']!r}")
            module = importlib.import_module(f"benchmarks.{request['module']}")
            start = time.perf_counter()
            result = getattr(module, request["func"])(**request["kwargs"])
            reply = {"ok": True, "result": result, "seconds": time.perf_counter() - start}
        except Exception:
            reply = {"ok": False, "error": traceback.format_exc()}
        reply["rss_mb"] = peak_rss_mb()
        proto.write(json.dumps(reply, default=_jsonable) + "\n")
        proto.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def limit_memory() -> None:
    """Cap the worker's address space (``BENCH_MEMORY_LIMIT_GB``, default 12).

    The machine is shared: a contender that tries to hold a 20 GB Jacobian should fail with a
    ``MemoryError`` in its own worker, not wake the kernel's OOM killer for everyone. Address
    space, not RSS, is what the kernel can cap; torch reserves about 1-2 GB of it up front.
    """
    gb = float(os.environ.get("BENCH_MEMORY_LIMIT_GB", "12"))
    if gb > 0:
        limit = int(gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    limit_memory()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by libraries goes to stderr, not into the protocol
    configure_threads()
    _serve(proto)


if __name__ == "__main__":
    main()
