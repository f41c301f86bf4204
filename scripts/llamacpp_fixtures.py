#!/usr/bin/env python3
"""Regenerate the llama.cpp reference fixtures for SmolLM2 (tokenizer ids, top-5
logits, greedy continuation). Run with the throw-away bench venv:

    .venv-bench/bin/python scripts/llamacpp_fixtures.py

(scripts/bench-generate --no-claw --no-build creates .venv-bench if missing.)
Writes fixtures/smollm2_token_ids.json and fixtures/smollm2_llamacpp_logits.json.
"""
import json, llama_cpp
from llama_cpp import Llama
import os; os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
M="models/SmolLM2-135M-Instruct.Q4_1.gguf"
llm=Llama(model_path=M, n_ctx=512, n_threads=2, logits_all=True, verbose=False)
texts=["Hello, world!", "The capital of France is Paris.", "1234567 apples", "  leading spaces and\ttabs\nnewline", "naïve café — 東京", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "def f(x):\n    return x**2  # square"]
out=[{"text":t,"ids":llm.tokenize(t.encode(),add_bos=False,special=True)} for t in texts]
json.dump(out, open("fixtures/smollm2_token_ids.json","w"), ensure_ascii=False, indent=1)
p="<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
ids=llm.tokenize(p.encode(),add_bos=False,special=True)
llm.reset(); llm.eval(ids)
import numpy as np
lg=np.array(llm.scores[llm.n_tokens-1],dtype=np.float32)
top=np.argsort(-lg)[:5]
top5=[[int(i), float(lg[i])] for i in top]
gen=[]
for _ in range(20):
    t=int(np.argmax(np.array(llm.scores[llm.n_tokens-1])))
    gen.append(t); llm.eval([t])
res={"llama_cpp_python_version":llama_cpp.__version__,"model":M,"prompt":p,"prompt_ids":ids,"top5":top5,
     "greedy_20_ids":gen,"greedy_20_text":llm.detokenize(gen).decode("utf-8","replace")}
json.dump(res, open("fixtures/smollm2_llamacpp_logits.json","w"), ensure_ascii=False, indent=1)
