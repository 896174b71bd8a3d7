"""A pipeline command running in the background, watched and stopped by a test."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil

from .tools import tool_env


class Runner:
    """`dvc repro ARGS` (or `command`) in its own process group, its merged output read line by
    line as it comes."""

    def __init__(
        self, repo: Path, *args: str, command: list[str] | None = None, **env: str
    ) -> None:
        self.process = subprocess.Popen(
            command or ["dvc", "repro", *args],
            cwd=repo,
            env=tool_env(**env),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """True once `text` appears in the output; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return True
            if self.process.poll() is not None:
                self.reader.join()
                return any(text in line for line in self.lines)
            time.sleep(0.02)
        raise AssertionError(f"no {text!r} within {timeout} s:\n{self.output}")

    def kill(self) -> bool:
        """SIGKILL to the whole group (dvc and the stage); False if it had already exited."""
        if self.process.poll() is not None:
            return False
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return True

    def kill_stage(self, stage: str) -> bool:
        """SIGKILL to the stage's process only, then wait for DVC to exit; False, after letting
        the run finish, if the stage had already exited.

        DVC writes dvc.lock and .dvc/tmp/rwlock in place, not atomically: a kill that lands on
        DVC itself while it records a stage or releases its lock can truncate either file. That
        is DVC's window, not a stage's, so these kills aim at the stage's own process and let
        DVC see the failure, release its lock and exit non-zero, as it does when a stage crashes.
        """
        try:
            workers = self.stage_processes(stage)
            for worker in workers:
                worker.kill()
        except psutil.NoSuchProcess:
            workers = []
        code = self.finish()
        if not workers:
            return False
        assert code != 0, f"dvc repro exited 0 after its stage was killed:\n{self.output}"
        return True

    def stage_processes(self, stage: str) -> list[psutil.Process]:
        """The processes running `python -m stages.STAGE` under this runner, outermost first.

        A stage's own short-lived children (a forked helper before it execs, a DataLoader
        worker) show their parent's command line too, so callers that want the stage itself
        take the first."""
        found: dict[int, tuple[psutil.Process, int]] = {}
        for child in psutil.Process(self.process.pid).children(recursive=True):
            try:
                if f"stages.{stage}" in " ".join(child.cmdline()):
                    found[child.pid] = (child, child.ppid())
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        return [
            process for process, parent in sorted(found.values(), key=lambda pair: pair[1] in found)
        ]

    def stage_process(self, stage: str) -> psutil.Process:
        """The outermost process running `python -m stages.STAGE`; fails if there is none."""
        found = self.stage_processes(stage)
        assert found, f"no stages.{stage} process under dvc:\n{self.output}"
        return found[0]

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join()
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)
