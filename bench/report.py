"""Tables from a run's results: per round, the mean over rounds, issue 7's goals, and docs/PERFORMANCE.md.

Every ratio compares figures of the same round and the same scenario (body kind and
connection count), never figures of different runs.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean

BASELINES = ("direct", "bare", "litellm")
PROFILE_ROWS = 25


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=False)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def add_ratios(results: list[dict]) -> list[dict]:
    """Attach rps/bare, rps/litellm and the added p50 over direct and bare, within each round."""
    ok = [r for r in results if r.get("rps")]
    base = {(r["round"], r["scenario"], r["conns"], r["target"]): r for r in ok if r["target"] in BASELINES}
    for r in ok:
        key = (r["round"], r["scenario"], r["conns"])
        direct, bare, litellm = (base.get((*key, name)) for name in BASELINES)
        r["x_bare"] = r["rps"] / bare["rps"] if bare else None
        r["x_litellm"] = r["rps"] / litellm["rps"] if litellm else None
        r["add_p50_direct_ms"] = r["lat_p50_ms"] - direct["lat_p50_ms"] if direct else None
        r["add_p50_bare_ms"] = r["lat_p50_ms"] - bare["lat_p50_ms"] if bare else None
    return ok


def errors_of(r: dict) -> tuple[int, int]:
    """(answers with status >= 400, socket errors: connect/read/write/timeout)."""
    return r.get("err_status", 0), sum(r.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_timeout"))


def per_round(results: list[dict]) -> str:
    ok = add_ratios(results)
    has_litellm = any(r["target"] == "litellm" for r in ok)
    has_db = any(r.get("cpu_db_ms_per_req") is not None for r in ok)
    has_gc = any(r.get("gc_passes") is not None for r in ok)
    header = ["round", "target", "scenario", "conns", "RPS", "p50 ms", "p99 ms", "+p50 vs direct", "+p50 vs bare",
              "RPS/bare", *(["RPS/litellm"] if has_litellm else []), ">=400", "sock err", "cpu tgt %",
              "cpu ms/req", *(["db cpu ms/req"] if has_db else []), "cpu other %", "RSS MB",
              *(["GC passes"] if has_gc else [])]
    rows = []
    for r in sorted(ok, key=lambda r: (r["round"], r["scenario"], r["conns"], r["order"])):
        status, sock = errors_of(r)
        rows.append([r["round"], r["target"], r["scenario"], r["conns"], _fmt(r["rps"], 0), _fmt(r["lat_p50_ms"], 2),
                     _fmt(r["lat_p99_ms"], 2), _fmt(r["add_p50_direct_ms"], 2, True),
                     _fmt(r["add_p50_bare_ms"], 2, True), _fmt(r["x_bare"], 3),
                     *([_fmt(r["x_litellm"], 1)] if has_litellm else []), status, sock,
                     _fmt(r.get("cpu_target_pct"), 0), _fmt(r.get("cpu_ms_per_req"), 3),
                     *([_fmt(r.get("cpu_db_ms_per_req"), 3)] if has_db else []),
                     _fmt(r.get("cpu_other_pct"), 0), _fmt(r.get("rss_mb"), 0),
                     *([_fmt(r.get("gc_passes"), 0)] if has_gc else [])])
    return table(header, rows)


def summary_rows(results: list[dict]) -> list[dict]:
    """Mean over rounds of each (target, scenario, conns); ratios averaged per round."""
    ok = add_ratios(results)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in ok:
        groups[(r["target"], r["scenario"], r["conns"])].append(r)

    def avg(rs: list[dict], k: str) -> float | None:
        values = [r.get(k) for r in rs]
        return None if not values or any(v is None for v in values) else mean(values)

    out = []
    for (target, scenario, conns), rs in groups.items():
        status_errs = sum(errors_of(r)[0] for r in rs)
        sock_errs = sum(errors_of(r)[1] for r in rs)
        out.append({"target": target, "scenario": scenario, "conns": conns, "n": len(rs), "order": rs[0]["order"],
                    "rps": avg(rs, "rps"), "rps_each": [r["rps"] for r in rs], "p50": avg(rs, "lat_p50_ms"),
                    "p99": avg(rs, "lat_p99_ms"), "add_direct": avg(rs, "add_p50_direct_ms"),
                    "add_bare": avg(rs, "add_p50_bare_ms"), "x_bare": avg(rs, "x_bare"),
                    "x_litellm": avg(rs, "x_litellm"), "status_errs": status_errs, "sock_errs": sock_errs,
                    "cpu_ms": avg(rs, "cpu_ms_per_req"), "cpu_other": avg(rs, "cpu_other_pct")})
    out.sort(key=lambda s: (s["scenario"], s["conns"], s["order"]))
    return out


def summary(results: list[dict]) -> str:
    rows = summary_rows(results)
    has_litellm = any(s["target"] == "litellm" for s in rows)
    header = ["target", "scenario", "conns", "RPS", "RPS per round", "p50 ms", "p99 ms", "+p50 vs direct ms",
              "+p50 vs bare ms", "RPS/bare", *(["RPS/litellm"] if has_litellm else []), ">=400 / sock err",
              "cpu ms/req"]
    lines = [[s["target"], "stream" if s["scenario"] == "sse" else "non-stream", s["conns"], _fmt(s["rps"], 0),
              " / ".join(_fmt(x, 0) for x in s["rps_each"]), _fmt(s["p50"], 2), _fmt(s["p99"], 2),
              _fmt(s["add_direct"], 2, True), _fmt(s["add_bare"], 2, True), _fmt(s["x_bare"], 3),
              *([_fmt(s["x_litellm"], 1)] if has_litellm else []), f"{s['status_errs']} / {s['sock_errs']}",
              _fmt(s["cpu_ms"], 3)]
             for s in rows]
    return table(header, lines)


def _cpu_compared(many: dict | None, one: dict | None) -> tuple[float, str] | None:
    """CPU per request of several workers against one: the change, and the figures as the goals show them."""
    if one is None or many is None or not one["cpu_ms"] or many["cpu_ms"] is None:
        return None
    change = many["cpu_ms"] / one["cpu_ms"] - 1
    return change, (f"{many['cpu_ms']:.3f} vs {one['cpu_ms']:.3f} ms ({change:+.0%}); "
                    f"RPS {many['rps']:,.0f} vs {one['rps']:,.0f}")


def goals(results: list[dict], money_ok: bool | None, workers_note: str, workers_target: str | None = None,
          workers: int = 2, stream_context: str = "") -> str:
    """Issue 7's 'must hold' lines, judged on the means above. Its stream goals assume the
    reference mock's stream, its chunks sent at once; for another (``stream_context`` says how it
    differs) the stream rows are context only."""
    by = {(s["target"], s["scenario"], s["conns"]): s for s in summary_rows(results)}

    def get(scenario: str, conns: int, field: str) -> float | None:
        s = by.get(("apibox", scenario, conns))
        return None if s is None else s[field]

    def judge(value: float | None, ok: bool, scenario: str = "") -> str:
        if value is None:
            return "not measured"
        if scenario == "sse" and stream_context:
            return f"context: {stream_context}"
        return "met" if ok else "NOT met"

    rows = []
    for scenario, label, want in (("json", "non-stream", 0.5), ("sse", "stream", 0.8)):
        v = get(scenario, 32, "x_bare")
        rows.append([f"RPS >= {want}x bare, {label}, 32 conns", _fmt(v, 3),
                     judge(v, v is not None and v >= want, scenario)])
    for scenario, label in (("json", "non-stream"), ("sse", "stream")):
        v = get(scenario, 1, "add_bare")
        rows.append([f"added p50 over bare <= 0.5 ms, {label}, 1 conn", _fmt(v, 2, True),
                     judge(v, v is not None and v <= 0.5, scenario)])
    for scenario, label in (("json", "non-stream"), ("sse", "stream")):
        v = get(scenario, 32, "x_litellm")
        rows.append([f">= 20x LiteLLM RPS, {label}, 32 conns", _fmt(v, 1),
                     judge(v, v is not None and v >= 20, scenario)])
    if workers_target:
        cells = [(conns, kind) for conns in (32, 128) for kind in (("json", "non-stream"), ("sse", "stream"))]
        for conns, (scenario, label) in cells:
            one, many = by.get(("apibox", scenario, conns)), by.get((workers_target, scenario, conns))
            goal = f"{workers_target}: CPU/request within 10% of 1 worker, {label}, {conns} conns"
            compared = _cpu_compared(many, one)
            if compared is None:
                rows.append([goal, "-", "not measured"])
                continue
            change, text = compared
            rows.append([goal, text, judge(change, abs(change) <= 0.10, scenario)])
        for conns, (scenario, label) in cells:  # when the run has the cells: the same load on every worker
            compared = _cpu_compared(by.get((workers_target, scenario, conns)),
                                     by.get(("apibox", scenario, conns // workers)))
            if compared is not None:
                rows.append([f"(context) {workers_target} at {conns} conns vs 1 worker at {conns // workers}, "
                             f"{label}: the same load per worker", compared[1], "-"])
    else:
        rows.append(["--workers 2: CPU per request within 10% of 1 worker", "-", workers_note])
    rows.append(["money rules hold after the load (db check, charged == usage)", "-",
                 "not measured" if money_ok is None else ("met" if money_ok else "NOT met")])
    return table(["goal (issue 7)", "measured", "verdict"], rows)


def noise_notes(results: list[dict]) -> list[str]:
    """A warning when the machine was busy with other work during the measured runs."""
    other = [r["cpu_other_pct"] for r in results if r.get("cpu_other_pct") is not None]
    if not other or mean(other) <= 25:
        return []
    return [f"The machine was busy with other work: on average {mean(other):.0f}% of a core (max {max(other):.0f}%) "
            "went to processes other than the target, the mock and wrk during the measured runs (`cpu other %`). "
            "Throughput and latency figures are noisy; CPU per request (`cpu ms/req`) is the steadiest figure. "
            "Rerun on a quiet machine before comparing."]


def run_goals(results: list[dict], money_ok: bool | None, meta: dict) -> str:
    """The goals table for a run, with the workers settings its meta recorded."""
    args = meta.get("args", {})
    return goals(results, money_ok, meta.get("workers_note", ""), meta.get("workers_target"),
                 args.get("workers", 2), stream_context(args))


def stream_context(args: dict) -> str:
    """How a run's streams differ from issue 7's load, if they do ("" when they do not)."""
    delay = args.get("chunk_delay_ms") or 0.0
    ways = [f"chunks {delay:g} ms apart"] if delay else []
    if args.get("obfuscation"):
        ways.append("chunks padded")
    return ", ".join(ways)


def pace_note(args: dict) -> str:
    delay = args.get("chunk_delay_ms") or 0.0
    note = f" {delay:g} ms apart (`--chunk-delay-ms`: not issue 7's load)" if delay else ""
    if args.get("obfuscation"):
        note += (", each padded with OpenAI's random `obfuscation` string (`--obfuscation`, this "
                 "directory's mock: not issue 7's load)")
    return note


def full_text(results: list[dict], money: list[dict], meta: dict) -> str:
    money_ok = None if not money else all(m.get("ok") for m in money)
    meta = {**meta, "notes": [*meta.get("notes", []), *noise_notes(results)]}
    parts = ["## Mean over rounds", "", summary(results), "", "## Goals", "",
             run_goals(results, money_ok, meta), "",
             *profile_section(meta), "## Per round", "", per_round(results), ""]
    if money:
        parts += ["## Money check (after each apibox run)", ""]
        for m in money:
            parts += [f"round {m['round']}:", "", *[f"    {line}" for line in m["lines"]], ""]
    if meta.get("validation"):
        parts += ["## Validation (one non-stream + one stream answer per target and round)", ""]
        header = ["round", "target", "non-stream ok", "usage tokens", "stream ok + [DONE]", "content chunks",
                  "stream usage tokens"]
        rows = [[v["round"], v["target"], "yes" if v["json_ok"] else "NO", v["json_usage"],
                 "yes" if v["sse_ok"] else "NO", v["sse_content_chunks"], v["sse_usage"]]
                for v in meta["validation"]]
        parts += [table(header, rows), ""]
    if meta.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(parts)


def performance_doc(results: list[dict], money: list[dict], meta: dict) -> str:
    meta = {**meta, "notes": [*meta.get("notes", []), *noise_notes(results)]}
    m = meta["machine"]
    money_ok = None if not money else all(x.get("ok") for x in money)
    a = meta["args"]
    lines = [
        "# Performance",
        "",
        "Generated by `bench/` (see [bench/README.md](../bench/README.md)); do not edit by hand, rerun",
        "the command below with `--write-doc`.",
        "",
        f"- **Date:** {meta['date']}",
        f"- **Command:** `{meta['command']}`",
        f"- **apibox:** {m['apibox']}",
        f"- **Machine:** {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM, {m['kernel']}; "
        f"load average at start {m['loadavg']}",
        f"- **Software:** Python {m['python']}, aiohttp {m['aiohttp']}, uvloop {m['uvloop']}, "
        f"aiosqlite {m['aiosqlite']}, SQLite {m['sqlite']}, {m['wrk']}",
        f"- **Pinning:** gateway on CPU {a['proxy_cpus'] or '(unpinned)'}, wrk (1 thread) and the mock upstream "
        f"on CPU {a['load_cpus'] or '(unpinned)'}; for `direct` the upstream moves to the gateway's CPU. "
        "Every figure is per gateway core.",
        f"- **Load:** {a['warmup']:g} s warm-up + {a['duration']:g} s measured per cell, {a['rounds']} round(s); "
        f"stream = {a['chunks']} content chunks{pace_note(a)} + a usage chunk + `[DONE]`; "
        f"reference mock and forwarder from {meta['reference']}.",
        "- **apibox:** 1 worker, SQLite (WAL), billing fully on: key check, hold, settlement, usage and ledger "
        "rows on every request." + _variants(meta),
        "",
        "## Results (mean over rounds)",
        "",
        "`+p50` is the median latency added over `direct` (the mock alone) and over `bare` (the thinnest "
        "aiohttp forwarder) in the same round; `RPS/bare` is throughput relative to the forwarder in the same "
        "round. Compare ratios, not absolute numbers across runs or machines.",
        "",
        summary(results),
        "",
        "## Goals (issue 7)",
        "",
        run_goals(results, money_ok, meta),
        "",
        *profile_section(meta),
        "## Money under load",
        "",
    ]
    for x in money:
        lines += [f"{x.get('target', 'apibox')}, round {x['round']}:", "", *[f"    {line}" for line in x["lines"]], ""]
    if not money:
        lines += ["apibox was not measured in this run.", ""]
    lines += ["## Per round", "", per_round(results), ""]
    if meta.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in meta["notes"]], ""]
    return "\n".join(lines)


def _variants(meta: dict) -> str:
    a, text = meta["args"], ""
    if meta.get("workers_target"):
        text += (f" `{meta['workers_target']}`: `apibox serve --workers {a['workers']}` (a supervisor and "
                 f"{a['workers']} worker processes on one port, one SQLite file), every process allowed on CPUs "
                 f"{a['workers_cpus'] or '(unpinned)'} while wrk and the mock stay on CPU {a['load_cpus']}: with 2 "
                 "cores the workers share them with the load, so compare its CPU per request (user + system of "
                 "the supervisor and every worker, over the requests served), not its RPS/bare.")
    if meta.get("postgres"):
        text += (" `apibox-pg`: 1 worker (on CPU " + str(a["proxy_cpus"]) + ") on PostgreSQL, a fresh database "
                 f"per round on the server given with `--postgres` ({meta['postgres']}). The server is not the "
                 "bench's: it is not pinned by it, and its CPU (the postmaster and its backends, when on this "
                 "machine) is not in cpu ms/req but in the per-round table's db cpu ms/req.")
    if meta.get("litellm"):
        workers = a["litellm_workers"]
        text += (f" `litellm`: the LiteLLM proxy {meta['litellm']} (its own venv), {workers} "
                 f"worker{'s' if workers != 1 else ''} on CPU {a['proxy_cpus'] or '(unpinned)'}, in its leanest "
                 "set-up: no database, no master key, no callbacks, spend or error logs; it runs alone, after the "
                 "other targets of its round.")
    return text


def profile_top(path: Path, rows: int = PROFILE_ROWS) -> tuple[int, list[tuple[float, str]], list[tuple[float, str]]]:
    """From py-spy's raw (collapsed) stacks of the event-loop thread: the share of samples whose innermost
    apibox frame is each apibox function (``~`` + the leaf when no apibox frame is on the stack), and the
    share of samples in each function itself. Other threads (the SQLite writer) are left out."""
    own: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if frames[0].startswith("Thread._bootstrap"):
            continue
        n = int(count)
        total += n
        names = [_frame(f) for f in frames]
        leaf[names[-1][0]] += n
        mine = next((name for name, ours in reversed(names) if ours), None)
        own[mine or "~ " + names[-1][0]] += n
    if not total:
        return 0, [], []
    return (total, [(100 * v / total, k) for k, v in own.most_common(rows)],
            [(100 * v / total, k) for k, v in leaf.most_common(rows)])


_GATEWAY_FILES = {p.name for p in (Path(__file__).resolve().parent.parent / "apibox" / "gateway").glob("*.py")}


def _frame(frame: str) -> tuple[str, bool]:
    """``name (file)`` and whether it is apibox's. py-spy names the gateway's files without their
    directory (``proxy.py``); the process's root frame (``apibox/__main__.py``) is not apibox's work."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    if "/" not in file and file in _GATEWAY_FILES:
        file = "apibox/gateway/" + file
    ours = ("/apibox/" in file or file.startswith("apibox/")) and not file.endswith("__main__.py")
    short = file.split("apibox/", 1)[-1] if ours else file.rsplit("/", 1)[-1]
    return f"{name} ({short})", ours


