#!/usr/bin/env python3
"""Peak RSS of claw serve while 6 clients send 3.9 MB chat bodies at once (each is
refused: far over the context). Usage: scripts/probe_large_bodies.py CLAW GGUF"""
import json, re, subprocess, sys, tempfile, threading, urllib.request, time
claw, model = sys.argv[1], sys.argv[2]
data = tempfile.mkdtemp()
p = subprocess.Popen([claw, "serve", "--model", model, "--dir", data, "--port", "0", "--threads", "2"], stderr=subprocess.PIPE, text=True)
for line in p.stderr:
    m = re.search(r"listening on (http://[0-9.:]+)", line)
    if m: base = m.group(1); break
threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
def hwm():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith(("VmHWM", "VmRSS")): print("  ", l.strip())
print("idle:"); hwm()
words = " ".join(f"w{i}" for i in range(600000))[:3_900_000]
body = json.dumps({"messages": [{"role": "user", "content": words}], "max_tokens": 4}).encode()
codes = []
def send():
    try:
        urllib.request.urlopen(urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"}), timeout=600)
        codes.append(200)
    except urllib.error.HTTPError as e:
        codes.append(e.code)
t = time.time()
th = [threading.Thread(target=send) for _ in range(6)]
[x.start() for x in th]; [x.join() for x in th]
print(f"6 x {len(body)/1e6:.1f} MB bodies -> {codes} in {time.time()-t:.1f} s"); hwm()
p.terminate(); p.wait()
