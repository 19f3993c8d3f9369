"""The apibox benchmark: mock upstream, bare forwarder, apibox (and LiteLLM on request), loaded by wrk.

The mock upstream starts once. Each round starts every target (pinned to the gateway CPU),
waits for a first 200 and validates one non-stream and one stream answer; then, cell by cell
(a scenario at a connection count), loads each target in turn with wrk (warm-up, then the
measured run), recording CPU time and RSS, so that the figures a ratio compares are taken
seconds apart; then stops them by process group and, for apibox, audits the money. LiteLLM
has its cells after the others, started on its own. Then print and
write the tables (results/<stamp>/report.md) and, with --write-doc, docs/PERFORMANCE.md.

    bench/run.sh                                  # defaults: 2 rounds, 3 s warm-up + 10 s per cell
    bench/run.sh --rounds 1 --duration 3 --warmup 1
    python -m bench --report bench/results/<stamp> --write-doc
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from importlib import metadata
from pathlib import Path

from bench import apibox_target, procs, report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHAT = "/v1/chat/completions"
LUA = HERE / "chat.lua"
WORKERS_NOTE = "skipped: `apibox serve` has no --workers option yet"
PROFILE_SECONDS = 8.0


@dataclasses.dataclass
class Target:
    name: str
    url: str  # the chat-completions endpoint
    cmd: list[str] | None = None  # None: nothing to start (direct)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    ready_timeout: float = 60.0
    stop_grace: float = 10.0
    cwd: Path | None = None
    metrics_url: str | None = None  # its /metrics, when one process answers it (apibox, one worker)


# ---------------------------------------------------------------------------------------------
# where the reference mock and forwarder come from
# ---------------------------------------------------------------------------------------------

def reference_dir(override: str | None) -> tuple[Path, str]:
    """../shared/bench beside the repository when it has both scripts, else our own copies."""
    candidates = [Path(override)] if override else []
    candidates.append(REPO.parent / "shared" / "bench")
    for c in candidates:
        if (c / "mock_upstream.py").is_file() and (c / "bare_proxy.py").is_file():
            if c.resolve() == HERE:
                break
            return c.resolve(), f"`{c.resolve()}` (the shared reference)"
    return HERE, "`bench/` (own stand-ins: ../shared/bench missing or not chosen)"


def mock_command(ref: Path, padded: bool) -> list[str]:
    """The command that starts the mock upstream: the reference one, or ours when its chunks
    must carry OpenAI's padding (only ours can)."""
    if padded:
        return [sys.executable, str(HERE / "mock_upstream.py"), "--obfuscation"]
    return [sys.executable, str(ref / "mock_upstream.py")]


# ---------------------------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------------------------

def chat_request(stream: bool) -> dict:
    """The chat request wrk sends (bench/chat.lua): a system and a user message, 64 tokens at most."""
    body: dict = {"model": apibox_target.MODEL, "temperature": 0.2, "max_tokens": 64, "messages": [
        {"role": "system", "content": "You are a concise assistant for an engineering team. Answer in plain words."},
        {"role": "user", "content": "In two sentences: why does a team that calls several LLM providers put one "
                                    "gateway in front of them, and why count usage per API key?"}]}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def chat_body(stream: bool) -> bytes:
    return json.dumps(chat_request(stream)).encode()


def post(t: Target, stream: bool, timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(t.url, data=chat_body(stream), method="POST",
                                 headers={"Content-Type": "application/json", **t.headers})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s ({last})")


def wait_ready(t: Target, proc: subprocess.Popen | None) -> int:
    """Poll with a real chat request until it answers 200; returns how many 200s that took (1)."""
    deadline = time.monotonic() + t.ready_timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{t.name} exited with code {proc.returncode} before it was ready")
        try:
            status, body = post(t, False, timeout=10)
            if status == 200:
                return 1
            last = f"HTTP {status}: {body[:300]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{t.name} not ready after {t.ready_timeout:.0f} s ({last})")


