#!/usr/bin/env python3
"""Write tests/samples/cases.json: jsonl rows and the token ids and loss masks that
Hugging Face transformers (apply_chat_template) and tokenizers give them, which
tests/test_sample compares esft's prepare formatting against.

Run by developers, never by the build:
    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install transformers tokenizers jinja2
    /tmp/venv/bin/python tests/samples/make_goldens.py

Where the expected values come from:
- ids: transformers' apply_chat_template(tokenize=True) on the conversation, checked equal
  to tokenizers' encode(rendered text, add_special_tokens=False).
- masks, template with {% generation %} blocks: apply_chat_template(
  return_assistant_tokens_mask=True).
- masks, template without: the prefix rule written here on transformers' renders and
  tokenizers' offset mapping (independent of esft's byte-level alignment): for each
  loss-bearing assistant message i, A = render(messages[:i], add_generation_prompt=True),
  B = render(messages[:i+1]); the span [len(A), len(B.rstrip())) of the whole render,
  which must begin with B; a token carries loss when its offsets overlap a span.
- esft_reference rows: the ESFT reference's get_formatted_input_and_target, written here
  from its description (BOS; "User: q.strip()\\n\\nAssistant:" no loss; " a.strip()" + EOS
  with loss), each piece encoded with add_special_tokens=False.
- text rows: encode(text, add_special_tokens=True) + [EOS]; loss on all but a leading BOS.
"""
import datetime
import gzip
import json
import os
import sys

import jinja2

from transformers import PreTrainedTokenizerFast
from transformers.utils import chat_template_utils

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
NOW = 1767225600  # 2026-01-01T00:00:00Z: prepare.date 2026-01-01 (noon; same day)


def load_tokenizer(family, config, template):
    path = os.path.join(TOP, "tests", "tokenizer", family, "tokenizer.json.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = f.read()
    tmp = f"/tmp/esft-golden-{family}.json"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
    kwargs = {k: v for k, v in config.items() if v is not None}
    tok = PreTrainedTokenizerFast(tokenizer_file=tmp, **kwargs)
    if template:
        with open(template, encoding="utf-8") as f:
            tok.chat_template = f.read()
    return tok


class _PinnedClock(datetime.datetime):
    """transformers' strftime_now reads datetime.now(): pinned to NOW (UTC), the day
    test_sample passes as prepare.date."""

    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)


chat_template_utils.datetime = _PinnedClock


def render(tok, messages, tools, agp, kwargs):
    return tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=agp, **kwargs)


class Refused(Exception):
    pass


def prefix_mask(tok, messages, loss, tools, kwargs, full, offsets):
    spans = []
    for i, m in enumerate(messages):
        if not loss[i]:
            continue
        if i == 0:
            raise Refused("assistant message 1 comes first")
        a = render(tok, messages[:i], tools, True, kwargs)
        b = render(tok, messages[:i + 1], tools, False, kwargs)
        if not (b.startswith(a) and full.startswith(b)):
            raise Refused(f"assistant message {i + 1} cannot be located")
        end = len(b.rstrip(" \t\r\n"))
        spans.append((len(a), max(end, len(a))))
    return [int(any(lo < hi and s < hi and e > lo for lo, hi in spans)) for s, e in offsets]


def strip_loss(messages):
    out, loss = [], []
    for m in messages:
        m = dict(m)
        flag = m.pop("loss", m["role"] == "assistant")
        if m.pop("mask", 0) == 1:
            flag = False
        out.append(m)
        loss.append(bool(flag) and m["role"] == "assistant")
    return out, loss


