"""Parley as a platform team deploys it: built into a wheel and installed, not run from a checkout.

The build is offline (no index, no build isolation: the dev extra brings setuptools) and takes about a second.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from parley import page

ROOT = Path(__file__).resolve().parent.parent
PAGE_FILES = ("index.html", "app.js", "style.css")

# Run by the installed parley, with only the install directory ahead of the venv's site-packages: it reports
# where its modules came from and what the page's three URLs answer.
SERVE_THE_PAGE = """
import json, sys
from starlette.testclient import TestClient
import parley
from parley import page
from parley.settings import Settings

with TestClient(parley.create_app(Settings(data_dir=sys.argv[1])), raise_server_exceptions=False) as client:
    responses = {
        path: {"status": r.status_code, "csp": r.headers.get("content-security-policy"), "body": r.text}
        for path in ("/", "/ui/app.js", "/ui/style.css")
        for r in [client.get(path)]
    }
print(json.dumps({"app": parley.__file__, "page": page.__file__, "responses": responses}))
"""


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """parley's wheel, built from a copy of the checkout so that the build leaves nothing behind in it."""
    source = tmp_path_factory.mktemp("source") / "parley"
    skip = (".git", ".venv", "build", "*.egg-info", "data", "node_modules", "__pycache__", ".*_cache", ".bench")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skip))
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "--quiet", "--wheel-dir", str(out))
    (built,) = out.glob("parley-*.whl")
    return built


def test_the_wheel_carries_the_page_where_the_code_looks_for_it(wheel: Path) -> None:
    # Where the page's files are relative to the import root is where they must be in the wheel.
    where = "parley/" + page.UI_DIR.relative_to(ROOT).as_posix()
    assert {f"{where}/{name}" for name in PAGE_FILES} <= set(zipfile.ZipFile(wheel).namelist())


def test_an_installed_wheel_serves_the_page(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    _pip("install", str(wheel), "--no-deps", "--no-index", "--quiet", "--target", str(site))
    # -P and PYTHONPATH: the install directory comes before the checkout's editable install, and the checkout
    # itself is not on the path (the run starts in tmp_path).
    done = subprocess.run(
        [sys.executable, "-P", "-c", SERVE_THE_PAGE, str(tmp_path / "data")],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert Path(report["app"]).is_relative_to(site) and Path(report["page"]).is_relative_to(site)
    for path, name in zip(("/", "/ui/app.js", "/ui/style.css"), PAGE_FILES, strict=True):
        response = report["responses"][path]
        assert response["status"] == 200, path
        assert response["csp"] == page.CONTENT_SECURITY_POLICY
        assert response["body"] == (page.UI_DIR / name).read_text()


def test_the_wheel_puts_one_name_into_site_packages(wheel: Path) -> None:
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top if not name.endswith(".dist-info")} == {"parley"}
    assert "app.py" not in top  # the `uvicorn app:app` entry stays in the checkout


# Run with only the install directory ahead of the venv's site-packages: OpenAI's Agents SDK owns `agents`,
# parley owns `parley`, and each imports as itself.
BESIDE_OPENAI_AGENTS = """
import json, sys
import agents
from parley import create_app
from parley.agents import EchoAgent
print(json.dumps({"agents": agents.__file__, "has_runner": hasattr(agents, "Runner"), "parley_echo": EchoAgent.name}))
"""


def test_an_installed_wheel_lives_beside_openai_agents(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    # OpenAI's Agents SDK and what it needs, from the package index (about 30 s), then parley's wheel beside it.
    _pip("install", "openai-agents", "--quiet", "--target", str(site))
    _pip("install", str(wheel), "--no-deps", "--no-index", "--quiet", "--target", str(site))
    done = subprocess.run(
        [sys.executable, "-P", "-c", BESIDE_OPENAI_AGENTS],
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert Path(report["agents"]).is_relative_to(site / "agents")
    assert report["has_runner"] and report["parley_echo"] == "echo"
