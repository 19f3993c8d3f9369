"""bench/report.py judges issue 7's goals from a run's results; streams paced like a model's output
(``--chunk-delay-ms``) are not the load those goals are set for, so they are reported as context."""

from __future__ import annotations

import asyncio
import gc

import pytest
from aiohttp import web

from apibox.metrics import Metrics
from bench import instructions, report
from bench.harness import gc_passes
from bench.instructions import Count


def cell(target: str, scenario: str, conns: int, rps: float, p50: float, order: int) -> dict:
    return {"round": 1, "order": order, "target": target, "scenario": scenario, "conns": conns, "rps": rps,
            "lat_p50_ms": p50, "lat_p99_ms": p50 * 3, "cpu_ms_per_req": 1000 / rps}


RESULTS = [
    cell("bare", "json", 1, 2000, 0.40, 0), cell("apibox", "json", 1, 700, 0.80, 1),
    cell("bare", "json", 32, 4000, 8.0, 0), cell("apibox", "json", 32, 2400, 13.0, 1),  # 0.6x: met
    cell("bare", "sse", 1, 1300, 0.80, 0), cell("apibox", "sse", 1, 500, 1.90, 1),
    cell("bare", "sse", 32, 2000, 16.0, 0), cell("apibox", "sse", 32, 1000, 30.0, 1),  # 0.5x: not met
]


def verdicts(table: str) -> dict[str, str]:
    """The goals table's rows: goal -> verdict."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    return {row[0]: row[-1] for row in rows}


def test_the_goals_are_judged_on_a_run_with_chunks_sent_at_once() -> None:
    judged = verdicts(report.run_goals(RESULTS, True, {"args": {"workers": 0, "chunk_delay_ms": 0.0}}))
    assert judged["RPS >= 0.5x bare, non-stream, 32 conns"] == "met"
    assert judged["RPS >= 0.8x bare, stream, 32 conns"] == "NOT met"
    assert judged["added p50 over bare <= 0.5 ms, non-stream, 1 conn"] == "met"
    assert judged["added p50 over bare <= 0.5 ms, stream, 1 conn"] == "NOT met"


def test_paced_streams_are_context_and_the_non_streamed_goals_are_still_judged() -> None:
    meta = {"args": {"workers": 0, "chunk_delay_ms": 2.0}}
    judged = verdicts(report.run_goals(RESULTS, True, meta))
    assert judged["RPS >= 0.8x bare, stream, 32 conns"] == "context: chunks 2 ms apart"
    assert judged["added p50 over bare <= 0.5 ms, stream, 1 conn"] == "context: chunks 2 ms apart"
    assert judged["RPS >= 0.5x bare, non-stream, 32 conns"] == "met"
    assert judged[">= 20x LiteLLM RPS, stream, 32 conns"] == "not measured"  # no LiteLLM in this run


def test_the_load_line_says_how_far_apart_the_chunks_came() -> None:
    assert report.pace_note({"chunk_delay_ms": 0.0}) == ""
    assert report.pace_note({}) == ""  # runs recorded before the option existed
    assert "2.5 ms apart" in report.pace_note({"chunk_delay_ms": 2.5})
    assert "`obfuscation` string" in report.pace_note({"chunk_delay_ms": 0.0, "obfuscation": True})


def test_padded_streams_are_context_too() -> None:
    judged = verdicts(report.run_goals(RESULTS, True, {"args": {"workers": 0, "obfuscation": True}}))
    assert judged["RPS >= 0.8x bare, stream, 32 conns"] == "context: chunks padded"
    assert judged["RPS >= 0.5x bare, non-stream, 32 conns"] == "met"
    both = verdicts(report.run_goals(RESULTS, True, {"args": {"workers": 0, "obfuscation": True,
                                                               "chunk_delay_ms": 2.0}}))
    assert both["added p50 over bare <= 0.5 ms, stream, 1 conn"] == "context: chunks 2 ms apart, chunks padded"


def test_callgrind_totals_are_read_from_the_dump_and_a_dump_without_them_is_refused(tmp_path) -> None:
    dump = tmp_path / "apibox.123.cg.1"
    dump.write_text("# callgrind format\nversion: 1\nevents: Ir\nsummary: 0\n\nfn=(1) main\n5 100\ntotals: 150705412\n")
    assert instructions.callgrind_totals(dump) == 150_705_412
    empty = tmp_path / "nothing.cg"
    empty.write_text("# callgrind format\nevents: Ir\n")
    with pytest.raises(ValueError, match="no totals"):
        instructions.callgrind_totals(empty)


def test_the_instructions_table_compares_apibox_with_the_forwarder_per_request() -> None:
    counts = [Count("bare", "json", 100, 60_000_000), Count("apibox", "json", 100, 150_000_000),
              Count("bare", "paced", 50, 80_000_000), Count("apibox", "paced", 50, 168_000_000)]
    rows = instructions.report(counts).splitlines()[2:]
    assert rows == ["| json | 600,000 | 1,500,000 | 2.50 |", "| paced | 1,600,000 | 3,360,000 | 2.10 |"]


def test_the_per_round_table_has_the_garbage_collectors_passes_where_they_were_read() -> None:
    assert "GC passes" not in report.per_round(RESULTS)
    results = [dict(r, gc_passes=3) if r["target"] == "apibox" else r for r in RESULTS]
    lines = report.per_round(results).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("GC passes")
    passes = {(row[1], row[2], row[3]): row[column] for row in
              ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert passes[("apibox", "sse", "32")] == "3" and passes[("bare", "sse", "32")] == "-"


async def test_gc_passes_are_read_from_a_gateways_metrics_page(aiohttp_server) -> None:
    metrics = Metrics()
    app = web.Application()
    app.router.add_get("/metrics", lambda _: web.Response(body=metrics.exposition()))
    server = await aiohttp_server(app)
    url = f"http://127.0.0.1:{server.port}/metrics"
    before = await asyncio.to_thread(gc_passes, url)
    gc.collect()
    after = await asyncio.to_thread(gc_passes, url)
    assert before is not None and after is not None and after >= before + 1  # our pass, and any the test made
    assert await asyncio.to_thread(gc_passes, f"http://127.0.0.1:{server.port}/nothing") is None