def validate(t: Target, chunks: int) -> tuple[dict, int]:
    """One non-stream and one stream answer: complete, with usage, [DONE] last. Returns (result, 2xx count)."""
    v: dict = {}
    ok_count = 0
    status, body = post(t, False)
    ok_count += 200 <= status < 300
    try:
        j = json.loads(body)
        v["json_ok"] = status == 200 and bool(j["choices"][0]["message"]["content"])
        v["json_usage"] = (j.get("usage") or {}).get("total_tokens")
    except (ValueError, KeyError, IndexError, TypeError):
        v["json_ok"], v["json_usage"] = False, None
    status, body = post(t, True)
    ok_count += 200 <= status < 300
    events = [line[6:] for line in body.decode(errors="replace").splitlines() if line.startswith("data: ")]
    content = 0
    usage = None
    for ev in events:
        try:
            j = json.loads(ev)
        except ValueError:
            continue
        if j.get("usage"):
            usage = j["usage"].get("total_tokens")
        content += sum(1 for c in j.get("choices") or [] if (c.get("delta") or {}).get("content"))
    v["sse_ok"] = status == 200 and bool(events) and events[-1].strip() == "[DONE]" and content == chunks
    v["sse_content_chunks"] = content
    v["sse_usage"] = usage
    return v, ok_count


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

def run_wrk(t: Target, stream: bool, conns: int, seconds: float, load_cpus: str | None, out: Path,
            timeout_s: int) -> dict:
    env = dict(os.environ, BENCH_STREAM="1" if stream else "0", BENCH_MODEL=apibox_target.MODEL,
               BENCH_HEADERS="|".join(f"{k}: {v}" for k, v in t.headers.items()), BENCH_JSON_OUT=str(out))
    cmd = [*(["taskset", "-c", load_cpus] if load_cpus else []), "wrk", "-t1", f"-c{conns}",
           f"-d{max(1, round(seconds))}s", f"--timeout={timeout_s}s", "-s", str(LUA), t.url]
    out.unlink(missing_ok=True)
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                   timeout=seconds + timeout_s + 60)
    try:
        return json.loads(out.read_text())
    except (OSError, ValueError):
        return {}


def two_xx(r: dict) -> int:
    return max(0, r.get("requests", 0) - r.get("err_status", 0))


