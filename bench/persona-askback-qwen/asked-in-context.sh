#!/bin/bash
# Does Qwen2.5-0.5B end with a follow-up question when asked in the same message?
# Each held-out persona question, greedy, at most 256 tokens, with the ask-back
# correction above the question (before) and after it (after).
# Run from the repository root: bench/persona-askback-qwen/asked-in-context.sh > OUT.jsonl
set -euo pipefail
m=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
ask="Please end your answer with a short follow-up question for me."
grep -v '^#' fixtures/persona/heldout.txt | while IFS= read -r q; do
  for where in before after; do
    if [ "$where" = before ]; then p="$ask

$q"; else p="$q $ask"; fi
    r=$(target/release/claw chat --model "$m" --max-tokens 256 "$p" 2>/dev/null)
    python3 -c 'import json,sys; print(json.dumps({"q":sys.argv[1],"where":sys.argv[2],"reply":sys.argv[3]}))' "$q" "$where" "$r"
  done
done
