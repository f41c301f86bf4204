#!/usr/bin/env python3
"""Prefix cache benchmark: time to first token of an agent-like conversation's
turn 2 (the long shared prefix cached) vs its turn 1 (nothing cached), on
`claw serve`.

Called by scripts/bench-prefix (which owns the cargo build); standard library only.

The conversation: a system prompt of about --prefix-tokens tokens (a tool
catalogue, as agents send), a short user message; turn 2 re-sends all of it plus
the assistant's turn-1 reply and a short new user message, as an agent does.
Each round uses a fresh system prompt (a different session number near its
start), so its turn 1 finds only the chat template's first few tokens cached. Requests stream, greedy; time to first token
is measured at the client from sending the request to the first content delta.
The server's own prefill time and cached/prefilled counts come from its -v log.
With --baseline, the same turn 2 is also sent to a server started with
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
    def __init__(self, args, name, cache_mb, workdir):
        self.name = name
        self.port = free_port()
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        cmd = [args.claw, "-v", "serve", "--model", args.model, "--no-record",
               "--dir", os.path.join(workdir, name), "--port", str(self.port),
               "--threads", str(args.threads), "--prefix-cache-mb", str(cache_mb)]
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start; see {self.log_path}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/healthz")
                ok = c.getresponse().status == 200
                c.close()
                if ok:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"{name} did not start; see {self.log_path}")

    def chat(self, messages, tokens):
        """Streams one greedy reply: (ttft_s, total_s, text, usage, id)."""
        body = json.dumps({"messages": messages, "max_tokens": tokens, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise SystemExit(f"{self.name}: HTTP {r.status}: {r.read()[:500]!r}")
        ttft, text, usage, rid = None, [], None, None
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            rid = chunk.get("id", rid)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
        total = time.perf_counter() - t0
        conn.close()
        return ttft if ttft is not None else total, total, "".join(text), usage, rid

    def prefill_s(self, rid):
        """The server's prefill time for request `rid` (from its -v log line)."""
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--claw", required=True)
    ap.add_argument("--prefix-tokens", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of each reply")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-mb", type=int, default=1024)
    ap.add_argument("--baseline", action="store_true",
                    help="also time turn 2 on a server without the prefix cache")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    results = []
    with tempfile.TemporaryDirectory(prefix="claw-bench-prefix-") as workdir:
        server = Server(args, "claw", args.cache_mb, workdir)
        baseline = Server(args, "claw-nocache", 0, workdir) if args.baseline else None
        try:
            # Warm-up (page in the weights) on an unrelated short prompt.
            server.chat([{"role": "user", "content": "hi"}], 2)
            if baseline:
                baseline.chat([{"role": "user", "content": "hi"}], 2)
            for rnd in range(args.rounds):
                system = catalogue(rnd, args.prefix_tokens)
                turn1 = [{"role": "system", "content": system},
                         {"role": "user", "content": "List the files under src/ and say what "
                                                     "each one does."}]
                ttft1, _, reply, usage1, id1 = server.chat(turn1, args.tokens)
                turn2 = turn1 + [{"role": "assistant", "content": reply},
                                 {"role": "user", "content": "Now open the largest one."}]
                ttft2, _, _, usage2, id2 = server.chat(turn2, args.tokens)
                row = {
                    "round": rnd,
                    "turn1_prompt_tokens": usage1["prompt_tokens"],
                    "turn1_cached_tokens": usage1["prompt_tokens_details"]["cached_tokens"],
                    "turn1_ttft_s": ttft1,
                    "turn1_prefill_s": server.prefill_s(id1),
                    "turn2_prompt_tokens": usage2["prompt_tokens"],
                    "turn2_cached_tokens": usage2["prompt_tokens_details"]["cached_tokens"],
                    "turn2_ttft_s": ttft2,
                    "turn2_prefill_s": server.prefill_s(id2),
                }
                if baseline:
                    ttft_b, _, _, usage_b, id_b = baseline.chat(turn2, args.tokens)
                    row["turn2_nocache_ttft_s"] = ttft_b
                    row["turn2_nocache_prefill_s"] = baseline.prefill_s(id_b)
                    row["turn2_nocache_cached_tokens"] = \
                        usage_b["prompt_tokens_details"]["cached_tokens"]
                log(f"round {rnd}: {json.dumps(row)}")
                results.append(row)
        finally:
            server.stop()
            if baseline:
                baseline.stop()

    def med(key):
        return statistics.median(r[key] for r in results)

    summary = {
        "model": os.path.basename(args.model),
        "threads": args.threads,
        "rounds": args.rounds,
        "turn1_prompt_tokens": med("turn1_prompt_tokens"),
        "turn1_cached_tokens": med("turn1_cached_tokens"),
        "turn2_prompt_tokens": med("turn2_prompt_tokens"),
        "turn2_cached_tokens": med("turn2_cached_tokens"),
        "turn1_ttft_s": med("turn1_ttft_s"),
        "turn2_ttft_s": med("turn2_ttft_s"),
        "turn1_prefill_s": med("turn1_prefill_s"),
        "turn2_prefill_s": med("turn2_prefill_s"),
    }
    summary["ttft_ratio_turn1_over_turn2"] = summary["turn1_ttft_s"] / summary["turn2_ttft_s"]
    if args.baseline:
        summary["turn2_nocache_ttft_s"] = med("turn2_nocache_ttft_s")
        summary["ttft_ratio_nocache_over_cached"] = (
            summary["turn2_nocache_ttft_s"] / summary["turn2_ttft_s"])
    if args.json:
        print(json.dumps({"summary": summary, "rounds": results}, indent=2))
        return
    print(f"model {summary['model']}, {args.threads} threads, median of {args.rounds} round(s)")
    print(f"{'':24}{'prompt':>8}{'cached':>8}{'TTFT s':>9}{'prefill s':>11}")
    print(f"{'turn 1 (cold)':24}{summary['turn1_prompt_tokens']:>8}"
          f"{summary['turn1_cached_tokens']:>8}"
          f"{summary['turn1_ttft_s']:>9.3f}{summary['turn1_prefill_s']:>11.3f}")
    print(f"{'turn 2 (prefix cached)':24}{summary['turn2_prompt_tokens']:>8}"
          f"{summary['turn2_cached_tokens']:>8}{summary['turn2_ttft_s']:>9.3f}"
          f"{summary['turn2_prefill_s']:>11.3f}")
    if args.baseline:
        print(f"{'turn 2 (no cache)':24}{summary['turn2_prompt_tokens']:>8}{0:>8}"
              f"{summary['turn2_nocache_ttft_s']:>9.3f}{med('turn2_nocache_prefill_s'):>11.3f}")
    print(f"TTFT turn 1 / turn 2: {summary['ttft_ratio_turn1_over_turn2']:.1f}x")
    if args.baseline:
        print(f"TTFT turn 2 without / with the cache: "
              f"{summary['ttft_ratio_nocache_over_cached']:.1f}x")


if __name__ == "__main__":
    main()