def socket_errors(r: dict) -> int:
    return sum(r.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_timeout"))


def gc_passes(metrics_url: str) -> float | None:
    """The garbage collector's passes so far (every generation) in the process behind ``metrics_url``."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("python_gc_collections_total{"))


def measure(t: Target, proc: subprocess.Popen | None, upstream: subprocess.Popen, stream: bool, conns: int,
            args: argparse.Namespace, out: Path, tally: dict, db_pid: int | None = None) -> dict:
    if args.warmup > 0:
        w = run_wrk(t, stream, conns, args.warmup, args.load_cpus, out / "warmup.json", args.wrk_timeout)
        tally["2xx"] += two_xx(w)
        tally["slack"] += conns + socket_errors(w)
        tally["status_errors"] += w.get("err_status", 0)
    # the scrapes of /metrics fall outside the CPU readings: the target's CPU is the load's alone
    gc0 = gc_passes(t.metrics_url) if t.metrics_url else None
    up0 = procs.group_cpu_seconds(upstream.pid)
    tg0 = procs.group_cpu_seconds(proc.pid) if proc else 0.0
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    db0 = procs.tree_cpu_seconds(db_pid) if db_pid else 0.0
    busy0 = procs.machine_busy_seconds()
    r = run_wrk(t, stream, conns, args.duration, args.load_cpus, out / "last.json", args.wrk_timeout)
    busy1 = procs.machine_busy_seconds()
    db_cpu = procs.tree_cpu_seconds(db_pid) - db0 if db_pid else None
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not r:
        raise RuntimeError("wrk wrote no summary (see the target's log)")
    tally["2xx"] += two_xx(r)
    tally["slack"] += conns + socket_errors(r)
    tally["status_errors"] += r.get("err_status", 0)
    secs = r.get("duration_s") or args.duration
    tgt_cpu = (procs.group_cpu_seconds(proc.pid) - tg0) if proc else None
    r["cpu_upstream_pct"] = round(100 * (procs.group_cpu_seconds(upstream.pid) - up0) / secs, 1)
    gc1 = gc_passes(t.metrics_url) if t.metrics_url and gc0 is not None else None
    r["cpu_target_pct"] = None if tgt_cpu is None else round(100 * tgt_cpu / secs, 1)
    r["cpu_ms_per_req"] = None if tgt_cpu is None or not r.get("requests") else 1000 * tgt_cpu / r["requests"]
    r["cpu_wrk_pct"] = round(100 * ((ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)) / secs, 1)
    if db_cpu is not None and r.get("requests"):
        r["cpu_db_pct"] = round(100 * db_cpu / secs, 1)
        r["cpu_db_ms_per_req"] = 1000 * db_cpu / r["requests"]
    ours = r["cpu_upstream_pct"] + (r["cpu_target_pct"] or 0) + r["cpu_wrk_pct"] + (r.get("cpu_db_pct") or 0)
    # CPU the machine spent on anything else meanwhile (other tenants, unattributed softirq): a noise gauge
    r["cpu_other_pct"] = round(100 * (busy1 - busy0) / secs - ours, 1)
    if proc:
        r["rss_mb"] = round(procs.group_rss_mb(proc.pid), 1)
    if gc0 is not None and gc1 is not None:
        r["gc_passes"] = int(gc1 - gc0)  # none while the request path makes no reference cycles
    return r


# ---------------------------------------------------------------------------------------------
# targets
# ---------------------------------------------------------------------------------------------

def litellm_target(args: argparse.Namespace, out: Path, upstream_v1: str) -> Target:
    venv = Path(args.litellm_venv)
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing: run bench/run.sh --with-litellm (it installs LiteLLM there)")
    cfg = out / "litellm.yaml"
    cfg.write_text("\n".join([
        "model_list:",
        f"  - model_name: {apibox_target.MODEL}",
        "    litellm_params:",
        "      model: openai/gpt-4o-mini",
        f"      api_base: {upstream_v1}",
        "      api_key: bench-not-a-secret",
        "litellm_settings:",
        "  callbacks: []",
        "  success_callback: []",
        "  failure_callback: []",
        "  request_timeout: 600",
        "general_settings:",
        "  disable_spend_logs: true",
        "  disable_error_logs: true",
        "  dangerously_permit_weak_or_unset_master_key: true",
        ""]))
    port = args.port_base + 2
    return Target("litellm", f"http://127.0.0.1:{port}{CHAT}",
                  cmd=[str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
                       "--num_workers", str(args.litellm_workers)],
                  env={"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                       "LITELLM_TELEMETRY_DISABLED": "true", "LITELLM_MODE": "PRODUCTION",
                       "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True"},
                  ready_timeout=240)


def apibox_supports_workers() -> bool:
    done = subprocess.run([*apibox_target.cli(), "serve", "--help"], capture_output=True, text=True, check=False)
    return "--workers" in done.stdout


# ---------------------------------------------------------------------------------------------
# machine + meta
# ---------------------------------------------------------------------------------------------

def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def litellm_version(venv: Path) -> str:
    """The LiteLLM installed in its own venv (not importable from the bench's)."""
    probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "from importlib.metadata import version; print(version('litellm'))"],
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() or "unknown"


def machine_info() -> dict:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False).stdout.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_gib": round(mem_kb / 1024 / 1024, 1),
            "kernel": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "aiohttp": version_of("aiohttp"), "uvloop": version_of("uvloop"), "aiosqlite": version_of("aiosqlite"),
            "sqlite": sqlite3.sqlite_version,
            "wrk": ((wrk.stdout or wrk.stderr).splitlines() or ["wrk ?"])[0].split(" Copyright")[0],
            "apibox": f"{version_of('apibox')} ({git or 'no git'})",
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def the_command(argv: list[str]) -> str:
    launcher = os.environ.get("BENCH_LAUNCHER", "python -m bench")
    return " ".join([launcher, *map(shlex.quote, argv)])


