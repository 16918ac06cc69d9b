"""The benchmark harness's own logic, in a second and without a server: figure 2's search, the run's time budget,
the report's table, the floor's collector settings and the bench agent's events. (``python -m bench.run --quick``
runs every figure end to end, in minutes: not part of ``make test``.)"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

import anyio

from bench import floor, report, run, streams
from bench.acting import ActingAgent
from bench.report import Row
from parley.agents import Turn
from parley.agents.events import Reasoning, ToolCall, ToolInputDelta, ToolInputStart, ToolResult
from parley.gc_tuning import YOUNG_THRESHOLD


def search(limit: int, levels: streams.Levels) -> tuple[int | None, int]:
    """Figure 2's search against a server that holds every level up to ``limit``: the level found, and the tries."""
    held: int | None = None
    missed: int | None = None
    trying: int | None = levels.start
    tries = 0
    while trying is not None:
        tries += 1
        if trying <= limit:
            held = trying
        else:
            missed = trying
        trying = streams._next_level(held, missed, levels)
    return held, tries


def test_figure_2_finds_a_limit_near_its_first_guess_in_a_handful_of_tries() -> None:
    # Near the guess (within 30%): at most 5 tries; a guess five times too low still gets there.
    for start, limit, most in [(7000, 9000, 5), (7000, 7000, 5), (7000, 5600, 5), (2500, 2250, 5), (2500, 3200, 5),
                               (2500, 12000, 11)]:  # fmt: skip
        levels = streams.Levels(start)
        held, tries = search(limit, levels)
        assert held is not None and held <= limit
        assert limit - held <= max(levels.finest, held * levels.resolution), (start, limit, held)
        assert tries <= most, (start, limit, tries)


def test_figure_2_stops_at_its_top_and_at_nothing_held() -> None:
    levels = streams.Levels(7000, top=9000)
    held, _ = search(100_000, levels)
    assert held is not None and held <= 9000
    assert search(100, streams.Levels(2500)) == (None, 7)  # falls to the finest level, misses it, stops


def test_figure_2_says_where_a_search_left_each_limit() -> None:
    held, missed = streams.Level(9000, 90.0, 9000, 12.0, 0.3), streams.Level(11250, 130.0, 11250, 11.0, 0.3)
    assert run._limit(streams.Search(held, missed)) == "9000"
    assert run._limit(streams.Search(held, None)) == "≥ 9000"  # held the highest level it tried
    # Stopped by its budget before it closed in: the limit lies anywhere below the lowest level missed.
    assert run._limit(streams.Search(held, missed, stopped=True)) == "9000 (< 11250)"
    assert run._limit(streams.Search(None, missed, stopped=True)) == "< 11250"


def test_make_bench_is_expected_to_take_at_most_20_minutes() -> None:
    defaults = {"runs": 5, "start": None, "tokens": 200, "rounds": 3, "seconds": 4, "count": 200, "budget": run.BUDGET}
    args = argparse.Namespace(**defaults)
    seconds = sum(run.estimate(figure, stack, args) for figure in run.DEFAULT for stack in run.STACKS)
    assert seconds <= 20 * 60
    assert all(run.estimate("concurrency", stack, args) <= run.BUDGET for stack in run.STACKS)
    assert set(run.TITLES) == set(run.FIGURES)


def test_the_table_carries_the_last_rounds_results(tmp_path: Path) -> None:
    rows = [
        Row("1. one stream", "h11+asyncio", "1.01 x floor", "≥ 0.9 x floor", True),
        Row("new", "both", "x", "", None),
    ]
    (tmp_path / "RESULTS.md").write_text(report.table(rows) + "\n")
    before = report.last_round(tmp_path / "RESULTS.md")
    assert before == {("1. one stream", "h11+asyncio"): "1.01 x floor", ("new", "both"): "x"}
    again = report.table([Row("1. one stream", "h11+asyncio", "0.97 x floor", "≥ 0.9 x floor", True)], before)
    assert again.splitlines()[0].endswith("| met? | last round |")
    assert (
        again.splitlines()[2] == "| 1. one stream | h11+asyncio | 0.97 x floor | ≥ 0.9 x floor | yes | 1.01 x floor |"
    )


def test_the_floor_tunes_the_collector_as_uvicorn_app_app_does() -> None:
    before = gc.get_threshold()
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        anyio.run(floor.app, {"type": "lifespan"}, receive, send)
        assert gc.get_threshold()[0] >= YOUNG_THRESHOLD
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


async def _events(agent: ActingAgent, message: str) -> list[Any]:
    return [event async for event in agent.reply(Turn("s", message))]


def test_the_bench_agent_reasons_half_calls_tools_and_keeps_its_pace() -> None:
    words = " ".join(f"w{i}" for i in range(8))
    events = anyio.run(_events, ActingAgent("half", tool_every=4), words)
    reasoning = [e for e in events if isinstance(e, Reasoning)]
    text = [e for e in events if isinstance(e, str)]
    assert len(reasoning) == 4 and len(text) == 4
    kinds = [type(e) for e in events[4:9]]
    assert kinds == [ToolInputStart, ToolInputDelta, ToolCall, ToolResult, str]  # a call before word 4
    calls = anyio.run(_events, ActingAgent("tools"), "a b")
    assert [type(e) for e in calls] == [ToolInputStart, ToolInputDelta, ToolCall, ToolResult] * 2
    assert anyio.run(_events, ActingAgent("text"), "pace=0 hi there") == ["hi ", "there"]
