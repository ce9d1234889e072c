"""The official SDKs' stream parsers against answers tokenfuse serves from its cache.

Run by tests/sdk_clients.rs: `python cache.py <listener port>` against a filter with the
response cache on. Each case asks the same deterministic question three times — streamed
(a miss: the upstream answers), streamed again and as JSON (hits: the filter answers, the
stream synthesized from the kept answer) — through the SDK's own stream helpers, which
accumulate the events into the final object. Prints one JSON object: per case, the three
answers' texts, or the error the SDK raised.
"""

import json
import sys

import anthropic
import openai

port = int(sys.argv[1])
base = f"http://127.0.0.1:{port}"
out = {}


def record(name, calls):
    try:
        out[name] = {"texts": [call() for call in calls]}
    except Exception as e:  # the test shows what the SDK said
        out[name] = {"error": f"{type(e).__name__}: {e}"}


oa = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0,
                   default_headers={"x-tenant": "sdk-cache"})
an = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0,
                         default_headers={"x-tenant": "sdk-cache"})
chat_messages = [{"role": "user", "content": "sdk cache chat"}]


def chat_stream():
    with oa.chat.completions.stream(model="gpt-4o", temperature=0, messages=chat_messages,
                                    stream_options={"include_usage": True}) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert final.usage is not None and final.usage.completion_tokens > 0, final.usage
    return final.choices[0].message.content


def chat_json():
    return oa.chat.completions.create(model="gpt-4o", temperature=0,
                                      messages=chat_messages).choices[0].message.content


def responses_stream():
    with oa.responses.stream(model="gpt-4o", temperature=0, input="sdk cache responses") as s:
        for _ in s:
            pass
        final = s.get_final_response()
    assert final.status == "completed", final.status
    return final.output_text


def responses_json():
    return oa.responses.create(model="gpt-4o", temperature=0,
                               input="sdk cache responses").output_text


anthropic_messages = [{"role": "user", "content": "sdk cache anthropic"}]
opt_in = {"cache-control": "max-age=600"}


def anthropic_stream():
    # This SDK's stream() takes no temperature: the client opts in with cache-control.
    with an.messages.stream(model="claude-sonnet-4-5", max_tokens=100,
                            messages=anthropic_messages, extra_headers=opt_in) as s:
        for _ in s:
            pass
        final = s.get_final_message()
    assert final.stop_reason is not None and final.usage.output_tokens > 0, final
    return final.content[0].text


def anthropic_json():
    return an.messages.create(model="claude-sonnet-4-5", max_tokens=100,
                              messages=anthropic_messages, extra_headers=opt_in).content[0].text


record("openai_chat", [chat_stream, chat_stream, chat_json])
record("openai_responses", [responses_stream, responses_stream, responses_json])
record("anthropic_messages", [anthropic_stream, anthropic_stream, anthropic_json])

print(json.dumps(out))
