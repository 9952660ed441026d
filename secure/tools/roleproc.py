"""A long-running role process (pi-dealer, pi-server) whose output goes to a log file and is scanned
line by line for markers such as "listening on": `make demo` and the netns testbed start roles so."""

from __future__ import annotations

import os
import queue
import subprocess
import threading
import time


class RoleProcess:
    def __init__(self, name: str, proc: subprocess.Popen, log_dir: str):
        """`proc` must have been started with stdout=PIPE, stderr=STDOUT, text=True."""
        self.name, self.proc = name, proc
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self.lines: queue.Queue[str] = queue.Queue()
        self._log = open(self.log_path, "w")
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self._log.write(line)
            self._log.flush()
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, marker: str, timeout: float) -> str | None:
        """The first new output line containing `marker`; None when the process exits first or
        `timeout` seconds pass (then `tail()` says why)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    return None
                continue
            if marker in line:
                return line
        return None

    def tail(self) -> str:
        """The last three lines of output, or the exit code when there was none."""
        time.sleep(0.2)  # let the pump catch up with a process that just died
        with open(self.log_path) as f:
            lines = [line.strip() for line in f if line.strip()]
        return " | ".join(lines[-3:]) or f"no output (exit code {self.proc.poll()})"

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
