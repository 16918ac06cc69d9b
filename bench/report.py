"""The table ``make bench`` prints and bench/RESULTS.md: one row per figure and stack, with its target and whether
it is met; a section for what moved each figure since the last round (written by hand after the run); the details
of every figure and how long each took."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("starlette", "uvicorn", "anyio", "httptools", "uvloop", "fastapi", "aiosqlite", "redis", "httpx", "psycopg",
            "mcp")  # fmt: skip
MOVED = """## What moved each figure since the last round

_To be written by hand after the run: for each figure whose result changed since the last round (or that is new),
what moved it and the commit or issue that did._
"""


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


def last_round(path: Path = ROOT / "bench" / "RESULTS.md") -> dict[tuple[str, str], str]:
    """The results bench/RESULTS.md holds now (the last round's), by figure and stack."""
    found: dict[tuple[str, str], str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
            if line.startswith("| ") and len(cells) >= 5 and cells[0] not in ("figure", "---"):
                found[cells[0], cells[1]] = cells[2]
    return found


def table(rows: list[Row], before: dict[tuple[str, str], str] | None = None) -> str:
    """The table of ``rows``; with ``before`` (see :func:`last_round`), a column of the last round's results."""
    header = ("figure", "stack", "result", "target", "met?")
    lines = [header, *(row.cells() for row in rows)]
    if before is not None:
        lines = [(*lines[0], "last round"), *((*cells, before.get((cells[0], cells[1]), "—")) for cells in lines[1:])]
    lines.insert(1, ("---",) * len(lines[0]))
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
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda path: int(path.parts[-3]))
    postgres = "no PostgreSQL"
    if initdb:
        postgres = subprocess.run([initdb[-1], "--version"], capture_output=True, text=True).stdout.strip()
    system = f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python {platform.python_version()}"
    return f"{system}; {', '.join(versions)}; {wrk}; {redis.strip()}; {postgres}"


def write(stamp: str, command: str, minutes: float, rows_table: str, details: dict[str, list[str]]) -> None:
    sections = "".join(f"\n## Details: {name}\n\n```\n{chr(10).join(lines)}\n```\n" for name, lines in details.items())
    (ROOT / "bench" / "RESULTS.md").write_text(
        f"# Benchmark results\n\n{stamp}, `{command}`, {minutes:.1f} minutes\n\nMachine: {machine()}\n\n"
        f"{rows_table}\n\n{MOVED}{sections}"
    )
