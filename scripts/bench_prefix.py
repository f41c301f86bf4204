#!/usr/bin/env python3
"""Prefix cache benchmark: time to first token of an agent-like conversation's
turn 2 (the long shared prefix cached) vs its turn 1 (nothing cached), on
`claw serve` (its prefix cache) and, with --llama-server, on llama.cpp's own
`llama-server` (its prompt cache, cache_prompt: true).

Called by scripts/bench-prefix (which owns the cargo build and builds llama-server);
standard library only.

The conversation: a system prompt of about --prefix-tokens tokens (a tool
catalogue, as agents send), a short user message; turn 2 re-sends all of it plus
the assistant's turn-1 reply (each server's own) and a short new user message, as
an agent does. Each round uses a fresh system prompt (a different session number
near its start), so its turn 1 finds only the chat template's first few tokens
cached. Requests stream, greedy; time to first token is measured at the client
from sending the request to the first non-empty content delta. The server's own
prefill time and cached/prefilled counts come from claw's -v log and from
llama-server's `timings` (prompt_ms, cache_n, prompt_n). Servers are started once
and stay up; within a round the engines take turns (order alternating by round),
so only one of them works at a time. llama-server runs --parallel 1 (one slot
holds the conversation) with -c --llama-ctx (0 = the model's training context).
With --baseline, the same turn 2 is also sent to a claw server started with
--prefix-cache-mb 0 (what turn 2 cost before the cache).
"""

import argparse
import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

LOG_LINE = re.compile(
    r"request (chatcmpl-\S+): (\d+) prompt tokens \((\d+) cached, (\d+) prefilled in ([0-9.]+) s"
)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def catalogue(session, approx_tokens):
    """A system prompt like an agent's: rules and a JSON tool catalogue."""
    parts = [f"Session {session}. You are a coding agent. Use the tools below.\n"]
    i = 0
    # ~4 characters a token for this kind of English and JSON.
    while sum(len(p) for p in parts) < approx_tokens * 4:
        tool = {
            "name": f"tool_{i}_{['read', 'write', 'search', 'run', 'list'][i % 5]}",
            "description": f"Tool number {i}: performs step {i} of the workflow on the "
                           f"given path and returns a short report of what changed.",
            "parameters": {"type": "object", "properties": {
                "path": {"type": "string", "description": "file or directory"},
                "limit": {"type": "integer", "description": f"at most {i + 10} items"}},
                "required": ["path"]},
        }
        parts.append(json.dumps(tool) + "\n")
        i += 1
    return "".join(parts)


