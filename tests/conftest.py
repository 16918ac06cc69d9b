from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import httpx
import pytest
import uvicorn
from anyio.abc import ByteReceiveStream
from anyio.streams.text import TextReceiveStream
from starlette.types import ASGIApp

from parley.agents import AgentError, Turn
from parley.app import create_app
from parley.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    """A loopback port free right now. Only for a port nothing should answer on, or for a server that is then
    checked to be ours (:func:`listens`): until it binds, another process (other suites, other servers) may."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on loopback ``port`` (Linux /proc): a server that answers on the
    port it was given may be another's, if it took the port between our pick and our server's bind."""
    sockets = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # 127.0.0.1:port, LISTEN
            sockets.add(f"socket:[{fields[9]}]")
    try:
        return any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return False  # it has exited


@dataclass
class LiveServer:
    url: str
    app: Any

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 10)
        return httpx.AsyncClient(base_url=self.url, **kwargs)


class _ThreadedServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test runner owns the signals
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[ASGIApp], LiveServer]]:
    """Run ASGI apps on real uvicorn servers on free loopback ports, each in its own thread."""
    running: list[tuple[_ThreadedServer, threading.Thread]] = []

    def start(app: ASGIApp) -> LiveServer:
        # Bound here and handed over, so that the port cannot be taken by another process before uvicorn has it.
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (a bare socket() says
        # 0), and without it Nagle held each response's second write until the client's delayed ACK: ~40 ms a
        # request, as a server that uvicorn binds itself never waits.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
        # The pure-Python stack, named: these servers share the test process (and its GIL) with the clients, and
        # under the C stack (httptools, uvloop) tests/test_stress.py's cancels all came too late in 6 of 10 runs on
        # a loaded machine (0 of 5 with h11 and asyncio). The C stack, the default, is what the `uvicorn app:app`
        # subprocesses run (tests/test_restart.py, tests/test_redis.py, tests/test_stacks.py).
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", lifespan="auto", http="h11", loop="asyncio"
        )
        server = _ThreadedServer(config)
        thread = threading.Thread(target=server.run, args=([sock],), daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        running.append((server, thread))
        return LiveServer(f"http://127.0.0.1:{port}", app)

    yield start
    for server, _ in running:
        server.should_exit = True
    for _, thread in running:
        thread.join(10)


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), **overrides)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def live(serve: Callable[[ASGIApp], LiveServer], tmp_path: Path) -> Callable[..., LiveServer]:
    """A parley on a real server: ``live(echo_delay=0.05)``."""

    def start(**overrides: Any) -> LiveServer:
        return serve(create_app(make_settings(tmp_path, **overrides)))

    return start


class Subprocess:
    """``uvicorn app:app`` as a separate process, for restarts and crashes (or ``hypercorn app:app``, with
    ``hypercorn=True``: ``args`` then picks its worker class)."""

    def __init__(
        self,
        env: dict[str, str],
        args: tuple[str, ...] = (),
        log: Path | None = None,
        hypercorn: bool = False,
        app: str = "app:app",
    ) -> None:
        self.args = args
        self.hypercorn = hypercorn
        self.app = app  # what the server serves: tests.acting:app for a host's own agent
        self.log = log  # where its stdout and stderr go (none kept without it)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._stopped_said = b""

    @property
    def server(self) -> str:
        return "hypercorn" if self.hypercorn else "uvicorn"

    def start(self) -> Subprocess:
        return self.launch().wait_ready()

    def launch(self) -> Subprocess:
        """Start the process without waiting for it: see :func:`start_together`."""
        log = self.log.open("ab") if self.log is not None else None
        # Without a log, stderr is kept anyway, for what a process that did not start said.
        self._keep_stderr()  # (a restart's)
        self._stderr = tempfile.TemporaryFile() if log is None else None
        if self.hypercorn:
            command = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{self.port}", *self.args, self.app]
        else:
            command = [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port)]
            command += self.args
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=self.env,
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log else self._stderr,
            start_new_session=True,  # its own process group: see stop()
        )
        if log is not None:
            log.close()  # the child has its own copy
        return self

    def wait_ready(self) -> Subprocess:
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                # Ours, not another process's that took the port before our uvicorn could bind it.
                if listens(self.process.pid, self.port):
                    if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                        return self
                else:
                    time.sleep(0.05)
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        status = self.process.poll()
        raise RuntimeError(
            f"{self.server} app:app did not start on port {self.port} (exit status {status}): {self._said()}"
        )

    def _said(self) -> str:
        """The end of what the stopped process wrote to stderr (or to its log)."""
        if self.log is None:
            said = self._stopped_said
        elif self.log.exists():
            said = self.log.read_bytes()
        else:
            return ""
        return said[-2000:].decode(errors="replace")

    def stop(self, kill: bool = False) -> None:
        if self.process and self.process.poll() is None:
            if kill:
                # The whole group: under --workers, a SIGKILLed uvicorn cannot stop its worker processes, which
                # would be left running (and serving) after the test.
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.terminate()
            self.process.wait(10)
        self._keep_stderr()

    def _keep_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.seek(max(0, self._stderr.seek(0, os.SEEK_END) - 2000))
            self._stopped_said = self._stderr.read()
            self._stderr.close()
            self._stderr = None


