#!/usr/bin/env python3
"""Generation benchmark: claw vs llama.cpp (via llama-cpp-python).

Called by scripts/bench-generate, which owns the virtualenv and the cargo build;
run that script rather than this file. Both engines get the same GGUF, the same
raw ChatML prompt, the same number of greedy tokens (EOS ignored) and the same
thread count. One warm-up run per engine is discarded; the median of --runs is
reported.

llama.cpp side (single sequence, batch = whole prompt):
  prefill = wall time of one llama_decode over all prompt tokens
  decode  = wall time of N x (argmax over the last logits + llama_decode of 1 token)
  tok/s   = tokens / seconds. llama.cpp's own perf counters (t_p_eval / t_eval)
            are recorded too, as a cross-check (note: llama.cpp books the first
            1-token decode after the prompt under prompt eval, so its counts are
            prompt+1 and tokens-1).
claw side: the `timing` object of `claw chat ... --json`:
  {"prompt_tokens", "prefill_s", "completion_tokens", "decode_s"}.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# A fixed ChatML prompt of roughly 100 tokens (SmolLM2 tokenizer: see
# `prompt_tokens` in the output). Passed to claw with --raw, so neither engine
# applies a chat template on top of it.
PROMPT = (
    "<|im_start|>system\n"
    "You are a helpful assistant. Answer clearly and in detail, using complete "
    "sentences.<|im_end|>\n"
    "<|im_start|>user\n"
    "I am planning a week-long trip to Japan in the spring. I would like to visit "
    "Tokyo, Kyoto and Osaka, see the cherry blossoms, eat good local food and take "
    "the bullet train at least once. Please suggest a day-by-day itinerary, explain "
    "how to get from one city to the next, and give me a few tips about money, "
    "etiquette and what to pack.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def long_prompt(approx_tokens):
    """A ChatML prompt of about `approx_tokens` tokens: a long document of distinct
    numbered notes (no repeated text a cache could exploit) and one question, the
    shape of an agent's long system prompt."""
    cities = ["Tokyo", "Kyoto", "Osaka", "Nara", "Hiroshima", "Sapporo", "Sendai", "Nagoya"]
    notes = []
    i = 0
    # ~4 characters a token is a safe over-estimate for English text here.
    while sum(len(n) for n in notes) < approx_tokens * 4 - 400:
        a, b = cities[i % 8], cities[(i * 3 + 1) % 8]
        notes.append(f"Note {i}: the train from {a} to {b} leaves at {6 + i % 14}:{(i * 7) % 60:02d} "
                     f"from platform {1 + i % 9} and costs {1200 + 37 * i} yen.\n")
        i += 1
    return ("<|im_start|>system\nYou are a travel assistant. Use the timetable below.\n"
            + "".join(notes) + "<|im_end|>\n<|im_start|>user\n"
            "Which train should I take from Tokyo to Kyoto in the morning?<|im_end|>\n"
            "<|im_start|>assistant\n")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def rate(n, s):
    return n / s if s and s > 0 else None


# --------------------------------------------------------------------------- llama.cpp

def bench_llamacpp(args):
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(
        model_path=args.model,
        n_ctx=max(512, args.ctx_needed),
        n_batch=512,
        n_ubatch=512,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        flash_attn=args.llama_flash_attn,
        logits_all=False,
        verbose=False,
    )
    ids = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=True)
    n_prompt = len(ids)
    need = n_prompt + args.tokens + 1
    if need > llm.n_ctx():
        raise SystemExit(f"context too small: need {need}, have {llm.n_ctx()}")
    n_vocab = llm.n_vocab()
    ctx = llm._ctx.ctx  # raw llama_context* for the perf counters

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))

    def one_run():
        llm.reset()  # n_tokens = 0; eval() drops the KV cache past it
        llama_cpp.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        out = []
        for _ in range(args.tokens):
            tok = int(np.argmax(last_logits()))  # greedy; EOS is not special-cased
            out.append(tok)
            llm.eval([tok])
        t2 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(ctx)
        return {
            "prompt_tokens": n_prompt,
            "prefill_s": t1 - t0,
            "completion_tokens": len(out),
            "decode_s": t2 - t1,
            "perf_prefill_s": perf.t_p_eval_ms / 1e3,
            "perf_n_prefill": perf.n_p_eval,
            "perf_decode_s": perf.t_eval_ms / 1e3,
            "perf_n_decode": perf.n_eval,
            "ids": out,
        }

    log(f"llama.cpp: warm-up + {args.runs} run(s), {n_prompt} prompt tokens, "
        f"{args.tokens} generated, {args.threads} thread(s)")
    one_run()
    runs = [one_run() for _ in range(args.runs)]
    return summarize("llama.cpp", runs, extra={
        "version": f"llama-cpp-python {llama_cpp.__version__}",
        "perf_prefill_tok_s": statistics.median(
            r["perf_n_prefill"] / r["perf_prefill_s"] for r in runs if r["perf_prefill_s"] > 0),
        "perf_decode_tok_s": statistics.median(
            r["perf_n_decode"] / r["perf_decode_s"] for r in runs if r["perf_decode_s"] > 0),
        "first_ids": runs[0]["ids"][:16],
    })


# --------------------------------------------------------------------------- claw