class Server:
    """A claw serve (kind "claw") or llama-server (kind "llama") child process."""

    def __init__(self, args, name, workdir, kind="claw", cache_mb=None):
        self.name, self.kind = name, kind
        self.port = free_port()
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        if kind == "claw":
            cmd = [args.claw, "-v", "serve", "--model", args.model, "--no-record",
                   "--dir", os.path.join(workdir, name), "--port", str(self.port),
                   "--threads", str(args.threads), "--prefix-cache-mb", str(cache_mb)]
            health = "/healthz"
        else:
            cmd = [args.llama_server, "--model", args.model, "--host", "127.0.0.1",
                   "--port", str(self.port), "--threads", str(args.threads),
                   "--threads-batch", str(args.threads), "--parallel", "1",
                   "--ctx-size", str(args.llama_ctx)] + args.llama_arg
            health = "/health"
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log_file.flush()
                with open(self.log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-15:])
                raise SystemExit(f"{name} exited at start; see {self.log_path}\n{tail}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", health)
                ok = c.getresponse().status == 200
                c.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{name} did not start; see {self.log_path}")

    def chat(self, messages, tokens):
        """Streams one greedy reply: dict(ttft, total, text, prompt_tokens,
        cached_tokens, prefill_s)."""
        req = {"messages": messages, "max_tokens": tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
        if self.kind == "llama":
            req["cache_prompt"] = True  # the default; said explicitly
        body = json.dumps(req)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"{self.name}: HTTP {r.status}: {r.read()[:500]!r}")
        ttft, text, usage, rid, timings = None, [], None, None, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk.get("id", rid)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
        total = time.perf_counter() - t0
        conn.close()
        usage = usage or {}
        out = {"ttft": ttft if ttft is not None else total, "total": total,
               "text": "".join(text), "prompt_tokens": usage.get("prompt_tokens"),
               "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens")}
        if self.kind == "llama":
            if timings:
                out["prefill_s"] = timings.get("prompt_ms", float("nan")) / 1000
                if out["cached_tokens"] is None:
                    out["cached_tokens"] = timings.get("cache_n")
                if out["prompt_tokens"] is None and "prompt_n" in timings:
                    out["prompt_tokens"] = timings["prompt_n"] + timings.get("cache_n", 0)
            else:
                out["prefill_s"] = float("nan")
        else:
            out["prefill_s"] = self.prefill_s(rid)
        return out

    def prefill_s(self, rid):
        """claw's prefill time for request `rid` (from its -v log line)."""
        self.log_file.flush()
        for _ in range(50):
            with open(self.log_path) as f:
                for m in LOG_LINE.finditer(f.read()):
                    if m.group(1) == rid:
                        return float(m.group(5))
            time.sleep(0.1)
        return float("nan")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def conversation(server, system, tokens):
    """Turn 1 and turn 2 on one server: (turn1 result, turn2 result, turn2 messages)."""
    turn1 = [{"role": "system", "content": system},
             {"role": "user", "content": "List the files under src/ and say what "
                                         "each one does."}]
    t1 = server.chat(turn1, tokens)
    turn2 = turn1 + [{"role": "assistant", "content": t1["text"]},
                     {"role": "user", "content": "Now open the largest one."}]
    t2 = server.chat(turn2, tokens)
    return t1, t2, turn2


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--claw", required=True)
    ap.add_argument("--llama-server", help="llama-server binary: also measure llama.cpp")
    ap.add_argument("--llama-ctx", type=int, default=0,
                    help="llama-server -c (0: the model's training context)")
    ap.add_argument("--llama-arg", action="append", default=[],
                    help="extra argument for llama-server (repeat)")
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of each reply")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-mb", type=int, default=1024)
    ap.add_argument("--baseline", action="store_true",
                    help="also time turn 2 on a claw server without the prefix cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    engines = ["claw"] + (["llama.cpp"] if args.llama_server else [])
    results = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="claw-bench-prefix-") as workdir:
        servers = {}
        try:
            servers["claw"] = Server(args, "claw", workdir, "claw", args.cache_mb)
            if args.llama_server:
                servers["llama.cpp"] = Server(args, "llama-server", workdir, "llama")
            baseline = (Server(args, "claw-nocache", workdir, "claw", 0)
                        if args.baseline else None)
            if baseline:
                servers["claw-nocache"] = baseline
            # Warm-up (page in the weights) on an unrelated short prompt.
            for s in servers.values():
                s.chat([{"role": "user", "content": "hi"}], 2)
            for rnd in range(args.rounds):
                system = catalogue(rnd, args.prefix_tokens)
                row = {"round": rnd}
                order = engines if rnd % 2 == 0 else engines[::-1]
                for e in order:
                    t1, t2, turn2 = conversation(servers[e], system, args.tokens)
                    key = "" if e == "claw" else "llama_"
                    for turn, t in (("turn1", t1), ("turn2", t2)):
                        row[f"{key}{turn}_prompt_tokens"] = t["prompt_tokens"]
                        row[f"{key}{turn}_cached_tokens"] = t["cached_tokens"]
                        row[f"{key}{turn}_ttft_s"] = t["ttft"]
                        row[f"{key}{turn}_prefill_s"] = t["prefill_s"]
                    row[f"{key}turn1_reply"] = t1["text"]
                    if e == "claw" and baseline:
                        b = baseline.chat(turn2, args.tokens)
                        row["turn2_nocache_ttft_s"] = b["ttft"]
                        row["turn2_nocache_prefill_s"] = b["prefill_s"]
                        row["turn2_nocache_cached_tokens"] = b["cached_tokens"]
                log(f"round {rnd}: {json.dumps(row)}")
                results.append(row)
        finally:
            for s in servers.values():
                s.stop()
    load_after = os.getloadavg()[0]

    def med(key):
        xs = [r[key] for r in results if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    def div(a, b):
        return a / b if a is not None and b else None

    summary = {"model": os.path.basename(args.model), "threads": args.threads,
               "rounds": args.rounds, "prefix_tokens_asked": args.prefix_tokens,
               "tokens": args.tokens, "load_before": load_before, "load_after": load_after}
    for key in ("", "llama_") if args.llama_server else ("",):
        for turn in ("turn1", "turn2"):
            for f in ("prompt_tokens", "cached_tokens", "ttft_s", "prefill_s"):
                summary[f"{key}{turn}_{f}"] = med(f"{key}{turn}_{f}")
        summary[f"{key}ttft_ratio_turn2_over_turn1"] = div(summary[f"{key}turn2_ttft_s"],
                                                           summary[f"{key}turn1_ttft_s"])
    # kept under its old name: turn 1 / turn 2, the speed-up of the cache
    summary["ttft_ratio_turn1_over_turn2"] = div(summary["turn1_ttft_s"],
                                                 summary["turn2_ttft_s"])
    if args.llama_server:
        summary["llama_ttft_ratio_turn1_over_turn2"] = div(summary["llama_turn1_ttft_s"],
                                                           summary["llama_turn2_ttft_s"])
        summary["claw_over_llama_turn1_ttft"] = div(summary["turn1_ttft_s"],
                                                    summary["llama_turn1_ttft_s"])
        summary["claw_over_llama_turn2_ttft"] = div(summary["turn2_ttft_s"],
                                                    summary["llama_turn2_ttft_s"])
    if args.baseline:
        summary["turn2_nocache_ttft_s"] = med("turn2_nocache_ttft_s")
        summary["turn2_nocache_prefill_s"] = med("turn2_nocache_prefill_s")
        summary["ttft_ratio_nocache_over_cached"] = div(summary["turn2_nocache_ttft_s"],
                                                        summary["turn2_ttft_s"])
    if args.json:
        print(json.dumps({"summary": summary, "rounds": results}, indent=2))
        return

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and x == x else "-"
    print(f"model {summary['model']}, {args.threads} threads, ~{args.prefix_tokens}-token "
          f"prefix, {args.tokens} tokens a reply, median of {args.rounds} round(s); 1-min "
          f"load {load_before:.2f} before, {load_after:.2f} after")
    print()
    print("| server | turn | prompt | cached | TTFT s | server prefill s |")
    print("|---|---|---:|---:|---:|---:|")
    names = [("claw", "")] + ([("llama.cpp", "llama_")] if args.llama_server else [])
    for name, key in names:
        for turn, label in (("turn1", "1 (cold)"), ("turn2", "2 (prefix cached)")):
            print(f"| {name} | {label} | {f(summary[f'{key}{turn}_prompt_tokens'], '.0f')} "
                  f"| {f(summary[f'{key}{turn}_cached_tokens'], '.0f')} "
                  f"| {f(summary[f'{key}{turn}_ttft_s'], '.3f')} "
                  f"| {f(summary[f'{key}{turn}_prefill_s'], '.3f')} |")
    if args.baseline:
        print(f"| claw --prefix-cache-mb 0 | 2 (no cache) "
              f"| {f(summary['turn2_prompt_tokens'], '.0f')} | 0 "
              f"| {f(summary['turn2_nocache_ttft_s'], '.3f')} "
              f"| {f(summary['turn2_nocache_prefill_s'], '.3f')} |")
    print()
    for name, key in names:
        r = summary[f"{key}ttft_ratio_turn2_over_turn1"]
        print(f"{name}: TTFT turn 2 / turn 1 = {f(r, '.4f')} "
              f"(turn 1 / turn 2 = {f(div(1, r) if r else None, '.1f')}x)")
    if args.llama_server:
        print(f"claw / llama.cpp TTFT: turn 1 {f(summary['claw_over_llama_turn1_ttft'], '.2f')}, "
              f"turn 2 {f(summary['claw_over_llama_turn2_ttft'], '.2f')} (<1: claw faster)")
    if args.baseline:
        print(f"claw TTFT turn 2 without / with the cache: "
              f"{f(summary['ttft_ratio_nocache_over_cached'], '.1f')}x")


if __name__ == "__main__":
    main()
