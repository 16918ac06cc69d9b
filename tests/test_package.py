"""parley as a library: importing it, and making an app with it, change nothing in the host's process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Run in a fresh interpreter whose environment is full of PARLEY_* values that would stop `uvicorn app:app`.
# It takes a picture of everything a library must leave alone, imports every module of parley, takes it again,
# then makes an app (without starting it) and takes it once more.
PROBE = r"""
import gc, importlib, json, logging, os, pkgutil, sys, tempfile, threading
from pathlib import Path

import prometheus_client
from prometheus_client import REGISTRY, values


def picture():
    loggers = {}
    for name in ("", "parley", "uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        loggers[name] = [
            logger.level, logger.propagate, [type(h).__name__ for h in logger.handlers],
            [type(f).__name__ for f in logger.filters],
            [[type(f).__name__ for f in h.filters] + [type(h.formatter).__name__] for h in logger.handlers],
        ]
    return {
        "environ": dict(os.environ),
        "loggers": loggers,
        "value_class": values.ValueClass.__name__,
        "collectors": sorted(map(str, REGISTRY._names_to_collectors)),
        "gc": [gc.get_threshold(), gc.isenabled(), gc.get_freeze_count()],
        "threads": threading.active_count(),
        "cwd": sorted(os.listdir(".")),  # (tmp is made before the first picture)
        "tmp": sorted(p.name for p in Path(tempfile.gettempdir()).glob("parley-metrics-*")),
    }


before = picture()
import parley

modules = sorted(
    info.name for info in pkgutil.walk_packages(parley.__path__, "parley.")
    if not info.name.endswith("__main__")
)
for name in modules:
    importlib.import_module(name)
imported = picture()

from parley import Settings, create_app

create_app(Settings(data_dir=sys.argv[1]))
create_app(Settings(data_dir=sys.argv[1]))  # twice: two apps in one process do not collide
made = picture()
print(json.dumps({"modules": modules, "before": before, "imported": imported, "made": made}))
"""

HOSTILE = {
    "PARLEY_MAX_STREAMS_PER_OWNER": "abc",
    "PARLEY_METRICS": "maybe",
    "PARLEY_API_KEYS": ",,",
    "PARLEY_API_KEYS_FILE": "/nonexistent/keys",
    "PARLEY_REDIS_URL": "not a url",
    "PARLEY_DATA_DIR": "/proc/nonexistent",
    "PARLEY_LOG_FORMAT": "json",
    "PARLEY_CHECKPOINT_SECONDS": "-1",
}


def test_importing_parley_and_making_an_app_change_nothing(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PARLEY_", "PROMETHEUS_"))}
    # A temporary directory of its own: other tests' servers (uvicorn --workers) make metrics directories in the
    # shared one while this runs.
    (tmp_path / "tmp").mkdir()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "data")],
        cwd=tmp_path,
        env={**env, **HOSTILE, "TMPDIR": str(tmp_path / "tmp")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr  # no SystemExit, no error: nothing was read from the environment
    report = json.loads(done.stdout.splitlines()[-1])
    assert {"parley.app", "parley.metrics", "parley.logs", "parley.sessions.redis", "parley.agents.openai"} <= set(
        report["modules"]
    )
    assert report["imported"] == report["before"]
    assert report["made"] == report["before"]
    assert "parley" not in done.stderr.lower()  # and nothing was said