def bench_claw(args, weights):
    exe = args.claw
    engine = f"claw:{weights}"
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        return {"engine": engine, "error": f"binary not found: {exe} (did `cargo build --release` succeed?)"}
    cmd = [exe, "chat", "--model", args.model, "--raw", "--ignore-eos",
           "--max-tokens", str(args.tokens), "--temperature", "0",
           "--threads", str(args.threads), "--weights", weights, "--json", args.prompt]

    def one_run():
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"exit status {p.returncode}: " + " | ".join(tail))
        try:
            doc = json.loads(p.stdout)
        except json.JSONDecodeError:
            # tolerate log lines before the JSON object: take the last JSON line
            doc = None
            for line in reversed(p.stdout.strip().splitlines()):
                try:
                    doc = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
            if doc is None:
                raise RuntimeError("stdout is not JSON: " + p.stdout.strip()[:200])
        t = doc.get("timing") if isinstance(doc, dict) else None
        keys = ("prompt_tokens", "prefill_s", "completion_tokens", "decode_s")
        if not isinstance(t, dict) or any(k not in t for k in keys):
            raise RuntimeError(f"JSON output lacks timing{{{', '.join(keys)}}}: "
                               + json.dumps(doc)[:200])
        return {k: t[k] for k in keys}

    log(f"{engine}: warm-up + {args.runs} run(s): {' '.join(cmd[:-1])} <PROMPT>")
    try:
        one_run()
        runs = [one_run() for _ in range(args.runs)]
    except (RuntimeError, OSError) as e:
        return {"engine": engine, "error": str(e)}
    return summarize(engine, runs)


# --------------------------------------------------------------------------- report

def summarize(engine, runs, extra=None):
    res = {
        "engine": engine,
        "prompt_tokens": runs[0]["prompt_tokens"],
        "completion_tokens": runs[0]["completion_tokens"],
        "prefill_s": statistics.median(r["prefill_s"] for r in runs),
        "decode_s": statistics.median(r["decode_s"] for r in runs),
        "prefill_tok_s": statistics.median(rate(r["prompt_tokens"], r["prefill_s"]) for r in runs),
        "decode_tok_s": statistics.median(rate(r["completion_tokens"], r["decode_s"]) for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "ids"} for r in runs],
    }
    res.update(extra or {})
    return res


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(res):
    rows = [r for r in res["engines"]]
    print(f"model:   {res['model']}")
    print(f"threads: {res['threads']}   tokens: {res['tokens']}   runs: {res['runs']} "
          f"(median, after 1 warm-up)")
    print()
    print(f"{'engine':<12} {'prompt tok':>10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['engine']:<12} {'-':>10} {'-':>14} {'-':>13}   ({r['error']})")
        else:
            print(f"{r['engine']:<12} {r['prompt_tokens']:>10} "
                  f"{fmt(r['prefill_tok_s'], '14.1f')} {fmt(r['decode_tok_s'], '13.1f')}")
    for engine, ratio in res.get("ratios_over_llamacpp", {}).items():
        label = f"{engine} / llama.cpp"
        print(f"{label:<23} {fmt(ratio['prefill'], '14.2f')} {fmt(ratio['decode'], '13.2f')}")
    lc = next((r for r in rows if r["engine"] == "llama.cpp" and "error" not in r), None)
    if lc:
        print()
        print(f"({lc['version']}; llama.cpp internal perf counters: prefill "
              f"{lc['perf_prefill_tok_s']:.1f} tok/s, decode {lc['perf_decode_tok_s']:.1f} tok/s)")
    for n in res.get("notes", []):
        print(f"note: {n}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--claw", default="target/release/claw", help="claw binary")
    ap.add_argument("--no-claw", action="store_true")
    ap.add_argument("--claw-weights", default="packed",
                    help="comma-separated claw --weights formats to measure (packed,ggml,f16,f32)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--llama-flash-attn", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--print-prompt", action="store_true")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="use a long prompt of about this many tokens instead of the ~100-token one")
    args = ap.parse_args()
    args.prompt = long_prompt(args.prompt_tokens) if args.prompt_tokens > 0 else PROMPT
    if args.print_prompt:
        sys.stdout.write(args.prompt)
        return
    if args.tokens < 1 or args.runs < 1 or args.threads < 1:
        ap.error("--tokens, --runs and --threads must be >= 1")
    args.ctx_needed = 256 + max(args.prompt_tokens * 2, 0) + args.tokens + 8

    res = {"model": args.model, "threads": args.threads, "tokens": args.tokens,
           "runs": args.runs, "prompt": args.prompt[:200], "engines": [], "notes": []}
    lc = cl = None
    if not args.no_llamacpp:
        lc = bench_llamacpp(args)
        res["engines"].append(lc)
    claws = []
    if not args.no_claw:
        for weights in [w.strip() for w in args.claw_weights.split(",") if w.strip()]:
            cl = bench_claw(args, weights)
            res["engines"].append(cl)
            claws.append(cl)
            if "error" in cl:
                log(f"{cl['engine']}: skipped: {cl['error']}")
    res["ratios_over_llamacpp"] = {}
    for cl in claws:
        if not lc or "error" in cl or "error" in lc:
            continue
        res["ratios_over_llamacpp"][cl["engine"]] = {
            "prefill": cl["prefill_tok_s"] / lc["prefill_tok_s"] if cl["prefill_tok_s"] else None,
            "decode": cl["decode_tok_s"] / lc["decode_tok_s"] if cl["decode_tok_s"] else None,
        }
        if cl["prompt_tokens"] != lc["prompt_tokens"]:
            res["notes"].append(f"prompt token counts differ ({cl['engine']} {cl['prompt_tokens']}, "
                                f"llama.cpp {lc['prompt_tokens']}): tokenizer or BOS mismatch")
        if cl["completion_tokens"] != lc["completion_tokens"]:
            res["notes"].append(f"completion token counts differ ({cl['engine']} {cl['completion_tokens']}, "
                                f"llama.cpp {lc['completion_tokens']})")
    if args.json:
        json.dump(res, sys.stdout, indent=2)
        print()
    else:
        print_table(res)


if __name__ == "__main__":
    main()
