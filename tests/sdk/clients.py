"""The official OpenAI and Anthropic Python SDKs against tokenfuse's refusals.

Run by tests/sdk_clients.rs: `python clients.py <listener port>`. Prints one JSON object:
for each case, the exception class the SDK raised (or "ok"), the status, the error type
and whether the SDK retried. Budgets (set by the Rust test): tenant "spent" has none
left; every request over 50 tokens is refused as oversize.
"""

import json
import sys

import anthropic
import openai

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"
out = {}


def record(name, call):
    try:
        call()
        out[name] = {"raised": "ok"}
    except Exception as e:  # the class is what the test checks
        body = getattr(e, "body", None)
        out[name] = {
            "raised": type(e).__name__,
            "status": getattr(e, "status_code", None),
            "type": (body or {}).get("type") if isinstance(body, dict) else None,
            "error_type": ((body or {}).get("error") or {}).get("type") if isinstance(body, dict) else None,
        }


def anthropic_client(tenant):
    return anthropic.Anthropic(
        base_url=base, api_key="sk-ant-test", max_retries=1,
        default_headers={"x-tenant": tenant},
    )


def openai_client(tenant):
    return openai.OpenAI(
        base_url=base + "/v1", api_key="sk-test", max_retries=1,
        default_headers={"x-tenant": tenant},
    )


record("anthropic_spent", lambda: anthropic_client("spent").messages.create(
    model="claude-3-5-haiku-latest", max_tokens=10,
    messages=[{"role": "user", "content": "hi"}]))
record("anthropic_oversize", lambda: anthropic_client("rich").messages.create(
    model="claude-3-5-haiku-latest", max_tokens=1000,
    messages=[{"role": "user", "content": "hi"}]))
record("anthropic_ok", lambda: anthropic_client("rich").messages.create(
    model="claude-3-5-haiku-latest", max_tokens=10,
    messages=[{"role": "user", "content": "hi"}]))
record("openai_spent", lambda: openai_client("spent").chat.completions.create(
    model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))
record("openai_oversize", lambda: openai_client("rich").chat.completions.create(
    model="gpt-4o", max_tokens=1000, messages=[{"role": "user", "content": "hi"}]))
record("openai_ok", lambda: openai_client("rich").chat.completions.create(
    model="gpt-4o", max_tokens=10, messages=[{"role": "user", "content": "hi"}]))

print(json.dumps(out))