def start_together(*procs: Subprocess) -> tuple[Subprocess, ...]:
    """Start several servers at once: each takes a second or so to import the app, and the machine has more
    than one core. (Not for servers whose start-up order matters.)"""
    for proc in procs:
        proc.launch()
    return tuple(proc.wait_ready() for proc in procs)


@pytest.fixture
def subprocesses() -> Iterator[Callable[..., Subprocess]]:
    started: list[Subprocess] = []

    def make(
        env: dict[str, str],
        args: tuple[str, ...] = (),
        log: Path | None = None,
        hypercorn: bool = False,
        app: str = "app:app",
    ) -> Subprocess:
        proc = Subprocess(env, args, log, hypercorn, app)
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop(kill=True)


async def new_session(client: httpx.AsyncClient, **fields: str) -> str:
    response = await client.post("/api/v1/sessions", json=fields)
    assert response.status_code == 201, response.text
    return str(response.json()["ui_session_id"])


async def messages(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/api/v1/sessions/{session_id}/messages")
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


async def eventually(predicate: Callable[[], Awaitable[bool]], within: float = 5.0) -> None:
    """Wait until ``predicate()`` holds. The servers run in other threads or processes, so tests poll."""
    with anyio.fail_after(within):
        while not await predicate():
            await anyio.sleep(0.02)


class RedisServer:
    """A real ``redis-server`` of the test's own, on a free loopback port, that can be stopped and restarted."""

    cluster = False

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            # Append-only with fsync: data written before a stop is there after the restart.
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                # Ours, not another process's that took the port before our redis-server could bind it.
                if not listens(self.process.pid, self.port):
                    time.sleep(0.05)
                    continue
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port} (exit status {self.process.poll()})")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


