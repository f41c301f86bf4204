#!/usr/bin/env python3
"""Serving benchmark: claw serve (recording on and off) vs llama-cpp-python's
OpenAI-compatible server, on the same GGUF, prompt and token count.

Called by scripts/bench-serve, which owns the virtualenv and the cargo build; run
that script rather than this file. Standard library only on the client side.

For each server and each concurrency level C (default 1, 4, 8), C client threads
send the same chat request back to back (non-streaming, greedy, max_tokens
--tokens; the prompt asks for a long answer, so replies run to max_tokens: a note
says so when a server's replies were shorter) until --requests-per-level requests
have been answered. EOS is not suppressed: llama-cpp-python's server can only do
that with logit_bias, which it applies in a Python logits processor on every
token and would slow it down unfairly. Reported per level:
  latency p50 / p99   seconds from sending a request to the end of its response
  tok/s               completion tokens of the level / wall time of the level
Servers run one at a time with the same thread count; the levels of the servers
are interleaved round by round (--rounds), so slow drift of a shared machine hits
all of them alike, and the rounds are pooled.

Recording overhead, claw (recording, the default) vs claw --no-record, measured
three ways:
  paired      --pairs rounds of one request to each (order alternating), one
              client: the median of the per-pair latency ratios - 1. Robust to a
              shared machine's drift, which the per-level numbers are not.
  levels      mean latency and tok/s of the two, pooled over the levels.
  recorder    CPU seconds of claw's recorder thread (Parquet encoding, zstd,
              fsync; /proc/PID/task) as a share of the server's CPU seconds.
"""

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