def template_case(tok, row, kwargs, marked):
    messages, loss = strip_loss(row["messages"])
    tools = row.get("tools")
    try:
        full = render(tok, messages, tools, False, kwargs)
    except jinja2.exceptions.TemplateError as e:
        # raise_exception raises exactly TemplateError: its message is the template's own
        if type(e) is jinja2.exceptions.TemplateError:
            return {"error": str(e)}
        return {"error_kind": type(e).__name__}
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        return {"error_kind": type(e).__name__}
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                  add_generation_prompt=False,
                                  return_assistant_tokens_mask=marked, **kwargs)
    ids = list(out["input_ids"])
    enc = tok._tokenizer.encode(full, add_special_tokens=False)
    assert enc.ids == ids, "apply_chat_template and encode disagree"
    if marked:
        mask = list(out["assistant_masks"])
        if not all(loss[i] for i, m in enumerate(messages) if m["role"] == "assistant"):
            raise SystemExit("marked cases train every assistant message here")
    else:
        try:
            mask = prefix_mask(tok, messages, loss, tools, kwargs, full, enc.offsets)
        except Refused as e:
            return {"error": str(e)}
    return {"ids": ids, "mask": mask}


def reference_case(tok, row):
    messages, loss = strip_loss(row["messages"])
    ids, mask = [tok.bos_token_id], [0]
    for m, l in zip(messages, loss):
        if m["role"] == "user":
            piece = tok.encode("User: " + m["content"].strip() + "\n\nAssistant:",
                               add_special_tokens=False)
            ids += piece
            mask += [0] * len(piece)
        else:
            piece = tok.encode(" " + m["content"].strip(), add_special_tokens=False)
            piece.append(tok.eos_token_id)
            ids += piece
            mask += [int(l)] * len(piece)
    return {"ids": ids, "mask": mask}


def text_case(tok, text):
    ids = tok._tokenizer.encode(text, add_special_tokens=True).ids + [tok.eos_token_id]
    mask = [int(not (i == 0 and t == tok.bos_token_id)) for i, t in enumerate(ids)]
    return {"ids": ids, "mask": mask}


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


def u(t, **k):
    return dict({"role": "user", "content": t}, **k)


def a(t, **k):
    return dict({"role": "assistant", "content": t}, **k)


def s(t):
    return {"role": "system", "content": t}


def t(c):
    return {"role": "tool", "content": c}