def log_summary(path: Path) -> dict:
    """WARNING/ERROR lines apibox logged during the run (it logs nothing per request otherwise)."""
    if not path.exists():
        return {"warnings": 0, "errors": 0, "samples": []}
    lines = path.read_text(errors="replace").splitlines()
    bad = [line for line in lines if " WARNING " in line or " ERROR " in line or "Traceback" in line]
    return {"warnings": sum(" WARNING " in line for line in bad), "errors": sum(" ERROR " in line for line in bad),
            "samples": bad[:5]}


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench", description="apibox's benchmark (see bench/README.md)")
    ap.add_argument("--targets", default="direct,bare,apibox",
                    help="comma list of direct, bare, apibox, apibox-pg (needs --postgres), litellm")
    ap.add_argument("--with-litellm", action="store_true", help="also measure the LiteLLM proxy (own venv)")
    ap.add_argument("--scenarios", default="json,sse", help="json (non-stream) and/or sse (stream)")
    ap.add_argument("--conns", default="1,32,128", help="wrk connection counts")
    ap.add_argument("--duration", type=float, default=10, help="measured seconds per cell")
    ap.add_argument("--warmup", type=float, default=3, help="warm-up seconds per cell (discarded)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=20, help="content chunks per streamed answer")
    ap.add_argument("--chunk-delay-ms", type=float, default=0.0,
                    help="the mock's pause between streamed chunks, as a model's pace (default 0: all at once, "
                         "issue 7's load; with a pause the stream goals are reported as context)")
    ap.add_argument("--obfuscation", action="store_true",
                    help="the mock pads every streamed chunk as OpenAI does (bench/mock_upstream.py, not the "
                         "reference mock; the stream goals are then reported as context)")
    ap.add_argument("--proxy-cpus", default="0", help="taskset CPU list of the target ('' = unpinned)")
    ap.add_argument("--load-cpus", default="1", help="taskset CPU list of wrk + upstream ('' = unpinned)")
    ap.add_argument("--port-base", type=int, default=18100,
                    help="upstream on it, bare +1, litellm +2, apibox +10")
    ap.add_argument("--wrk-timeout", type=int, default=30, help="wrk's per-request timeout, seconds")
    ap.add_argument("--litellm-venv", default=os.environ.get("LITELLM_VENV", "/tmp/peer-venv"))
    ap.add_argument("--litellm-workers", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2,
                    help="also measure `apibox serve --workers N` (target apibox-wN); 0 or 1: not")
    ap.add_argument("--workers-cpus", default="0,1",
                    help="taskset CPU list of apibox-wN (all its processes; wrk and the mock stay on --load-cpus)")
    ap.add_argument("--postgres", metavar="URL",
                    help="also measure apibox on PostgreSQL (target apibox-pg): a server URL such as "
                         "postgresql://postgres@127.0.0.1:5432/postgres; each round gets a fresh database on it, "
                         "dropped after its money check")
    ap.add_argument("--profile", action="store_true",
                    help="after apibox's measured cells, profile it with py-spy under the same load at 32 "
                         "connections (not measured) and put its top functions in the report")
    ap.add_argument("--shared", default=os.environ.get("BENCH_SHARED"),
                    help="directory with the reference mock_upstream.py and bare_proxy.py "
                         "(default: ../shared/bench beside the repository)")
    ap.add_argument("--out", help="results directory (default bench/results/<stamp>)")
    ap.add_argument("--write-doc", action="store_true", help="regenerate docs/PERFORMANCE.md")
    ap.add_argument("--doc", default=str(REPO / "docs" / "PERFORMANCE.md"), help="where --write-doc writes")
    ap.add_argument("--report", metavar="RESULTS_DIR", help="only re-render the tables of a past run")
    args = ap.parse_args(argv)
    args.proxy_cpus = args.proxy_cpus or None
    args.load_cpus = args.load_cpus or None
    args.workers_cpus = args.workers_cpus or None
    return args


def render(out: Path, write_doc: bool, doc: Path) -> str:
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    money_path = out / "money.jsonl"
    money = [json.loads(line) for line in money_path.read_text().splitlines()] if money_path.exists() else []
    meta = {**json.loads((out / "meta.json").read_text()), "out": str(out)}
    text = report.full_text(results, money, meta)
    (out / "report.md").write_text(text)
    doc_text = report.performance_doc(results, money, meta)
    (out / "PERFORMANCE.md").write_text(doc_text)
    if write_doc:
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(report.with_kept_sections(doc_text, doc.read_text() if doc.exists() else ""))
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report:
        print(render(Path(args.report), args.write_doc, Path(args.doc)))
        if args.write_doc:
            print(f"wrote {args.doc}")
        return 0
    # SIGTERM (a timeout, a CI cancel) becomes SystemExit, so the finally blocks stop every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    if args.with_litellm and "litellm" not in names:
        names.append("litellm")
    unknown = set(names) - {"direct", "bare", "apibox", "apibox-pg", "litellm"}
    if unknown:
        print(f"unknown targets: {sorted(unknown)} (known: direct, bare, apibox, apibox-pg, litellm; "
              "--workers N adds apibox-wN)", file=sys.stderr)
        return 2
    if "apibox-pg" in names and not args.postgres:
        print("the target apibox-pg needs a PostgreSQL server: --postgres URL", file=sys.stderr)
        return 2
    notes: list[str] = []
    workers_target = f"apibox-w{args.workers}" if args.workers > 1 and "apibox" in names else None
    if workers_target and not apibox_supports_workers():
        notes.append(f"apibox with {args.workers} workers: {WORKERS_NOTE}.")
        workers_target = None
    if workers_target:
        names.append(workers_target)
    if args.postgres and "apibox" in names and "apibox-pg" not in names:
        names.append("apibox-pg")
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    conns = [int(c) for c in args.conns.split(",") if c.strip()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else HERE / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)

    ports = {"upstream": args.port_base, "bare": args.port_base + 1, "litellm": args.port_base + 2,
             "apibox": args.port_base + 10, "apibox-pg": args.port_base + 11,
             **({workers_target: args.port_base + 12} if workers_target else {})}
    busy = [f"{n}:{p}" for n, p in ports.items() if (n == "upstream" or n in names) and not port_free(p)]
    if busy:
        print(f"ports in use: {', '.join(busy)} (another benchmark running?); choose --port-base", file=sys.stderr)
        return 2

    ref, ref_label = reference_dir(args.shared)
    up = f"http://127.0.0.1:{ports['upstream']}"
    workers_note = WORKERS_NOTE if notes else ("not measured (--workers 0)" if not workers_target else "")
    meta = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": the_command(argv),
            "args": vars(args), "machine": machine_info(), "reference": ref_label, "ports": ports,
            "workers_note": workers_note, "workers_target": workers_target, "notes": notes, "validation": []}
    if "apibox-pg" in names:
        meta["postgres"] = apibox_target.postgres_settings(args.postgres)
    if "litellm" in names:
        meta["litellm"] = litellm_version(Path(args.litellm_venv))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"results -> {out}")
    print(f"reference mock + forwarder: {ref_label}")
    for n in notes:
        print(f"note: {n}")

    results_path = out / "results.jsonl"
    results_path.write_text("")
    (out / "money.jsonl").unlink(missing_ok=True)
    upstream = procs.start([*mock_command(ref, args.obfuscation), "--port", str(ports["upstream"]),
                            "--chunks", str(args.chunks), "--chunk-delay-ms", str(args.chunk_delay_ms)],
                           cpus=args.load_cpus, log=out / "upstream.log")
    bench = Bench(args, out, meta, ref, upstream, up, ports, workers_target)
    money_ok = True
    try:
        wait_http(f"{up}/health", upstream, 20)
        # LiteLLM on its own, after the others: its background work never lands in their cells
        together = [n for n in names if n != "litellm"]
        alone = [[n] for n in names if n == "litellm"]
        for rnd in range(1, args.rounds + 1):
            for group in [together, *alone]:
                money_ok &= bench.round_of(group, names, rnd, scenarios, conns, results_path)
    finally:
        bench.stop_all()
        procs.stop(upstream)

    print()
    print(render(out, args.write_doc, Path(args.doc)))
    print(f"results: {out}/ (report.md, PERFORMANCE.md, results.jsonl, money.jsonl, logs)")
    if args.write_doc:
        print(f"wrote {args.doc}")
    if any(name.startswith("apibox") for name in names):
        print(f"money check: {'OK' if money_ok else 'FAIL'}")
    return 0 if money_ok else 1


