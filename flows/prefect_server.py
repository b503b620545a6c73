"""The Prefect API of one `grpo run` / `grpo rescore`, when no server is configured.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server itself (a uvicorn child,
~200 MB) the first time the flow needs it, and stops it at exit. Two things go wrong with
that for a command-line tool: a SIGKILLed `grpo` (an OOM kill, `kill -9`, a cluster's
pre-emption) leaves that server running with nobody to stop it (11+ minutes were seen),
and its start-up (4-8 s on 2 cores) only begins once the flow is called, after torch and
transformers have been imported.

So the CLI starts the same server itself (the uvicorn command of Prefect's
`SubprocessASGIServer`, with the UI off), as its child, *before* importing anything heavy:

* the child asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so no
  server outlives the CLI, whatever killed it;
* it runs in a process group of its own, so the Ctrl-C that a terminal sends to the CLI's
  group does not reach it: the CLI stops it last, after the flow has recorded how it ended
  (a server killed with the flow left the run training on, each Prefect call retrying a
  dead API, and Ctrl-C had no other effect; flows/stopping.py);
* `watch` tells the CLI when the server dies under a running command, which then ends in
  one line instead of going on without its API;
* its start-up overlaps the CLI's own imports, and the CLI waits for ``/health`` only right
  before the flow starts;
* ``PREFECT_API_URL`` then points at it, so Prefect starts no server of its own;
* it is stopped at exit, after Prefect's own exit handlers have shipped their logs.

With ``PREFECT_API_URL`` set (a long-lived ``prefect server start``, or Prefect Cloud; in
the environment or the active profile), nothing is started: see the README, "Quiet and
offline". Where ``prctl`` does not exist (not Linux), where Prefect was imported already (it
has read its settings: the CLI called in-process, as tests do), or with
``GRPOFLOW_OWN_PREFECT_SERVER=0``, Prefect's own temporary server is used.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # prctl.h
STARTUP_TIMEOUT_S = 120.0  # a cold PREFECT_HOME on a loaded 2-core machine took ~40 s
PORT_IN_USE = 3  # uvicorn's exit status when its port was taken between our check and its bind


class PrefectServerError(RuntimeError):
    pass


def _libc_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int) -> None:
    """preexec_fn of the server: SIGTERM when the CLI dies (checked once more after the
    prctl, in case the CLI died between fork and prctl)."""
    _libc_prctl()(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect_app_dir() -> str:
    # Prefect's own server command passes the package's parent as --app-dir; find it without
    # importing prefect (that import is what the server's start-up should overlap).
    import importlib.util

    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise PrefectServerError("prefect is not installed")
    return str(Path(spec.origin).parent.parent)


class ServerChild:
    """A Prefect API server running as this process's child; `wait_ready()` before use."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.started = time.perf_counter()
        self.stopping = threading.Event()  # set by stop(): the server's exit is then ours, not a loss
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            _prefect_app_dir(),
            "--factory",
            "prefect.server.api.server:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "error",
            "--lifespan",
            "on",
        ]
        parent = os.getpid()
        # The server's own output goes to a file, not the user's console: stopped at the end of
        # a command (or on Ctrl-C) it may log its database pool's tracebacks, which are not grpo's.
        self.log_path = Path(tempfile.gettempdir()) / f"grpo-prefect-api-{parent}.log"
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # out of the terminal's Ctrl-C: the CLI decides when it stops
                preexec_fn=lambda: _die_with_parent(parent),
            )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Block until the API answers /health; return the seconds since the server was started."""
        deadline = self.started + timeout
        while time.perf_counter() < deadline:
            code = self.proc.poll()
            if code == PORT_IN_USE:
                self.port = _free_port()
                self.url = f"http://127.0.0.1:{self.port}/api"
                os.environ["PREFECT_API_URL"] = self.url
                self.proc = self._spawn()
            elif code is not None:
                raise PrefectServerError(
                    f"the Prefect API server exited with status {code} while starting (its output: "
                    f"{self.log_path}; try PREFECT_API_URL pointing at a running `prefect server start`)"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return time.perf_counter() - self.started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.05)
        self.stop()
        raise PrefectServerError(f"the Prefect API server did not answer within {timeout:.0f}s on {self.url}")

    def watch(self, on_lost: Callable[[int], None]) -> None:
        """Call `on_lost(exit status)` from a watcher thread if the server exits before `stop()`
        (call after `wait_ready`, which may replace the process)."""
        proc = self.proc

        def wait_for_exit() -> None:
            code = proc.wait()
            if not self.stopping.is_set():
                on_lost(code)

        threading.Thread(target=wait_for_exit, name="grpoflow-api-watch", daemon=True).start()

    def stop(self, wait_s: float = 5.0) -> None:
        self.stopping.set()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def profile_api_url() -> str | None:
    """PREFECT_API_URL of the active Prefect profile (profiles.toml), read without importing
    prefect: a user who set a server with `prefect config set` must get that server."""
    import tomllib

    home = Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "ephemeral")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def start_own_server() -> ServerChild | None:
    """Start the run's Prefect API as our child unless a server is configured (or it cannot
    be tied to our life); sets PREFECT_API_URL to it."""
    if (
        os.environ.get("PREFECT_API_URL")
        or os.environ.get("GRPOFLOW_OWN_PREFECT_SERVER", "1") == "0"
        or _libc_prctl() is None
    ):
        return None
    if profile_api_url():
        return None
    if "prefect" in sys.modules:  # Prefect has read its settings already: it would not use ours
        return None
    server = ServerChild()
    os.environ["PREFECT_API_URL"] = server.url
    # Stopped at exit, and only then: atexit runs the latest registration first, so Prefect's
    # own exit handlers (registered later, on import) still ship their last logs and events
    # to a live API. Stopping it when the flow returned left them retrying for ~70 s.
    atexit.register(server.stop)
    return server