def conversations():
    """(name, row, kwargs) in esft's row shapes; rows are written as the jsonl line."""
    yield "single", {"messages": [u("What is 2+2?"), a("4")]}, {}
    yield "system", {"messages": [s("You are terse."), u("Hi"), a("Hello.")]}, {}
    yield "system_key", {"system": "You are terse.", "messages": [u("Hi"), a("Hello.")]}, {}
    yield "unicode", {"messages": [s("Réponds en français ✓"), u("héllo 世界 🙂 \"q\" back\\slash"),
                                   a("Ça va — très bien! 🎉 Ελληνικά, русский, العربية")]}, {}
    yield "decomposed", {"messages": [u("cafe\u0301 nai\u0308ve"), a("e\u0301te\u0301 and A\u030a")]}, {}
    yield "whitespace", {"messages": [u("\n\n  padded  \n\n"), a("\n\nanswer\n\n  ")]}, {}
    yield "crlf_tabs", {"messages": [u("a\r\nb\tc"), a("x\r\n\r\ny\t\tz   ")]}, {}
    yield "empty_answer", {"messages": [u("say nothing"), a("")]}, {}
    yield "empty_user", {"messages": [u(""), a("ok")]}, {}
    yield "digits_code", {"messages": [u("sum 123456789 + 987654321"),
                                       a("```python\nprint(123456789 + 987654321)\n```\n= 1111111110")]}, {}
    yield "special_in_text", {"messages": [u("what is <|im_end|> and <|endoftext|>?"),
                                           a("Tokens like <|im_start|> end turns.")]}, {}
    yield "reasoning", {"messages": [u("3*7?"), a("21", reasoning_content="3*7 is 21")]}, {}
    yield "inline_think", {"messages": [u("q"), a("<think>\nstep\n</think>\n\nanswer")]}, {}
    yield "thinking_off", {"messages": [u("3*7?"), a("21")]}, {"enable_thinking": False}
    yield "multi_earlier_off", {"messages": [u("Hi"), a("Hello!", loss=False), u("Joke?"),
                                             a("Why did the chicken cross the road?")]}, {}
    yield "multi_earlier_mask", {"messages": [u("Hi"), a("Hello!", mask=1), u("Joke?"),
                                              a("A joke.", mask=0)]}, {}
    yield "multi_all", {"messages": [u("Hi"), a("Hello!"), u("Joke?"), a("A joke.")]}, {}
    yield "long", {"messages": [m for i in range(8) for m in (u(f"question {i}"), a(f"answer {i}", loss=i == 7))]}, {}
    yield "tool_flow", {"tools": [WEATHER], "messages": [
        s("Use tools."), u("Weather in Paris?"),
        a("", tool_calls=[call("get_weather", {"city": "Paris"})], loss=False),
        t('{"temp": 21}'), a("It is 21 degrees.")]}, {}
    yield "tool_flow_all", {"tools": [WEATHER], "messages": [
        u("Weather in Oslo?"), a("", tool_calls=[call("get_weather", {"city": "Oslo"})]),
        t("3"), a("3 degrees.")]}, {}
    yield "tool_call_last", {"tools": [WEATHER], "messages": [
        u("Weather in Rome?"), a("Checking.", tool_calls=[call("get_weather", {"city": "Rome"})])]}, {}
    yield "tools_string", {"tools": json.dumps([WEATHER]), "messages": [u("hi"), a("hello")]}, {}
    yield "content_parts", {"messages": [u([{"type": "text", "text": "part one "},
                                            {"type": "text", "text": "part two"}]), a("reply")]}, {}
    yield "sharegpt", {"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "q"},
                                         {"from": "gpt", "value": "a"}]}, {}
    yield "alpaca", {"instruction": "Translate to French", "input": "cat", "output": "chat"}, {}
    yield "alpaca_no_input", {"instruction": "Say hi", "output": "hi"}, {}
    yield "prompt_completion", {"prompt": "2+2=", "completion": "4"}, {}
    yield "prompt_completion_lists", {"prompt": [s("sys"), u("2+2=")], "completion": [a("4")]}, {}
    yield "no_user", {"messages": [s("only a system prompt"), a("hello")]}, {}
    yield "starts_with_assistant", {"messages": [a("I speak first"), u("ok"), a("fine")]}, {}
    yield "lone_surrogate_free_emoji", {"messages": [u("👩‍👩‍👧‍👦 family 🏳️‍🌈"), a("🇫🇷🇯🇵 flags")]}, {}
    yield "scripts", {"messages": [u("हिन्दी ภาษาไทย 한국어 日本語"), a("עברית Ελληνικά")]}, {}
    yield "many_spaces", {"messages": [u("a" + " " * 30 + "b"), a("c" + " " * 17 + "\n" + " " * 5 + "d")]}, {}
    yield "numbers_punct", {"messages": [u("3.14159, 2.71828; 1e10!!!"), a("...?!—–")]}, {}
    yield "system_only_kwargs", {"messages": [s("S"), u("U"), a("A")]}, {"enable_thinking": True}
    yield "extra_message_keys", {"messages": [u("q", name="alice"), a("a", weight=0.5)]}, {}
    yield "long_text_answer", {"messages": [u("essay"), a(" ".join(f"word{i}" for i in range(200)))]}, {}
    yield "newline_answer", {"messages": [u("x"), a("\n")]}, {}
    yield "tool_response_user", {"tools": [WEATHER], "messages": [
        u("q"), a("", tool_calls=[call("get_weather", {"city": "X"})], loss=False),
        u("<tool_response>sunny</tool_response>"), a("It is sunny.")]}, {}


TEXTS = ["Plain document.", "", "héllo 世界\n\nsecond paragraph  with  spaces",
         "code: for i in range(10): print(i)\r\n", "<|endoftext|> inside text"]