def _redis_unavailable(reason: str) -> None:
    if os.environ.get("PARLEY_REQUIRE_REDIS") == "1":
        pytest.fail(f"PARLEY_REQUIRE_REDIS=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for this test alone (tests that stop and restart Redis need their own)."""
    if shutil.which("redis-server") is None:
        _redis_unavailable("redis-server is not on PATH (apt-get install redis-server)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shared_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One redis-server for the whole run (or PARLEY_TEST_REDIS_URL); tests keep apart by key prefix."""
    if shutil.which("redis-server") is not None:
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        yield server.url
        server.stop()
    elif os.environ.get("PARLEY_TEST_REDIS_URL"):
        yield os.environ["PARLEY_TEST_REDIS_URL"]
    else:
        _redis_unavailable("no redis-server on PATH and no PARLEY_TEST_REDIS_URL")


def postgres_bin() -> Path | None:
    """Debian's PostgreSQL binaries (the newest installed), or those of ``pg_config --bindir``."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    if found:
        return found[-1].parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(subprocess.run([pg_config, "--bindir"], capture_output=True, text=True).stdout.strip())
        if (bindir / "initdb").exists():
            return bindir
    return None


class PostgresServer:
    """A throwaway PostgreSQL cluster of the test run's own: ``initdb`` in a temporary directory, on a free
    loopback port, ``fsync=off``; run as the ``postgres`` user when the tests run as root (initdb refuses root).
    It can be stopped (``immediate``: as a crash would) and started again on the same port."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        # Not under pytest's temporary directory: the postgres user must be able to reach it.
        self.directory = Path(tempfile.mkdtemp(prefix="parley-pg-"))
        self.data = self.directory / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            shutil.chown(self.directory, "postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, cwd=self.directory)

    def init(self) -> PostgresServer:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")  # fmt: skip
        return self

    def start(self) -> PostgresServer:
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c full_page_writes=off -c max_connections=200"
        )
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "log"), "-w",
                  "-o", options, "start")  # fmt: skip
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def url_of(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"test_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")  # (a name made above)
        return self.url_of(name)


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get("PARLEY_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PARLEY_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


def _new_postgres() -> PostgresServer:
    bindir = postgres_bin()
    if bindir is None:
        _postgres_unavailable("PostgreSQL is not installed (apt-get install postgresql; make test does it)")
    assert bindir is not None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_unavailable("psycopg is not installed (pip install -e '.[postgres]'; make install does it)")
    server = PostgresServer(bindir)
    try:
        return server.init().start()
    except subprocess.CalledProcessError as exc:
        server.remove()
        _postgres_unavailable(f"could not start PostgreSQL: {exc.stderr.decode(errors='replace').strip()}")
        raise


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run (per xdist worker); tests keep apart by database."""
    server = _new_postgres()
    yield server
    server.remove()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A database of this test's own, empty, on the run's PostgreSQL."""
    return postgres_server.create_database()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for this test alone, for tests that stop and restart it."""
    server = _new_postgres()
    yield server
    server.remove()


class RedisClusterServers:
    """A Redis Cluster of the test run's own: three ``redis-server --cluster-enabled yes`` on free loopback ports,
    joined by ``redis-cli --cluster create`` (no replicas). ``url`` names one node, as PARLEY_REDIS_URL does with
    PARLEY_REDIS_CLUSTER=1."""

    cluster = True

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.nodes: list[tuple[int, subprocess.Popen[bytes]]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0][0]}"

    def start(self) -> RedisClusterServers:
        for index in range(3):
            directory = self.directory / f"node{index}"
            directory.mkdir(parents=True, exist_ok=True)
            # (The cluster bus port, by default the port + 10000, is a free port of its own too.)
            port, bus = free_port(), free_port()
            process = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(bus), "--cluster-config-file", "nodes.conf", "--save", "", "--appendonly", "no",
                 "--dir", str(directory)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self.nodes.append((port, process))
        for port, process in self.nodes:
            if not self._answers(port, process, b"PING", b"+PONG"):
                self.stop()
                raise RuntimeError(f"a cluster node did not start on port {port} (exit status {process.poll()})")
        addresses = [f"127.0.0.1:{port}" for port, _ in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=60,
        )
        for port, process in self.nodes:  # every node agrees that every slot is served
            if not self._answers(port, process, b"CLUSTER INFO", b"cluster_state:ok", within=30):
                self.stop()
                raise RuntimeError(f"the cluster did not come up (node on port {port})")
        return self

    @staticmethod
    def _answers(
        port: int, process: subprocess.Popen[bytes], command: bytes, answer: bytes, within: float = 10
    ) -> bool:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and process.poll() is None:
            try:
                # Ours, not another process's that took the port before our redis-server could bind it.
                if listens(process.pid, port):
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                        sock.sendall(command + b"\r\n")
                        if answer in sock.recv(4096):
                            return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        for _, process in self.nodes:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """One 3-node Redis Cluster for the whole run; tests keep apart by session ids (or a key prefix)."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _redis_unavailable("redis-server or redis-cli is not on PATH (apt-get install redis-server)")
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.stop()


CHROMIUM = os.environ.get("PARLEY_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium through Playwright, one per test module; skipped without it, unless
    PARLEY_REQUIRE_BROWSER=1 (as .ci/run sets), which makes that a failure."""
    from playwright.sync_api import sync_playwright

    if shutil.which(CHROMIUM) is None:
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium, or set PARLEY_CHROMIUM)"
        if os.environ.get("PARLEY_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PARLEY_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


AI_SDK = ROOT / "tests" / "ai-sdk"


@dataclass
class AISDK:
    """``tests/ai-sdk/driver.mjs``: Vercel's AI SDK (``AbstractChat`` over ``DefaultChatTransport``) run by Node.
    ``package`` is the npm name it is installed under: ``ai`` (the AI SDK 7) or ``ai6`` (6, an alias)."""

    node: str
    package: str = "ai"

    async def run(
        self,
        action: str,
        url: str,
        session_id: str,
        *args: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
        within: float = 60,
    ) -> dict[str, Any]:
        """Run one action (send, resume) against the parley at ``url`` to its end; return the JSON result the
        driver prints. ``progress`` sees the chat's status and the assistant's text at each change, as it happens."""
        command = [self.node, str(AI_SDK / "driver.mjs"), action, "--base", url, "--session", session_id, *args]
        if progress is not None:
            command.append("--progress")
        stderr: list[str] = []
        stdout = b""

        async def read_stderr(stream: ByteReceiveStream) -> None:
            pending = ""
            async for text in TextReceiveStream(stream):
                *lines, pending = (pending + text).split("\n")
                for line in lines:
                    if progress is not None and line.startswith('{"progress"'):
                        progress(json.loads(line)["progress"])
                    else:
                        stderr.append(line)
            stderr.append(pending)

        with anyio.fail_after(within):
            env = {**os.environ, "PARLEY_AI_SDK": self.package}
            async with await anyio.open_process(command, env=env) as process, anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                tg.start_soon(read_stderr, process.stderr)
                async for chunk in process.stdout:
                    stdout += chunk
                await process.wait()
        assert process.returncode == 0, "\n".join(stderr)
        result = dict(json.loads(stdout.decode().splitlines()[-1]))
        # The chat reports failures in its status and error; a throw or a hang is the driver's own failure.
        assert "thrown" not in result and not result["timedOut"], result
        return result


@pytest.fixture(params=["ai", "ai6"])
def ai_sdk(request: pytest.FixtureRequest) -> AISDK:
    """The AI SDK as a client, each test once with the AI SDK 7 and once with 6 (both are what people install);
    skipped without Node or ``npm ci`` (``make test`` runs it), unless PARLEY_REQUIRE_NODE=1 (as .ci/run sets),
    which makes that a failure."""
    node = shutil.which("node")
    package: str = request.param
    if node is None:
        reason = "node is not on PATH (apt-get install npm)"
    elif not (AI_SDK / "node_modules" / package / "package.json").exists():
        reason = f"the {package} package is not installed (cd {AI_SDK.relative_to(ROOT)} && npm ci; make test does it)"
    else:
        return AISDK(node, package)
    if os.environ.get("PARLEY_REQUIRE_NODE") == "1":
        pytest.fail(f"PARLEY_REQUIRE_NODE=1 but {reason}")
    pytest.skip(reason)


class FailingAgent:
    """An agent that says ``after`` tokens, then fails as a model server can."""

    name = "failing"
    description = "test agent"
    history_limit = 0

    def __init__(self, after: int) -> None:
        self.after = after

    async def reply(self, turn: Turn) -> AsyncGenerator[str, None]:
        for i in range(self.after):
            await anyio.lowlevel.checkpoint()
            yield f"t{i} "
        raise AgentError("The model fell over.")


def pair(
    subprocesses: Callable[[dict[str, str]], Subprocess],
    tmp_path: Path,
    redis: RedisServer | RedisClusterServers | None,
    **env: str,
) -> tuple[Subprocess, Subprocess]:
    """Two `uvicorn app:app` workers, started together, sharing ``redis`` (each with its own data directory for
    files) or, without it, one SQLite file; a slow echo and a 1 s lease unless ``env`` says otherwise."""
    common = {"PARLEY_ECHO_DELAY": "0.05", "PARLEY_REDIS_LEASE_SECONDS": "1", **env}
    if redis is not None:
        common["PARLEY_REDIS_URL"] = redis.url
        if redis.cluster:
            common["PARLEY_REDIS_CLUSTER"] = "1"
    else:
        common["PARLEY_DATA_DIR"] = str(tmp_path / "shared")
    a, b = start_together(
        subprocesses({**common, "PARLEY_DATA_DIR": common.get("PARLEY_DATA_DIR", str(tmp_path / "a"))}),
        subprocesses({**common, "PARLEY_DATA_DIR": common.get("PARLEY_DATA_DIR", str(tmp_path / "b"))}),
    )
    return a, b