def profile_section(meta: dict) -> list[str]:
    out = Path(meta.get("out", ""))
    found = [(sc, out / f"profile-{sc}.txt") for sc in ("json", "sse") if (out / f"profile-{sc}.txt").exists()]
    baseline = Path(__file__).resolve().parent / "profile-baseline.md"
    if not found and not baseline.exists():
        return []
    lines = ["## Where the time goes (py-spy)", ""]
    if found:
        lines += ["apibox's event-loop thread sampled by py-spy (200 Hz, raw stacks) while wrk loaded it at 32 "
                  "connections, after the measured cells of round 1 (not measured). *Own*: samples whose innermost "
                  "apibox frame is that function (everything it calls outside apibox counted with it; `~` marks "
                  "samples with no apibox frame: the event loop, aiohttp's protocol callbacks). *Self*: samples "
                  "in the function itself (`Runner.run`: the event loop's own C code, uvloop's). SQLite's writes run "
                  "on this thread too (`run_script`: the statements, `_commit_group`: BEGIN and COMMIT); only the "
                  "checkpointer's thread is left out.", ""]
        for sc, path in found:
            total, own, leaf = profile_top(path)
            label = "stream" if sc == "sse" else "non-stream"
            lines += [f"{label}, {total:,} samples:", "",
                      table(["own %", "function (innermost apibox frame)", "self %", "function"],
                            [[f"{a:.1f}", b, f"{c:.1f}", d] for (a, b), (c, d) in zip(own, leaf, strict=False)]), ""]
    if baseline.exists():
        lines += [baseline.read_text().strip(), ""]
    return lines


_KEPT = re.compile(r"<!-- ([\w-]+):begin -->.*?<!-- \1:end -->", re.S)


def with_kept_sections(new: str, old: str) -> str:
    """``new``, followed by the sections other scripts keep in the old doc between
    ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` (bench/soak.py's), which a run does not measure."""
    kept = [m.group(0) for m in _KEPT.finditer(old) if m.group(0) not in new]
    return new.rstrip("\n") + "".join("\n\n" + k for k in kept) + "\n"
