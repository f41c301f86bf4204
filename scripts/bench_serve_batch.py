#!/usr/bin/env python3
"""Serving benchmark with batching: `claw serve --parallel N` vs llama.cpp's own C++
server, `llama-server --parallel N` (continuous batching), on the same GGUF.

Called by `scripts/bench-serve --peer llama-server` (which builds llama-server with
scripts/build-llama-server and owns the claw binary); run that script rather than
this file. Standard library only.

For each concurrency level N (default 1, 4, 8, 16) each engine gets a fresh server
sized for N:
  claw          claw serve --parallel N --threads T [--no-record]
  llama-server  llama-server --parallel N -c N*CTX --threads T --threads-batch T
                (CTX = --ctx-per-request: every slot holds one whole request)
Only one server runs at a time: it is started, warmed up with one request, loaded
with N client threads that send the same chat request back to back (non-streaming,
temperature 0, seed 1, max_tokens --tokens, ignore_eos true unless --stop-at-eos)
until --requests requests are answered, and stopped before the next one starts.
Engines alternate order from level to level and round to round (--rounds), so the
slow drift of a shared machine hits both alike; rounds are pooled.

Both servers keep a prompt cache (claw --prefix-cache-mb, llama-server
cache_prompt): every request has the same ~60-token prompt, so after the first one
both mostly skip its prefill. The numbers are decode under concurrency.

Reported per level and engine:
  tok/s        completion tokens of the level / wall time of the level (aggregate)
  p50 / p99    seconds from sending a request to the end of its response
  tok/reply    mean completion tokens a reply (should be --tokens on both: a note
               says when not, e.g. a stop at EOS)
  replies      distinct reply texts (greedy: usually 1 a level; batching may
               perturb the last bits of the logits, so 2-3 are not an error)
and the ratios claw / llama-server of tok/s (>1: claw faster) and of p50, p99
(<1: claw faster).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

SYSTEM = "You are a helpful assistant. Answer clearly and in detail."
USER = (
    "I am planning a week-long trip to Japan in the spring. Suggest a day-by-day "
    "itinerary for Tokyo, Kyoto and Osaka, and explain how to travel between them."
)
ENGINES = ["claw", "llama-server"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class ServerProcess:
    """A server child process, its output in WORKDIR/NAME.log, ready when
    GET `health` answers 200 (llama-server answers 503 while it loads)."""

    def __init__(self, name, cmd, port, workdir, health):
        self.name, self.port, self.health = name, port, health
        self.cmd = cmd
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout=600):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited at start (rc {self.proc.returncode});"
                                 f" log {self.log_path}:\n{self.tail()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", self.health)
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start in {timeout}s; log {self.log_path}")

    def tail(self, n=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def log_text(self):
        self.log_file.flush()
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def get_json(self, path):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        c.request("GET", path)
        r = c.getresponse()
        data = r.read()
        c.close()
        return json.loads(data) if r.status == 200 else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def start(engine, args, n, workdir, tag):
    port = free_port()
    if engine == "claw":
        cmd = [args.claw, "serve", "--model", args.model, "--port", str(port),
               "--dir", os.path.join(workdir, f"claw-data-{tag}"),
               "--threads", str(args.threads), "--parallel", str(n),
               "--queue", str(max(256, 2 * n)),
               "--max-tokens-limit", str(max(args.tokens, 16))]
        if args.claw_no_record:
            cmd.append("--no-record")
        cmd += args.claw_arg
        s = ServerProcess(f"claw-{tag}", cmd, port, workdir, "/healthz")
    else:
        cmd = [args.llama_server, "--model", args.model, "--host", "127.0.0.1",
               "--port", str(port), "--threads", str(args.threads),
               "--threads-batch", str(args.threads), "--parallel", str(n),
               "--ctx-size", str(n * args.ctx_per_request)]
        cmd += args.llama_arg
        s = ServerProcess(f"llama-server-{tag}", cmd, port, workdir, "/health")
    s.wait_ready()
    return s


def request_body(args):
    body = {
        "model": "bench",
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": USER}],
        "max_tokens": args.tokens,
        "temperature": 0,
        "seed": 1,
    }
    if not args.stop_at_eos:
        body["ignore_eos"] = True
    return json.dumps(body).encode()


def run_level(port, body, concurrency, total):
    """`concurrency` threads, one keep-alive connection each, until `total` requests
    are answered. Returns dict(lat, tok, texts, finish, wall, errors)."""
    lock = threading.Lock()
    left = [total]
    out = {"lat": [], "tok": [], "texts": [], "finish": [], "errors": []}

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/v1/chat/completions", body,
                             {"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
            except OSError as e:
                with lock:
                    out["errors"].append(str(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
                continue
            dt = time.perf_counter() - t0
            if r.status != 200:
                with lock:
                    out["errors"].append(f"HTTP {r.status}: {data[:200]!r}")
                continue
            reply = json.loads(data)
            choice = reply["choices"][0]
            with lock:
                out["lat"].append(dt)
                out["tok"].append(reply["usage"]["completion_tokens"])
                out["texts"].append(choice["message"].get("content") or "")
                out["finish"].append(choice.get("finish_reason"))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.perf_counter() - t0
    return out


def check_llama_server(server, n, args):
    """What llama-server says it runs: slots, per-slot context, sampling of a slot."""
    info = {}
    m = re.search(r"n_slots = (\d+), n_ctx_slot = (\d+)", server.log_text())
    if m:
        info["n_slots"], info["n_ctx_slot"] = int(m.group(1)), int(m.group(2))
        if info["n_slots"] != n:
            log(f"bench-serve: WARNING llama-server runs {info['n_slots']} slots, not {n}")
    slots = server.get_json("/slots")
    if isinstance(slots, list) and slots:
        used = [sl for sl in slots if sl.get("params")]
        params = used[0]["params"] if used else {}
        info.setdefault("n_slots", len(slots))
        info.setdefault("n_ctx_slot", slots[0].get("n_ctx"))
        info["temperature"] = params.get("temperature")
        info["ignore_eos"] = params.get("ignore_eos")
        info["n_predict"] = params.get("n_predict", params.get("max_tokens"))
        info["samplers"] = params.get("samplers")
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--claw", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--levels", default="1,4,8,16")
    ap.add_argument("--requests-per-level", default="4,8,16,32")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--ctx-per-request", type=int, default=0,
                    help="llama-server context per slot (0: tokens + 256, rounded up to 256)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="do not send ignore_eos: replies may stop early at EOS")
    ap.add_argument("--claw-no-record", action="store_true")
    ap.add_argument("--claw-arg", action="append", default=[],
                    help="extra argument for claw serve (repeat)")
    ap.add_argument("--llama-arg", action="append", default=[],
                    help="extra argument for llama-server (repeat)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    totals = [int(x) for x in args.requests_per_level.split(",")]
    if len(totals) == 1:
        totals = totals * len(levels)
    if len(totals) != len(levels):
        raise SystemExit("--requests needs one number or one per level")
    if args.ctx_per_request <= 0:
        args.ctx_per_request = -(-(args.tokens + 256) // 256) * 256

    load_before = os.getloadavg()[0]
    workdir = tempfile.mkdtemp(prefix="claw-bench-batch-")
    body = request_body(args)
    res = {e: {n: {"lat": [], "tok": [], "texts": [], "finish": [], "errors": [], "wall": 0.0}
               for n in levels} for e in ENGINES}
    checks = {}
    step = 0
    log(f"bench-serve: work dir {workdir}; servers run one at a time")
    try:
        for rnd in range(args.rounds):
            for n, total in zip(levels, totals):
                order = ENGINES if step % 2 == 0 else ENGINES[::-1]
                step += 1
                for e in order:
                    tag = f"r{rnd + 1}-n{n}"
                    server = start(e, args, n, workdir, tag)
                    try:
                        warm = run_level(server.port, body, 1, 1)
                        if warm["errors"]:
                            raise SystemExit(f"{e} warm-up failed: {warm['errors'][0]}\n"
                                             + server.tail())
                        if e == "llama-server" and n not in checks:
                            checks[n] = check_llama_server(server, n, args)
                        got = run_level(server.port, body, n, total)
                    finally:
                        server.stop()
                    r = res[e][n]
                    for k in ("lat", "tok", "texts", "finish", "errors"):
                        r[k] += got[k]
                    r["wall"] += got["wall"]
                    tps = sum(got["tok"]) / got["wall"] if got["wall"] else 0
                    p50 = percentile(got["lat"], 50)
                    log(f"bench-serve: round {rnd + 1} N={n:<2} {e:12s} {len(got['lat'])} req"
                        f"{' (%d errors)' % len(got['errors']) if got['errors'] else ''}"
                        f"  p50 {p50 if p50 is not None else float('nan'):.3f}s"
                        f"  {tps:.1f} tok/s")
    finally:
        load_after = os.getloadavg()[0]
    shutil.rmtree(workdir, ignore_errors=True)

    summary = {"model": os.path.basename(args.model), "tokens": args.tokens,
               "ignore_eos": not args.stop_at_eos, "threads": args.threads,
               "rounds": args.rounds, "ctx_per_request": args.ctx_per_request,
               "claw_record": not args.claw_no_record, "cpus": os.cpu_count(),
               "load_before": load_before, "load_after": load_after,
               "llama_server_checks": checks, "levels": {}}
    for n in levels:
        row = {}
        for e in ENGINES:
            r = res[e][n]
            ntok = sum(r["tok"])
            finish = {}
            for f in r["finish"]:
                finish[str(f)] = finish.get(str(f), 0) + 1
            row[e] = {
                "requests": len(r["lat"]), "errors": len(r["errors"]),
                "first_error": r["errors"][0] if r["errors"] else None,
                "p50_s": percentile(r["lat"], 50), "p99_s": percentile(r["lat"], 99),
                "mean_s": statistics.mean(r["lat"]) if r["lat"] else None,
                "tok_s": ntok / r["wall"] if r["wall"] and ntok else None,
                "tokens_per_reply": ntok / len(r["tok"]) if r["tok"] else None,
                "distinct_replies": len(set(r["texts"])),
                "finish_reasons": finish,
            }
        c, l = row["claw"], row["llama-server"]

        def ratio(key):
            return c[key] / l[key] if c[key] and l[key] else None
        row["claw_over_llama"] = {"tok_s": ratio("tok_s"), "p50": ratio("p50_s"),
                                  "p99": ratio("p99_s")}
        summary["levels"][n] = row

    if args.json:
        print(json.dumps(summary, indent=2))
        return

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"
    print(f"model {summary['model']}, max_tokens {args.tokens} greedy"
          f"{', EOS ignored' if summary['ignore_eos'] else ', stops at EOS'}, "
          f"{args.threads} threads, {args.rounds} round(s) pooled; claw"
          f"{' recording' if summary['claw_record'] else ' --no-record'}, llama-server "
          f"-c N*{args.ctx_per_request}; {os.cpu_count()} CPUs, 1-min load "
          f"{load_before:.2f} before, {load_after:.2f} after")
    print()
    print("| clients | server | requests | tok/reply | replies | p50 s | p99 s | tok/s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in levels:
        for e in ENGINES:
            r = summary["levels"][n][e]
            err = f" ({r['errors']} errors)" if r["errors"] else ""
            print(f"| {n} | {e} | {r['requests']}{err} | {f(r['tokens_per_reply'], '.1f')} "
                  f"| {r['distinct_replies']} | {f(r['p50_s'], '.3f')} | {f(r['p99_s'], '.3f')} "
                  f"| {f(r['tok_s'], '.1f')} |")
    print()
    print("| clients | tok/s claw/llama.cpp | p50 claw/llama.cpp | p99 claw/llama.cpp |")
    print("|---:|---:|---:|---:|")
    for n in levels:
        q = summary["levels"][n]["claw_over_llama"]
        print(f"| {n} | **{f(q['tok_s'], '.2f')}** | {f(q['p50'], '.2f')} | {f(q['p99'], '.2f')} |")
    print()
    for n, info in checks.items():
        print(f"llama-server at N={n}: {info.get('n_slots')} slots x {info.get('n_ctx_slot')} "
              f"context; the warm-up ran with temperature {info.get('temperature')}, "
              f"ignore_eos {info.get('ignore_eos')}, n_predict {info.get('n_predict')}")
    for n in levels:
        for e in ENGINES:
            r = summary["levels"][n][e]
            t = r["tokens_per_reply"]
            if t is not None and abs(t - args.tokens) > 0.5:
                print(f"note: {e} at N={n} averaged {t:.1f} tokens a reply, not {args.tokens} "
                      f"(finish reasons {r['finish_reasons']})")
            if r["errors"]:
                print(f"note: {e} at N={n}: {r['errors']} errors, first: {r['first_error']}")


if __name__ == "__main__":
    main()
