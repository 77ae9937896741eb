"""Fixtures for the Python fal-client compatibility suite.

One Darkroom server (``darkroom serve --tls``) is started per test session on a
temporary data directory, bound to 127.0.0.1 on an ephemeral port.  The
official ``fal-client`` package is pointed at it purely through environment
variables (recipe P1 of fal-protocol.md section 7.1):

    FAL_KEY, FAL_RUN_HOST=127.0.0.1:PORT/run, FAL_QUEUE_RUN_HOST=127.0.0.1:PORT/queue,
    SSL_CERT_FILE=<darkroom CA bundle>

``fal_client`` reads the host variables once, at import time, so it must not be
imported before the ``darkroom`` fixture has set them.  Tests obtain the module
through the ``fal`` fixture, never through a top-level import.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_BIN = REPO_ROOT / "target" / "debug" / "darkroom"

STARTUP_TIMEOUT_S = 30.0
ENV_TIMEOUT_S = 30.0
# Backstop for every test: no single compat test may take longer than this.
DEFAULT_TEST_DEADLINE_S = 60.0

# Variables that would otherwise change where or how fal-client connects.
_SCRUB_ENV = (
    "FAL_KEY_ID",
    "FAL_KEY_SECRET",
    "FAL_FORCE_AUTH_BY_USER",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "deadline(seconds): per-test wall-clock limit (default 60 s)"
    )


@dataclasses.dataclass
class Darkroom:
    bin: Path
    data_dir: Path
    url: str  # e.g. https://127.0.0.1:PORT
    listen: str  # e.g. 127.0.0.1:PORT
    ca_cert: str | None
    ca_bundle: str | None
    server_json: dict[str, Any]
    env: dict[str, str]  # parsed from `darkroom env`
    admin_key: str | None
    log_path: Path
    proc: subprocess.Popen

    @property
    def fal_key(self) -> str:
        return self.env["FAL_KEY"]

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "<no server log>"
        return "\n".join(lines[-n:])


_CURRENT: Darkroom | None = None


def parse_env_output(text: str) -> dict[str, str]:
    """Parse `darkroom env` output: lines `export NAME='value'`; `#` lines are comments."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        # shlex handles 'single quoted' values, including the '\'' idiom.
        parts = shlex.split(line, comments=False, posix=True)
        if len(parts) != 1 or "=" not in parts[0]:
            raise ValueError(f"unexpected line in `darkroom env` output: {raw!r}")
        name, value = parts[0].split("=", 1)
        out[name] = value
    return out


def _darkroom_bin() -> Path:
    return Path(os.environ.get("DARKROOM_BIN", str(DEFAULT_BIN)))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def darkroom(tmp_path_factory: pytest.TempPathFactory) -> Darkroom:
    if "fal_client" in sys.modules:
        pytest.fail(
            "fal_client was imported before the darkroom fixture set FAL_RUN_HOST/"
            "FAL_QUEUE_RUN_HOST; it would talk to the real fal.run. Import it via the "
            "`fal` fixture only."
        )

    binary = _darkroom_bin()
    if not binary.exists():
        pytest.fail(f"darkroom binary not found at {binary} (set DARKROOM_BIN)")

    base = tmp_path_factory.mktemp("darkroom")
    data_dir = base / "data"
    data_dir.mkdir()
    log_path = base / "server.log"
    log = open(log_path, "wb")

    proc = subprocess.Popen(
        [
            str(binary),
            "serve",
            "--data-dir",
            str(data_dir),
            "--listen",
            "127.0.0.1:0",
            "--tls",
            # Webhook tests deliver to receivers on 127.0.0.1, with a fast retry schedule.
            "--webhook-allow",
            "127.0.0.1/32",
            "--webhook-schedule",
            "0,150ms,150ms,150ms,150ms",
            "--webhook-timeout-ms",
            "2000",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()

    def fail(msg: str) -> None:
        _stop(proc)
        try:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        except OSError:
            tail = "<no server log>"
        pytest.fail(f"{msg}\n--- darkroom serve log (tail) ---\n{tail}")

    server_json_path = data_dir / "server.json"
    server: dict[str, Any] | None = None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"darkroom serve exited early with code {proc.returncode}")
        if server_json_path.exists():
            try:
                server = json.loads(server_json_path.read_text())
                break
            except (json.JSONDecodeError, OSError):
                pass  # still being written
        time.sleep(0.05)
    if server is None:
        fail(f"{server_json_path} did not appear within {STARTUP_TIMEOUT_S:.0f}s")
    assert server is not None

    try:
        env_proc = subprocess.run(
            [str(binary), "env", "--data-dir", str(data_dir)],
            capture_output=True,
            text=True,
            timeout=ENV_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        fail("`darkroom env` timed out")
        raise
    if env_proc.returncode != 0:
        fail(
            f"`darkroom env` failed with code {env_proc.returncode}:\n"
            f"{env_proc.stdout}\n{env_proc.stderr}"
        )
    try:
        env = parse_env_output(env_proc.stdout)
    except ValueError as exc:
        fail(str(exc))
        raise

    for name in ("FAL_KEY", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"):
        if not env.get(name):
            fail(f"`darkroom env` did not print {name}; got:\n{env_proc.stdout}")

    admin_key = None
    admin_path = data_dir / "local-admin.key"
    if admin_path.exists():
        admin_key = admin_path.read_text().strip()

    # Point fal-client at the server (recipe P1). Must happen before import.
    for name in _SCRUB_ENV:
        os.environ.pop(name, None)
    os.environ["FAL_HOME_DIR"] = str(base / "fal-home")  # never read ~/.fal
    no_proxy = [p for p in os.environ.get("NO_PROXY", "").split(",") if p]
    os.environ["NO_PROXY"] = ",".join(no_proxy + ["127.0.0.1", "localhost"])
    for name in ("FAL_KEY", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"):
        os.environ[name] = env[name]

    dr = Darkroom(
        bin=binary,
        data_dir=data_dir,
        url=str(server.get("url", "")).rstrip("/"),
        listen=str(server.get("listen", "")),
        ca_cert=server.get("ca_cert"),
        ca_bundle=server.get("ca_bundle"),
        server_json=server,
        env=env,
        admin_key=admin_key,
        log_path=log_path,
        proc=proc,
    )
    global _CURRENT
    _CURRENT = dr
    try:
        yield dr
    finally:
        _CURRENT = None
        _stop(proc)


@pytest.fixture(scope="session")
def fal(darkroom: Darkroom):
    """The official fal_client module, imported after the environment is set."""
    mod = importlib.import_module("fal_client")
    from fal_client import auth as fal_auth  # noqa: E402  (post-env import)

    # Guard: make sure the module really picked up our hosts.
    assert fal_auth.FAL_RUN_HOST == darkroom.env["FAL_RUN_HOST"], fal_auth.FAL_RUN_HOST
    assert fal_auth.FAL_QUEUE_RUN_HOST == darkroom.env["FAL_QUEUE_RUN_HOST"]
    return mod


class DeadlineExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest):
    """Bound every test's wall-clock time with SIGALRM (main thread, Unix)."""
    marker = request.node.get_closest_marker("deadline")
    limit = float(marker.args[0]) if marker else DEFAULT_TEST_DEADLINE_S

    def on_alarm(signum, frame):  # noqa: ARG001
        raise DeadlineExceeded(f"test exceeded its {limit:.0f}s deadline")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):  # noqa: ARG001
    """On failure, attach the tail of the server log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and _CURRENT is not None:
        report.sections.append(("darkroom serve log (tail)", _CURRENT.log_tail()))
