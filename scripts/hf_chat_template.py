#!/usr/bin/env python3
"""Render a chat request with a GGUF's chat template the way Hugging Face
transformers' apply_chat_template does (jinja2 sandbox, trim_blocks and
lstrip_blocks, `tojson` = json.dumps(ensure_ascii=False)), after the same
normalisation claw serve applies (developer -> system, text parts joined,
tool call arguments parsed into objects, content null -> ""). Needs only jinja2.

    python3 scripts/hf_chat_template.py MODEL.gguf REQUEST.json > PROMPT.txt

Regenerates fixtures/openclaw/session-turn2.qwen2.5.txt (the reference that
tests/e2e/serve.rs compares claw's rendering against):

    python3 scripts/hf_chat_template.py models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        fixtures/openclaw/session-turn2.json > fixtures/openclaw/session-turn2.qwen2.5.txt
"""
import json
import struct
import sys

from jinja2.sandbox import ImmutableSandboxedEnvironment


def gguf_string(path, key):
    """The string metadata value `key` of a GGUF file (read from its header)."""
    data = open(path, "rb").read(32 << 20)
    name = key.encode()
    i = data.find(struct.pack("<Q", len(name)) + name)
    if i < 0:
        sys.exit(f"{path}: no {key}")
    i += 8 + len(name)
    kind, n = struct.unpack("<IQ", data[i:i + 12])
    if kind != 8:  # GGUF_TYPE_STRING
        sys.exit(f"{path}: {key} is not a string")
    return data[i + 12:i + 12 + n].decode()


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise Exception(message)


def normalise(message):
    m = dict(message)
    if m["role"] == "developer":
        m["role"] = "system"
    content = m.get("content")
    if isinstance(content, list):
        m["content"] = "".join(part["text"] for part in content)
    elif content is None:
        m["content"] = ""
    if m.get("tool_calls"):
        calls = json.loads(json.dumps(m["tool_calls"]))
        for call in calls:
            try:
                call["function"]["arguments"] = json.loads(call["function"]["arguments"])
            except (TypeError, ValueError):
                pass
        m["tool_calls"] = calls
    return m


def main():
    model, request = sys.argv[1], sys.argv[2]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    template = env.from_string(gguf_string(model, "tokenizer.chat_template"))
    body = json.load(open(request))
    messages = [normalise(m) for m in body["messages"]]
    tools = body.get("tools") or None
    if body.get("tool_choice") == "none":
        tools = None
    sys.stdout.write(template.render(messages=messages, tools=tools, add_generation_prompt=True,
                                     bos_token="", eos_token="<|im_end|>"))


if __name__ == "__main__":
    main()
