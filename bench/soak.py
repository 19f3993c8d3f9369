"""Memory soak (issue 7): 100,000 requests, half streamed, through one `apibox serve`, RSS sampled.

    python -m bench.soak                       # 100,000 requests, 16 + 16 connections (~3 minutes)
    python -m bench.soak --requests 20000      # a quicker look

The mock upstream and apibox (SQLite, billing on) start as in ``python -m bench``; two wrk
processes, one asking for streams and one not, run in slices of a few seconds until the
requests are served. The gateway's resident memory is read every second. Warm-up is the first
10% of the requests: growth is measured from the RSS at its end to the highest RSS after it,
and the issue asks for under 10%. After the run the books are audited (`apibox db check`,
charged total == usage total). Results go to bench/results/soak-<stamp>/ and, with
``--write-doc``, into docs/PERFORMANCE.md between the soak markers.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

from bench import apibox_target, procs
from bench.harness import CHAT, HERE, REPO, Target, mock_command, reference_dir, run_wrk, two_xx, wait_http, wait_ready

DOC = REPO / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"


class Sampler(threading.Thread):
    """The gateway's RSS (every process of its group) once a second, with the requests served by then."""

    def __init__(self, pgid: int) -> None:
        super().__init__(daemon=True)
        self.pgid = pgid
        self.samples: list[tuple[float, int, float]] = []  # (seconds, requests so far, RSS MB)
        self.served = 0
        self.halt = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            self.samples.append((time.monotonic() - self.start_time, self.served, procs.group_rss_mb(self.pgid)))


def soak(args: argparse.Namespace) -> dict:
    out = HERE / "results" / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    ref, _ = reference_dir(None)
    up = f"http://127.0.0.1:{args.port_base}"
    upstream = procs.start([*mock_command(ref, padded=False), "--port", str(args.port_base),
                            "--chunks", "20"], cpus=args.load_cpus, log=out / "upstream.log")
    gateway = None
    try:
        wait_http(f"{up}/health", upstream, 20)
        setup = apibox_target.prepare(out / "apibox", up + "/v1", args.port_base + 10)
        target = Target("apibox", f"http://127.0.0.1:{args.port_base + 10}{CHAT}",
                        headers={"Authorization": f"Bearer {setup.key}"})
        gateway = procs.start(setup.serve_cmd(), cpus=args.proxy_cpus, log=out / "apibox.log", cwd=setup.workdir)
        wait_ready(target, gateway)
        sampler = Sampler(gateway.pid)
        sampler.start()
        totals = {"2xx": 0, "requests": 0, "slices": 0}
        while totals["2xx"] < args.requests:
            slices: dict[bool, dict] = {}

            def load(stream: bool, slices: dict[bool, dict] = slices) -> None:
                slices[stream] = run_wrk(target, stream, args.conns, args.slice, args.load_cpus,
                                         out / f"wrk-{int(stream)}.json", 30)
            threads = [threading.Thread(target=load, args=(stream,)) for stream in (False, True)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            totals["2xx"] += sum(two_xx(r) for r in slices.values())
            totals["requests"] += sum(r.get("requests", 0) for r in slices.values())
            totals["slices"] += 1
            sampler.served = totals["2xx"]
            print(f"  {totals['2xx']:>7} requests served, RSS {procs.group_rss_mb(gateway.pid):.1f} MB", flush=True)
        sampler.halt.set()
        sampler.join()
        procs.stop(gateway, grace=45)
        gateway = None
        # wrk gives up on what is in flight when a slice ends: the gateway served (and billed) those too
        money = apibox_target.money_check(setup, client_2xx=totals["2xx"], slack=totals["slices"] * 2 * args.conns)
    finally:
        if gateway is not None:
            procs.stop(gateway, grace=45)
        procs.stop(upstream)
    warm = args.requests // 10
    after = [rss for _, served, rss in sampler.samples if served >= warm]
    warm_rss = after[0] if after else float("nan")
    result = {"requests": totals["2xx"], "non_2xx": totals["requests"] - totals["2xx"], "conns": args.conns,
              "warmup_requests": warm, "rss_after_warmup_mb": round(warm_rss, 1),
              "rss_peak_after_warmup_mb": round(max(after), 1) if after else None,
              "rss_end_mb": round(sampler.samples[-1][2], 1) if sampler.samples else None,
              "growth_pct": round((max(after) - warm_rss) / warm_rss * 100, 1) if after else None,
              "seconds": round(sampler.samples[-1][0], 1) if sampler.samples else None,
              "money_ok": bool(money.get("ok")), "money": money, "samples": sampler.samples}
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "money")}, indent=2))
    print(f"results -> {out}")
    return result


def doc_section(result: dict, command: str) -> str:
    every = max(1, len(result["samples"]) // 12)
    rows = "\n".join(f"| {served:,} | {rss:.1f} |" for _, served, rss in result["samples"][::every])
    verdict = "under" if result["growth_pct"] is not None and result["growth_pct"] < 10 else "NOT under"
    return "\n".join([
        BEGIN,
        "## Memory soak",
        "",
        f"`{command}`: {result['requests']:,} requests (half streamed, {result['conns']} + {result['conns']} "
        f"connections) through one `apibox serve` on SQLite in {result['seconds']} s; the gateway's RSS read every "
        "second. Warm-up is the first 10% of the requests.",
        "",
        f"- RSS at the end of warm-up: {result['rss_after_warmup_mb']} MB; highest after it: "
        f"{result['rss_peak_after_warmup_mb']} MB; at the end: {result['rss_end_mb']} MB.",
        f"- Growth after warm-up: {result['growth_pct']}% ({verdict} the 10% the issue allows).",
        f"- Money after the run: {'OK' if result['money_ok'] else 'NOT OK'} (db check, charged == usage).",
        "",
        "| requests served | RSS MB |",
        "|---:|---:|",
        rows,
        END,
    ])


def write_doc(section: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOC.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests to serve (default 100,000)")
    parser.add_argument("--conns", type=int, default=16, help="connections per wrk (one streams, one not)")
    parser.add_argument("--slice", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--port-base", type=int, default=18300, help="mock upstream port; apibox +10")
    parser.add_argument("--proxy-cpus", default="0", help="CPUs for apibox ('' for no pinning)")
    parser.add_argument("--load-cpus", default="1", help="CPUs for wrk and the mock ('' for no pinning)")
    parser.add_argument("--write-doc", action="store_true", help="put the result into docs/PERFORMANCE.md")
    args = parser.parse_args(argv)
    args.proxy_cpus, args.load_cpus = args.proxy_cpus or None, args.load_cpus or None
    result = soak(args)
    if args.write_doc:
        write_doc(doc_section(result, "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:])))
        print(f"wrote {DOC}")
    return 0 if result["money_ok"] and result["growth_pct"] is not None else 1


if __name__ == "__main__":
    raise SystemExit(main())
