"""The table ``make bench`` prints and bench/RESULTS.md: one row per figure and stack, with its target."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("starlette", "uvicorn", "anyio", "httptools", "uvloop", "fastapi", "aiosqlite", "redis", "httpx")


@dataclass
class Row:
    figure: str
    stack: str
    result: str
    target: str
    met: bool | None  # None: no target, or nothing measured

    def cells(self) -> tuple[str, ...]:
        met = "—" if self.met is None else ("yes" if self.met else "**no**")
        return self.figure, self.stack, self.result, self.target or "—", met


def table(rows: list[Row]) -> str:
    header = ("figure", "stack", "result", "target", "met?")
    lines = [header, ("---",) * len(header), *(row.cells() for row in rows)]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} missing")
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("[")[0].strip()
    redis = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split(" sha")[0]
    system = f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"
    return f"{system}; {', '.join(versions)}; {wrk}; {redis.strip()}"


def write(stamp: str, command: str, minutes: float, rows_table: str, details: dict[str, list[str]]) -> None:
    sections = "".join(f"\n## Details: {name}\n\n```\n{chr(10).join(lines)}\n```\n" for name, lines in details.items())
    (ROOT / "bench" / "RESULTS.md").write_text(
        f"# Benchmark results\n\n{stamp}, `{command}`, {minutes:.1f} minutes\n\nMachine: {machine()}\n\n"
        f"{rows_table}\n{sections}"
    )