SETUPS = [
    # name, tokenizer family, tokenizer_config.json, template file, marked, formats
    ("qwen3", "qwen", {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
     os.path.join(TOP, "tests", "chat", "qwen3_moe.jinja"), False),
    ("qwen3_generation", "qwen", {"bos_token": None, "eos_token": "<|im_end|>",
                                  "pad_token": "<|endoftext|>"},
     os.path.join(HERE, "qwen3_moe_generation.jinja"), True),
    ("deepseek_v2", "deepseek-v2", {"bos_token": "<｜begin▁of▁sentence｜>",
                                    "eos_token": "<｜end▁of▁sentence｜>"},
     os.path.join(TOP, "tests", "chat", "deepseek_v2_chat.jinja"), False),
    ("mixtral", "mixtral", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
     os.path.join(TOP, "tests", "chat", "mixtral_8x7b_instruct_v0_1.jinja"), False),
    ("glm45", "glm45", {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
     os.path.join(TOP, "tests", "chat", "glm_4_5.jinja"), False),
    ("gpt_oss", "gpt-oss", {"bos_token": "<|startoftext|>", "eos_token": "<|return|>",
                            "pad_token": "<|endoftext|>"},
     os.path.join(TOP, "tests", "chat", "gpt_oss.jinja"), False),
    ("olmoe_tulu", "olmoe", {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                             "pad_token": "<|padding|>"},
     os.path.join(HERE, "tulu.jinja"), False),
]


def normalize_row(row):
    """The row's conversation as esft reads it (conversation.h), for transformers."""
    if "conversations" in row:
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        msgs = [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
    elif "instruction" in row:
        user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        msgs = [u(user), a(row["output"])]
    elif "prompt" in row:
        p, c = row["prompt"], row["completion"]
        msgs = ([u(p)] if isinstance(p, str) else list(p)) + ([a(c)] if isinstance(c, str) else list(c))
    else:
        msgs = list(row["messages"])
    out = []
    for m in msgs:
        m = dict(m)
        if isinstance(m.get("content"), list):
            m["content"] = "".join(p["text"] for p in m["content"])
        out.append(m)
    if "system" in row:
        out.insert(0, s(row["system"]))
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return {"messages": out, "tools": tools}


def main():
    setups = []
    for name, family, config, template, marked in SETUPS:
        tok = load_tokenizer(family, config, template)
        with open(template, encoding="utf-8") as f:
            template_text = f.read()
        cases = []
        for cname, row, kwargs in conversations():
            if marked and any(m.get("loss") is False or m.get("mask") == 1
                              for m in row.get("messages", [])):
                continue
            norm = normalize_row(row)
            case = {"name": cname, "format": "template", "row": json.dumps(row, ensure_ascii=False),
                    "kwargs": kwargs}
            case.update(template_case(tok, norm, kwargs, marked))
            cases.append(case)
        if tok.bos_token_id is not None:
            for cname, row, kwargs in conversations():
                norm = normalize_row(row)
                if kwargs or norm["tools"] or any(m["role"] not in ("user", "assistant")
                                                  for m in norm["messages"]):
                    continue
                case = {"name": cname, "format": "esft_reference",
                        "row": json.dumps(row, ensure_ascii=False), "kwargs": {}}
                case.update(reference_case(tok, norm))
                cases.append(case)
        for text in TEXTS:
            case = {"name": "text", "format": "template",
                    "row": json.dumps({"text": text}, ensure_ascii=False), "kwargs": {}}
            case.update(text_case(tok, text))
            cases.append(case)
        setups.append({"name": name, "tokenizer": family, "config": config,
                       "template": os.path.relpath(template, TOP), "cases": cases})
        errors = sum("error" in c for c in cases)
        print(f"{name}: {len(cases)} cases, {errors} refused", file=sys.stderr)
    import transformers
    import tokenizers
    with open(os.path.join(HERE, "cases.json"), "w", encoding="utf-8") as f:
        f.write('{"transformers": %s, "tokenizers": %s, "setups": [\n' % (
            json.dumps(transformers.__version__), json.dumps(tokenizers.__version__)))
        parts = []
        for st in setups:
            head = {k: v for k, v in st.items() if k != "cases"}
            body = ",\n".join(json.dumps(c, ensure_ascii=False) for c in st["cases"])
            parts.append(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n' + body + "\n]}")
        f.write(",\n".join(parts))
        f.write("\n]}\n")


if __name__ == "__main__":
    main()
