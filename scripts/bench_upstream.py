#!/usr/bin/env python3
"""Recording overhead of `claw serve --upstream`: chat completion latency when a
client talks to llama-server directly vs through claw (which asks the engine for
log-probs and token ids, renders and tokenises the prompt with the engine's
/apply-template and /tokenize, and records the turn, fsynced, before answering).

One llama-server and one `claw serve --upstream` in front of it. The same greedy
requests go three ways, interleaved in rotating order within each round:

  direct        the client's own request to llama-server
  direct+lp     the same with logprobs/top_logprobs 1 (what claw asks for), to
                separate the engine's cost of log-probs from claw's own
  claw          the client's request through claw serve --upstream

Reported: median and mean latency per way, and the ratios claw/direct and
claw/direct+lp (the overhead goal is claw/direct <= 1.02). Python stdlib only.

--engine stub replaces llama-server by an in-process engine that answers at once
in llama-server's shapes (chat completion with logprobs ids, /apply-template,
/tokenize): claw/direct latency minus direct is then claw's own cost per request
in milliseconds (its checks, the two extra engine calls, the recorded row and its
fsync), free of the engine's run-to-run noise.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Name three colours.",
    "Explain what a hash map is in two sentences.",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=300):
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        answer = json.loads(r.read())
    return time.perf_counter() - started, answer


def wait_health(url, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(0.2)
    sys.exit(f"bench-upstream: {url} did not come up")


def start_claw(claw, upstream, data, extra):
    proc = subprocess.Popen(
        [claw, "serve", "--upstream", upstream, "--dir", data, "--port", "0",
         "--host", "127.0.0.1", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    found = {}
    ready = threading.Event()

    def read():
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m and not ready.is_set():
                found["url"] = m.group(1)
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        sys.exit("bench-upstream: claw serve did not start")
    return proc, found["url"]


class Stub(BaseHTTPRequestHandler):
    """An engine that answers at once, in llama-server's response shapes."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes: without TCP_NODELAY the body would
    # wait for the client's delayed ACK (40 ms) on a kept-alive connection.
    disable_nagle_algorithm = True
    tokens = 32

    def log_message(self, *args):
        pass

    def reply(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply({"object": "list", "data": [{"id": "stub"}]})
        else:
            self.reply({"status": "ok"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path == "/apply-template":
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                           for m in body["messages"])
            self.reply({"prompt": text + "<|im_start|>assistant\n"})
        elif self.path == "/tokenize":
            self.reply({"tokens": list(range(1, len(body["content"]) // 4 + 2))})
        else:
            n = min(int(body.get("max_tokens", 16)), self.tokens)
            entries = [{"id": 100 + i, "token": " ok", "bytes": [32, 111, 107],
                        "logprob": -0.1, "top_logprobs": []} for i in range(n)]
            choice = {"index": 0, "finish_reason": "length",
                      "message": {"role": "assistant", "content": " ok" * n}}
            if body.get("logprobs"):
                choice["logprobs"] = {"content": entries}
            self.reply({"id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
                        "model": "stub", "choices": [choice],
                        "usage": {"prompt_tokens": 20, "completion_tokens": n,
                                  "total_tokens": 20 + n}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--claw", required=True)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--engine", choices=["llama-server", "stub"], default="llama-server")
    ap.add_argument("--claw-arg", action="append", default=[],
                    help="extra argument for claw serve (repeat), e.g. --no-durable-log")
    args = ap.parse_args()

    port = free_port()
    if args.engine == "stub":
        Stub.tokens = args.tokens
        stub = ThreadingHTTPServer(("127.0.0.1", port), Stub)
        threading.Thread(target=stub.serve_forever, daemon=True).start()
        llama = None
    else:
        llama = subprocess.Popen(
            [args.llama_server, "--model", args.model, "--host", "127.0.0.1", "--port",
             str(port), "-c", "2048", "--parallel", "1", "--threads", str(args.threads),
             "--threads-batch", str(args.threads)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    data = tempfile.mkdtemp(prefix="claw-bench-upstream-")
    claw = None
    try:
        direct_url = f"http://127.0.0.1:{port}"
        wait_health(direct_url + "/health")
        claw, claw_url = start_claw(args.claw, direct_url, data, args.claw_arg)

        def request(prompt, logprobs=False):
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.tokens, "temperature": 0, "seed": 1,
                # Every reply exactly --tokens long on every path.
                "ignore_eos": True,
            }
            if logprobs:
                body.update({"logprobs": True, "top_logprobs": 1})
            return body

        ways = {
            "direct": lambda p: post(direct_url + "/v1/chat/completions", request(p)),
            "direct+lp": lambda p: post(direct_url + "/v1/chat/completions", request(p, True)),
            "claw": lambda p: post(claw_url + "/v1/chat/completions", request(p)),
        }
        names = list(ways)
        # Warm-up: every way and prompt once (the engine's prompt cache is per
        # slot and holds one prompt, so the rotation below defeats it equally).
        texts = {}
        for name in names:
            for p in PROMPTS:
                _, answer = ways[name](p)
                texts.setdefault(p, set()).add(answer["choices"][0]["message"]["content"])
        same = all(len(t) == 1 for t in texts.values())
        times = {n: [] for n in names}
        for r in range(args.rounds):
            for i, p in enumerate(PROMPTS):
                k = (r * len(PROMPTS) + i) % len(names)
                for name in names[k:] + names[:k]:
                    dt, _ = ways[name](p)
                    times[name].append(dt)
        result = {
            "engine": args.engine,
            "tokens": args.tokens, "rounds": args.rounds, "prompts": len(PROMPTS),
            "threads": args.threads, "same_replies": same,
            "ways": {n: {"median_s": statistics.median(t), "mean_s": statistics.mean(t),
                         "p90_s": sorted(t)[int(0.9 * (len(t) - 1))], "n": len(t)}
                     for n, t in times.items()},
        }
        med = {n: result["ways"][n]["median_s"] for n in names}
        mean = {n: result["ways"][n]["mean_s"] for n in names}
        result["ratio_median_claw_over_direct"] = med["claw"] / med["direct"]
        result["ratio_median_claw_over_direct_lp"] = med["claw"] / med["direct+lp"]
        result["ratio_mean_claw_over_direct"] = mean["claw"] / mean["direct"]
        # Paired: each claw request against the direct ones of the same round
        # and prompt, which ran next to it.
        pairs = [c / d for c, d in zip(times["claw"], times["direct"])]
        result["ratio_paired_median"] = statistics.median(pairs)
        result["added_median_ms"] = (med["claw"] - med["direct"]) * 1e3
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            engine = ("a stub engine" if args.engine == "stub"
                      else f"llama-server --threads {args.threads}")
            print(f"{args.rounds} rounds x {len(PROMPTS)} prompts, {args.tokens} tokens, "
                  f"greedy, {engine}; replies identical on all paths: {same}")
            print(f"{'way':<10} {'median ms':>10} {'mean ms':>9} {'p90 ms':>8}")
            for n in names:
                w = result["ways"][n]
                print(f"{n:<10} {w['median_s']*1e3:>10.1f} {w['mean_s']*1e3:>9.1f} "
                      f"{w['p90_s']*1e3:>8.1f}")
            print(f"claw / direct:    median {result['ratio_median_claw_over_direct']:.3f}, "
                  f"mean {result['ratio_mean_claw_over_direct']:.3f}, "
                  f"paired median {result['ratio_paired_median']:.3f}")
            print(f"claw / direct+lp: median {result['ratio_median_claw_over_direct_lp']:.3f}")
            print(f"claw adds (median): {result['added_median_ms']:.1f} ms a request")
    finally:
        if claw is not None:
            claw.terminate()
            try:
                claw.wait(30)
            except subprocess.TimeoutExpired:
                claw.kill()
        if llama is not None:
            llama.terminate()
            try:
                llama.wait(30)
            except subprocess.TimeoutExpired:
                llama.kill()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