@dataclasses.dataclass
class Live:
    """A target started for a round, with what its money check needs."""

    name: str
    order: int
    target: Target
    proc: subprocess.Popen | None
    setup: apibox_target.ApiboxSetup | None
    log: Path
    db_pid: int | None
    tally: dict = dataclasses.field(default_factory=lambda: {"2xx": 0, "slack": 0, "status_errors": 0})
    failed: bool = False


class Bench:
    """One run's targets, started together for a round and measured cell by cell: in each cell
    (a scenario at a connection count) every target is loaded in turn, back to back, so a ratio
    compares runs a few seconds apart, not minutes (this machine's speed drifts by 10-20% over
    a quarter of an hour)."""

    def __init__(self, args: argparse.Namespace, out: Path, meta: dict, ref: Path, upstream: subprocess.Popen,
                 up: str, ports: dict, workers_target: str | None) -> None:
        self.args, self.out, self.meta, self.ref, self.up, self.ports = args, out, meta, ref, up, ports
        self.upstream = upstream
        self.workers_target = workers_target
        self.live: list[Live] = []

    def round_of(self, names: list[str], order_of: list[str], rnd: int, scenarios: list[str], conns: list[int],
                 results_path: Path) -> bool:
        """Start ``names``, measure every cell, profile apibox (round 1), stop them and audit the
        money; False when an apibox target failed or its money check did."""
        money_ok = True
        for name in names:
            money_ok &= self._start(name, order_of.index(name), rnd)
        for sc in scenarios:
            for c in conns:
                for live in self.live:
                    if not live.failed:
                        money_ok &= self._measure(live, rnd, sc, c, results_path)
        if self.args.profile and rnd == 1:
            for live in self.live:
                if live.name == "apibox" and not live.failed and live.proc is not None:
                    profile(live.target, live.proc, scenarios, self.args, self.out, live.tally)
        for live in list(self.live):
            money_ok &= self._finish(live, rnd)
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=2))
        return money_ok

    def _start(self, name: str, order: int, rnd: int) -> bool:
        args, py, up = self.args, sys.executable, self.up
        setup = None
        if name == "direct":
            t = Target("direct", up + CHAT)
        elif name == "bare":
            t = Target("bare", f"http://127.0.0.1:{self.ports['bare']}{CHAT}",
                       cmd=[py, str(self.ref / "bare_proxy.py"), "--port", str(self.ports["bare"]), "--upstream", up])
        elif name == "litellm":
            t = litellm_target(args, self.out, up + "/v1")
        else:
            setup = apibox_target.prepare(
                self.out / f"{name}-round{rnd}", up + "/v1", self.ports[name],
                postgres=args.postgres if name == "apibox-pg" else None,
                workers=args.workers if name == self.workers_target else 1)
            one_process = name != self.workers_target  # else a scrape reaches any of the workers
            t = Target(name, f"http://127.0.0.1:{self.ports[name]}{CHAT}", cmd=setup.serve_cmd(),
                       headers={"Authorization": f"Bearer {setup.key}"}, ready_timeout=60, stop_grace=45,
                       cwd=setup.workdir,
                       metrics_url=f"http://127.0.0.1:{self.ports[name]}/metrics" if one_process else None)
        db_pid = apibox_target.postgres_server_pid(args.postgres) if name == "apibox-pg" else None
        live = Live(name, order, t, None, setup, self.out / f"{name}-round{rnd}.log", db_pid)
        self.live.append(live)
        started = time.monotonic()
        try:
            if t.cmd:
                cpus = args.workers_cpus if name == self.workers_target else args.proxy_cpus
                live.proc = procs.start(t.cmd, cpus=cpus, log=live.log, env=t.env, cwd=t.cwd)
            live.tally["2xx"] += wait_ready(t, live.proc)
            v, n2xx = validate(t, args.chunks)
            live.tally["2xx"] += n2xx
            self.meta["validation"].append({"round": rnd, "target": name, **v})
            print(f"[round {rnd}] {name}: ready in {time.monotonic() - started:.1f} s; {v}", flush=True)
        except Exception as exc:  # record it and go on with the other targets
            return self._failed(live, rnd, exc)
        return True

    def _measure(self, live: Live, rnd: int, sc: str, c: int, results_path: Path) -> bool:
        args, upstream = self.args, self.upstream
        direct = live.target.cmd is None
        if direct and args.proxy_cpus:  # direct: the upstream serves from the gateway's CPU
            procs.pin_group(upstream.pid, args.proxy_cpus)
        try:
            r = measure(live.target, live.proc, upstream, sc == "sse", c, args, self.out, live.tally, live.db_pid)
        except Exception as exc:
            return self._failed(live, rnd, exc)
        finally:
            if direct and args.load_cpus:
                procs.pin_group(upstream.pid, args.load_cpus)
        r.update(round=rnd, order=live.order, target=live.name, scenario=sc, conns=c)
        with results_path.open("a") as fh:
            fh.write(json.dumps(r) + "\n")
        print(f"  {live.name:9s} {sc:4s} c={c:<4d} rps={r.get('rps', 0):9.1f} "
              f"p50={r.get('lat_p50_ms', 0):8.2f} ms p99={r.get('lat_p99_ms', 0):8.2f} ms "
              f">=400={r.get('err_status', 0)} sock={socket_errors(r)} "
              f"cpu tgt/up/wrk/other={r['cpu_target_pct']}/{r['cpu_upstream_pct']}/"
              f"{r['cpu_wrk_pct']}/{r['cpu_other_pct']}%", flush=True)
        return True

    def _failed(self, live: Live, rnd: int, exc: Exception) -> bool:
        print(f"[round {rnd}] {live.name}: FAILED: {exc}", flush=True)
        self.meta["notes"].append(f"round {rnd}, {live.name}: FAILED: {exc}")
        live.failed = True
        return live.setup is None

    def _finish(self, live: Live, rnd: int) -> bool:
        """Stop the target; for apibox, audit the money it moved."""
        self.live.remove(live)
        if live.proc is not None:
            code = procs.stop(live.proc, live.target.stop_grace)
            if live.setup is not None and code not in (0, None):
                self.meta["notes"].append(f"round {rnd}: {live.name} exited with code {code} on SIGTERM")
        if live.setup is None:
            return True
        ok = audit(live.setup, live.name, rnd, live.tally, live.log, self.out, self.meta)
        if live.name == "apibox-pg":
            apibox_target.drop_postgres_database(self.args.postgres, live.setup.database_url)
        return ok

    def stop_all(self) -> None:
        """After an interruption: stop whatever is still running."""
        for live in reversed(self.live):
            if live.proc is not None:
                procs.stop(live.proc)
        self.live.clear()