SYSTEM = "You are a helpful assistant. Answer clearly and in detail."
USER = (
    "I am planning a week-long trip to Japan in the spring. Suggest a day-by-day "
    "itinerary for Tokyo, Kyoto and Osaka, and explain how to travel between them."
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process with its stderr collected to a file."""

    def __init__(self, name, cmd, port, env=None, workdir=None):
        self.name = name
        self.port = port
        self.workdir = workdir
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited at start; log: {self.log_path}\n"
                                 + self.tail())
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/v1/models")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start in {timeout}s; log: {self.log_path}")

    def tail(self, n=20):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def request_body(args):
    return json.dumps({
        "model": "bench",
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
        ],
        "max_tokens": args.tokens,
        "temperature": 0,
        "seed": 1,
    }).encode()


def run_level(port, body, concurrency, total):
    """C threads, one keep-alive connection each, until `total` requests are
    answered. Returns (latencies, completion tokens, wall seconds, errors)."""
    lock = threading.Lock()
    state = {"left": total}
    latencies, tokens, errors = [], [], []

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        while True:
            with lock:
                if state["left"] <= 0:
                    break
                state["left"] -= 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except OSError as e:
                with lock:
                    errors.append(str(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                continue
            dt = time.perf_counter() - t0
            if r.status != 200:
                with lock:
                    errors.append(f"{r.status}: {data[:200]!r}")
                continue
            usage = json.loads(data)["usage"]
            with lock:
                latencies.append(dt)
                tokens.append(usage["completion_tokens"])
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return latencies, tokens, wall, errors


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def start_claw(args, name, record, workdir):
    port = free_port()
    data = os.path.join(workdir, name + "-data")
    cmd = [args.claw, "serve", "--model", args.model, "--dir", data, "--port", str(port),
           "--threads", str(args.threads), "--queue", "256", "--parallel", "1",
           "--max-tokens-limit", str(max(args.tokens, 16))]
    if not record:
        cmd.append("--no-record")
    return ServerProcess(name, cmd, port, workdir=workdir), data


def start_llamacpp(args, workdir):
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", args.model,
           "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
           "--n_ctx", "2048", "--n_batch", "512", "--verbose", "False"]
    return ServerProcess("llama.cpp", cmd, port, workdir=workdir)


def thread_cpu(pid):
    """CPU seconds per thread name of a process (Linux /proc; {} elsewhere)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        out[name] = out.get(name, 0.0) + cpu
    return out


def count_rows(claw, data_dir):
    """Rows and segments recorded by a stopped claw server (`claw inspect --json`)."""
    raw = os.path.join(data_dir, "raw")
    if not os.path.isdir(raw):
        return 0, 0
    p = subprocess.run([claw, "inspect", "--json", "--rows", "0", raw],
                       capture_output=True, text=True)
    if p.returncode != 0:
        log(f"bench-serve: claw inspect failed: {p.stderr.strip()}")
        return None, 0
    files = json.loads(p.stdout)["files"]
    return sum(f["rows"] for f in files), len(files)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--claw", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,8")
    ap.add_argument("--requests-per-level", default="6,12,16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    totals = [int(x) for x in args.requests_per_level.split(",")]
    if len(totals) == 1:
        totals = totals * len(levels)
    if len(totals) != len(levels):
        raise SystemExit("--requests-per-level needs one number or one per level")

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    workdir = tempfile.mkdtemp(prefix="claw-bench-serve-")
    engines = ["claw", "claw --no-record"] + ([] if args.no_llamacpp else ["llama.cpp"])
    # results[engine][level] = {"lat": [...], "tok": [...], "wall": float, "errors": [...]}
    results = {e: {c: {"lat": [], "tok": [], "wall": 0.0, "errors": []} for c in levels}
               for e in engines}
    servers = {}
    claw_data = None
    ratios, threads = [], {}
    try:
        log(f"bench-serve: starting servers (work dir {workdir})")
        servers["claw"], claw_data = start_claw(args, "claw", True, workdir)
        servers["claw"].wait_ready()
        servers["claw --no-record"], _ = start_claw(args, "claw-norecord", False, workdir)
        servers["claw --no-record"].wait_ready()
        if not args.no_llamacpp:
            servers["llama.cpp"] = start_llamacpp(args, workdir)
            servers["llama.cpp"].wait_ready()
        body = request_body(args)
        # Warm-up: one request each (page in weights, first allocations).
        for e in engines:
            run_level(servers[e].port, body, 1, 1)
        # Only one engine works at a time; the idle ones sleep in accept().
        for rnd in range(args.rounds):
            for c, total in zip(levels, totals):
                order = engines if rnd % 2 == 0 else list(reversed(engines))
                for e in order:
                    lat, tok, wall, errors = run_level(servers[e].port, body, c, total)
                    r = results[e][c]
                    r["lat"] += lat
                    r["tok"] += tok
                    r["wall"] += wall
                    r["errors"] += errors
                    log(f"bench-serve: round {rnd + 1} C={c} {e:17s} {len(lat)} req "
                        f"p50 {percentile(lat, 50):.3f}s  {sum(tok) / wall:.1f} tok/s")
        ratios = []
        on_port, off_port = servers["claw"].port, servers["claw --no-record"].port
        for i in range(args.pairs):
            order = [on_port, off_port] if i % 2 == 0 else [off_port, on_port]
            lat = {}
            for port in order:
                got, _, _, errors = run_level(port, body, 1, 1)
                if errors or not got:
                    raise SystemExit(f"paired request failed: {errors}")
                lat[port] = got[0]
            ratios.append(lat[on_port] / lat[off_port])
        if ratios:
            log(f"bench-serve: {len(ratios)} pairs, median on/off latency ratio "
                f"{statistics.median(ratios):.4f}")
        threads = thread_cpu(servers["claw"].proc.pid)
    finally:
        for s in servers.values():
            s.stop()
    recorded, segments = count_rows(args.claw, claw_data) if claw_data else (None, 0)

    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    summary = {"model": os.path.basename(args.model), "tokens": args.tokens,
               "threads": args.threads, "rounds": args.rounds, "cpus": os.cpu_count(),
               "load_before": load_before, "load_after": load_after, "levels": {}}
    for c in levels:
        row = {}
        for e in engines:
            r = results[e][c]
            n_tok = sum(r["tok"])
            row[e] = {
                "requests": len(r["lat"]),
                "errors": len(r["errors"]),
                "p50_s": percentile(r["lat"], 50),
                "p99_s": percentile(r["lat"], 99),
                "mean_s": statistics.mean(r["lat"]) if r["lat"] else None,
                "tok_s": n_tok / r["wall"] if r["wall"] else None,
                "tokens_per_reply": (n_tok / len(r["tok"])) if r["tok"] else None,
            }
        summary["levels"][c] = row

    def pooled(e, key):
        return [summary["levels"][c][e][key] for c in levels]

    on, off = "claw", "claw --no-record"
    lat_on = sum(statistics.mean(results[on][c]["lat"]) for c in levels)
    lat_off = sum(statistics.mean(results[off][c]["lat"]) for c in levels)
    tps_on, tps_off = sum(pooled(on, "tok_s")), sum(pooled(off, "tok_s"))
    recorder_cpu = threads.get("claw-recorder", 0.0)
    server_cpu = sum(threads.values())
    summary["recording_overhead"] = {
        "paired_pairs": len(ratios),
        "paired_latency_pct": 100 * (statistics.median(ratios) - 1) if ratios else None,
        "recorder_cpu_s": recorder_cpu,
        "server_cpu_s": server_cpu,
        "recorder_cpu_pct": 100 * recorder_cpu / server_cpu if server_cpu else None,
        "latency_pct": 100 * (lat_on / lat_off - 1),
        "throughput_pct": 100 * (1 - tps_on / tps_off),
        "rows_recorded": recorded,
        "requests_answered": sum(len(results[on][c]["lat"]) for c in levels) + 1 + len(ratios),
        "segments": segments,
    }
    if not args.no_llamacpp:
        summary["claw_vs_llamacpp_tok_s"] = {
            c: summary["levels"][c][on]["tok_s"] / summary["levels"][c]["llama.cpp"]["tok_s"]
            for c in levels
        }
    shutil.rmtree(workdir, ignore_errors=True)

    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"model {summary['model']}, max_tokens {args.tokens} (greedy), "
          f"{args.threads} threads, {args.rounds} round(s) pooled; {os.cpu_count()} CPUs, "
          f"1-min load average {load_before:.2f} before, {load_after:.2f} after")
    print()
    print("| clients | server | requests | p50 s | p99 s | tok/s | tok/s vs llama.cpp |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for c in levels:
        for e in engines:
            r = summary["levels"][c][e]
            ratio = ""
            if not args.no_llamacpp:
                ratio = f"{r['tok_s'] / summary['levels'][c]['llama.cpp']['tok_s']:.2f}"
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            print(f"| {c} | {e} | {r['requests']}{err} | {r['p50_s']:.3f} | {r['p99_s']:.3f} "
                  f"| {r['tok_s']:.1f} | {ratio} |")
    o = summary["recording_overhead"]
    print()
    print("recording overhead (claw vs claw --no-record):")
    if o["paired_latency_pct"] is not None:
        print(f"  paired, 1 client:  latency {o['paired_latency_pct']:+.2f}% "
              f"(median of {o['paired_pairs']} alternating pairs)")
    if o["recorder_cpu_pct"] is not None:
        print(f"  recorder thread:   {o['recorder_cpu_s']:.2f} CPU s of the server's "
              f"{o['server_cpu_s']:.1f} ({o['recorder_cpu_pct']:.2f}%)")
    print(f"  levels pooled:     mean latency {o['latency_pct']:+.2f}%, "
          f"tok/s {-o['throughput_pct']:+.2f}% (noisy on a shared machine)")
    print(f"  rows recorded {o['rows_recorded']} for {o['requests_answered']} answered "
          f"requests, in {o['segments']} segment(s)")
    for c in levels:
        for e in engines:
            t = summary["levels"][c][e]["tokens_per_reply"]
            if t is not None and abs(t - args.tokens) > 0.5:
                print(f"note: {e} at C={c} averaged {t:.1f} tokens a reply, not {args.tokens}")


if __name__ == "__main__":
    main()