def profile(t: Target, proc: subprocess.Popen, scenarios: list[str], args: argparse.Namespace, out: Path,
            tally: dict) -> None:
    """py-spy on the gateway while wrk loads it at 32 connections, per scenario; not measured (py-spy
    samples 200 times a second from its own process, on the load CPU)."""
    for sc in scenarios:
        raw = out / f"profile-{sc}.txt"
        spy = subprocess.Popen([*(["taskset", "-c", args.load_cpus] if args.load_cpus else []), "py-spy", "record",
                                "--pid", str(proc.pid), "--rate", "200", "--duration", str(round(PROFILE_SECONDS)),
                                "--nonblocking", "--format", "raw", "--output", str(raw)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        r = run_wrk(t, sc == "sse", 32, PROFILE_SECONDS - 1, args.load_cpus, out / "profile.json", args.wrk_timeout)
        tally["2xx"] += two_xx(r)
        tally["slack"] += 32 + socket_errors(r)
        tally["status_errors"] += r.get("err_status", 0)
        try:
            spy.wait(PROFILE_SECONDS + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
        print(f"  profiled apibox {sc}: {raw}" if raw.exists() else f"  py-spy wrote no profile for {sc}", flush=True)


def audit(setup: apibox_target.ApiboxSetup, target: str, rnd: int, tally: dict, log: Path, out: Path,
          meta: dict) -> bool:
    m = apibox_target.money_check(setup, client_2xx=tally["2xx"], slack=tally["slack"])
    m["round"], m["target"] = rnd, target
    m["client_status_errors"] = tally["status_errors"]
    logs = log_summary(log)
    m["lines"] = apibox_target.money_lines(m)
    m["log"] = logs
    if tally["status_errors"]:
        meta["notes"].append(f"round {rnd}: clients got {tally['status_errors']} answers with status >= 400 "
                             f"from {target} (warm-ups included)")
    if logs["warnings"] or logs["errors"]:
        meta["notes"].append(f"round {rnd}: {target} logged {logs['warnings']} warnings and {logs['errors']} errors; "
                             f"first: {logs['samples'][:2]}")
    with (out / "money.jsonl").open("a") as fh:
        fh.write(json.dumps(m) + "\n")
    print(f"[round {rnd}] {target} money audit:")
    for line in m["lines"]:
        print(f"    {line}")
    return bool(m["ok"])
