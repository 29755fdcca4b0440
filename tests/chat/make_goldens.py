#!/usr/bin/env python3
"""Render the chat templates in this folder on a set of conversations with transformers' own
jinja2 environment and write tests/chat/cases.json, the golden outputs tests/test_chat_template
compares the C interpreter against.

Run by developers, never by the build:
    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install transformers jinja2
    /tmp/venv/bin/python tests/chat/make_goldens.py
Without transformers the script builds the same environment itself (the options copied from
transformers.utils.chat_template_utils._cached_compile_jinja_template) and says so.
"""
import datetime
import json
import os
import sys

import jinja2

HERE = os.path.dirname(os.path.abspath(__file__))
# strftime_now is pinned: the C test passes the same instant (UTC) as its render option.
NOW = 1767225600  # 2026-01-01T00:00:00Z
NOW_DT = datetime.datetime.fromtimestamp(NOW, datetime.timezone.utc)

TEMPLATES = {
    "qwen3_moe.jinja": {"bos_token": None, "eos_token": "<|im_end|>", "thinking": True},
    "mixtral_8x7b_instruct_v0_1.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "deepseek_v2_chat.jinja": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "glm_4_5.jinja": {"bos_token": None, "eos_token": "<|endoftext|>", "thinking": True},
    "gpt_oss.jinja": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "gpt_oss": True},
}


def compile_template(text):
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(text), "transformers"
    except ImportError:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        import jinja2.ext

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        return env.from_string(text), "jinja2 " + jinja2.__version__


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. \"Paris\""},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer", "description": "Forecast days", "default": 1},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search documents — ünïcode ok",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "scores": {"type": "array", "items": {"type": "number"}, "nullable": True},
                "filters": {"type": "array", "items": {"type": "object", "properties": {
                    "field": {"type": "string"}, "value": {"type": "string"}}, "required": ["field"]}},
                "limit": {"type": ["integer", "null"]},
                "mode": {"oneOf": [{"type": "string", "description": "a mode name"}, {"type": "integer"}],
                         "default": "fast"},
                "flag": {"type": "boolean", "default": False},
                "threshold": {"type": "number", "default": 0.5},
                "anything": {},
                "nested": {"type": "object"},
            },
            "required": ["query", "tags"],
        },
    },
}
NO_PARAM_TOOL = {"type": "function", "function": {"name": "now", "description": "The time"}}


def call(name, arguments, wrap=True, id=None):
    c = {"name": name, "arguments": arguments}
    if wrap:
        c = {"type": "function", "function": c}
        if id:
            c["id"] = id
    return c


def conversations():
    """(name, messages, extra kwargs) for every template; a template may reject some."""
    u = lambda t: {"role": "user", "content": t}
    a = lambda t, **k: dict({"role": "assistant", "content": t}, **k)
    s = lambda t: {"role": "system", "content": t}
    t = lambda c, **k: dict({"role": "tool", "content": c}, **k)
    yield "single_user", [u("Hello!")], {}
    yield "system_user", [s("You are a helpful assistant."), u("What is 2+2?")], {}
    yield "multi_turn", [u("Hi"), a("Hello, how can I help?"), u("Tell me a joke."),
                         a("Why did the chicken cross the road?"), u("Why?")], {}
    yield "system_multi_turn", [s("Be brief."), u("Hi"), a("Hello."), u("Bye")], {}
    yield "ends_with_assistant", [u("Say yes"), a("Yes.")], {}
    yield "empty_contents", [u(""), a(""), u("")], {}
    yield "empty_system", [s(""), u("x")], {}
    yield "unicode", [s("Réponds en français ✓"), u("héllo 世界 🙂 \"quotes\" 'single' back\\slash"),
                      a("Ça va — très bien! 🎉"), u("tab\there\nnewline\r\ncrlf \u2028 sep")], {}
    yield "whitespace_edges", [u("\n\n  padded  \n\n"), a("\n\nanswer with newlines\n\n"), u("  ")], {}
    yield "reasoning_content", [u("Think about 3*7"), a("It is 21.", reasoning_content="3*7=21, easy."),
                                u("And 4*5?")], {}
    yield "reasoning_last", [u("Think about 3*7"), a("It is 21.", reasoning_content="\n3*7=21\n")], {}
    yield "inline_think", [u("q1"), a("<think>\nstep one\nstep two\n</think>\n\nThe answer."), u("q2"),
                           a("<think>only thoughts</think>final")], {}
    yield "inline_think_before_last_user", [u("q1"), a("<think>old thoughts</think>old answer"), u("q2")], {}
    yield "think_multi_close", [u("q"), a("<think>a</think>b</think>c")], {}
    yield "tool_call_flow", [
        s("You can call tools."),
        u("What's the weather in Paris?"),
        a("", tool_calls=[call("get_weather", {"city": "Paris", "unit": "celsius"}, id="c1")]),
        t('{"temp": 21.5, "sky": "sunny"}', tool_call_id="c1"),
        a("It is 21.5°C and sunny in Paris."),
    ], {"tools": [WEATHER_TOOL]}
    yield "tool_call_with_text", [
        u("Weather in Rome and Oslo?"),
        a("Let me check both.", tool_calls=[call("get_weather", {"city": "Rome"}),
                                            call("get_weather", {"city": "Oslo", "days": 3})]),
        t("Rome: 25"), t("Oslo: 3"),
        a("Rome is 25, Oslo is 3."),
        u("Thanks"),
    ], {"tools": [WEATHER_TOOL, SEARCH_TOOL]}
    yield "tool_call_string_args", [
        u("search cats"),
        a("", tool_calls=[call("search", '{"query": "cats", "tags": []}')]),
        t("found 3 cats"),
    ], {"tools": [SEARCH_TOOL]}
    yield "tool_call_unwrapped", [
        u("now?"),
        a("", tool_calls=[call("now", {}, wrap=False)]),
        t("12:00"),
    ], {"tools": [NO_PARAM_TOOL]}
    yield "tool_args_numbers", [
        u("numbers"),
        a("", tool_calls=[call("search", {"query": "q", "tags": ["a", "b"], "limit": 10, "threshold": 1.5,
                                          "big": 1e20, "small": 1e-7, "neg": -0.0, "one": 1.0, "t": True,
                                          "f": False, "n": None, "nested": {"x": [1, [2, 3], {}], "y": []},
                                          "uni": "ü\u00e9\"\\\n\t\u0001"})]),
        t("ok"),
        a("done"),
    ], {"tools": [SEARCH_TOOL]}
    yield "tools_no_call", [s("sys prompt"), u("just chat")], {"tools": [WEATHER_TOOL, SEARCH_TOOL, NO_PARAM_TOOL]}
    yield "tools_no_system", [u("just chat")], {"tools": [WEATHER_TOOL]}
    yield "tool_response_as_user", [u("q"), a("", tool_calls=[call("now", {})]),
                                    u("<tool_response>12:00</tool_response>")], {"tools": [NO_PARAM_TOOL]}
    yield "content_parts", [u([{"type": "text", "text": "part one "}, {"type": "text", "text": "part two"}]),
                            a([{"type": "text", "text": "reply"}]), u(["plain string part"])], {}
    yield "assistant_content_none_toolcall", [u("q"), a(None, tool_calls=[call("now", {})]), t("12:00")], {
        "tools": [NO_PARAM_TOOL]}
    yield "assistant_no_content_key", [u("q"), {"role": "assistant", "tool_calls": [call("now", {})]},
                                       t("12:00")], {"tools": [NO_PARAM_TOOL]}
    yield "long", [m for i in range(12) for m in (u(f"question {i}"), a(f"answer {i}"))], {}
    yield "thinking_field", [u("hi"), a("hello", thinking="the user greets me")], {}
    yield "thinking_then_user", [u("hi"), a("hello", thinking="old thoughts"), u("again")], {}
    yield "developer_role", [{"role": "developer", "content": "Follow the rules."}, u("ok?")], {}
    yield "tool_call_thinking", [u("weather?"), a("", thinking="need the tool",
                                                  tool_calls=[call("get_weather", {"city": "Paris"})]),
                                 t("sunny")], {"tools": [WEATHER_TOOL]}
    yield "tool_call_then_final", [u("weather?"), a("checking", tool_calls=[call("get_weather", {"city": "Paris"})]),
                                   t("sunny"), a("It is sunny.")], {"tools": [WEATHER_TOOL]}
    yield "gpt_oss_kwargs", [s("Developer text"), u("hi")], {"reasoning_effort": "high",
                                                             "model_identity": "You are a test model.",
                                                             "builtin_tools": ["browser", "python"]}
    yield "gpt_oss_browser_only", [u("hi")], {"builtin_tools": ["browser"], "tools": [SEARCH_TOOL]}
    # Conversations some templates reject with raise_exception:
    yield "not_alternating", [u("one"), u("two")], {}
    yield "starts_with_assistant", [a("I speak first"), u("ok")], {}
    yield "unknown_role", [u("q"), {"role": "narrator", "content": "meanwhile"}], {}
    yield "tool_without_call", [u("q"), t("orphan result")], {}
    yield "channel_tags_in_content", [u("q"), a("<|channel|>analysis<|message|>leak")], {}
    yield "content_and_thinking_with_tools", [u("q"), a("text", thinking="thought",
                                                        tool_calls=[call("now", {})])], {"tools": [NO_PARAM_TOOL]}
    yield "only_system", [s("alone")], {}
    yield "tool_content_list", [u("q"), a("", tool_calls=[call("now", {})]),
                                t([{"output": "first"}, "second"])], {"tools": [NO_PARAM_TOOL]}
    yield "nothink_suffix", [u("short answer /nothink")], {}
    yield "nonstring_content", [u(5), a(1.5), u(True), a(None)], {}
    yield "extra_keys", [dict(u("q"), name="alice", id=7), dict(a("a"), mask=1, weight=0.5)], {}


def variants(spec, name):
    yield {"add_generation_prompt": True}
    yield {"add_generation_prompt": False}
    if spec.get("thinking"):
        yield {"add_generation_prompt": True, "enable_thinking": False}
        if name in ("single_user", "reasoning_last", "nothink_suffix", "multi_turn"):
            yield {"add_generation_prompt": True, "enable_thinking": True}
            yield {"add_generation_prompt": False, "enable_thinking": False}


# Small templates for the features the real templates above may not reach; each is rendered
# with CONTEXT. Whitespace-control and scoping cases come first.
SNIPPET_CONTEXT = {
    "xs": [3, 1, 2], "s": "  Hello, World  ", "d": {"b": 2, "a": 1, "c": [1, 2]}, "n": None,
    "f": 2.5, "i": -7, "t": True, "e": "", "u": "héllo wörld 世界", "big": 12345678901234,
    "msgs": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
             {"role": "user", "content": "z", "extra": 1}],
    "floats": [0.1, 1e16, 1e-5, 123456789.125, 1.0, -0.0, 3e-4, 1e15, 2.5e-10, 100.0],
}
SNIPPETS = [
    "a\n  {% if t %}\n    yes\n  {% endif %}\nb",
    "a\n  {%+ if t %}x{% endif +%}\nb",
    "a  {%- if t -%}  x  {%- endif -%}  b",
    "a\n{# comment #}\nb\n  {#- c2 -#}\n  c",
    "{{ 'x' }}\n{{ 'y' }}\n",
    "line\n\n",
    "  {{ 'print does not lstrip' }}\n  {% set q = 1 %}  tail",
    "{% if t %}\n\n{% endif %}|  {% if t %}  x\n  {% endif %}\n|",
    "a\r\n{% if t %}\r\nb\r\n{% endif %}\r\nc\rd",
    "\t{% if t %}x{% endif %}|x {% if t %}y{% endif %}|\n \t {% if t %}z{% endif %}",
    "{{- 'a' -}}\n\n  {{ 'b' }}  {#- c -#}   x\n    {%- if t %}b{% endif %}",
    "{% if t %}   \n{% endif %}|{% if t %}\n   {% endif %}|",
    "{{ '{{' }}{{ '}}' }}{{ {'a': {'b': 1}} }}{{ '%}' }}{# {{ not code }} #}",
    "x\n\n",
    "a\u00a0\u3000 {%- if t -%} \u2028\u00a0b{% endif %}",
    "{% for x in xs -%}\n  {{ x }}\n{%- endfor %}",
    "{% for x in xs %}\n  {{ x }}\n{% endfor %}",
    "  {#- comment -#}  \n  {#+ keep +#}\n{# plain #}\n  {# lstripped #}\nend",
    "{% macro m(x) -%}\n  [{{ x }}]\n{%- endmacro %}\n{{ m(1) }}{{ m(2) }}",
    "{% for x in xs %}{{ x }}{{ ',' if not loop.last }}{% endfor %}",
    "{% for x in xs %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.revindex0 }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }};{% endfor %}",
    "{% for x in [] %}never{% else %}empty{% endfor %}|{% for x in xs if x > 1 %}{{ x }}{{ loop.length }}{% else %}none{% endfor %}",
    "{% for x in xs %}{% if x == 1 %}{% continue %}{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}{{ x }}{% endfor %}",
    "{% for x in xs %}{{ loop.previtem }}>{{ x }}>{{ loop.nextitem }},{% endfor %}",
    "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
    "{% for a, b in [[1, 2], (3, 4)] %}{{ a + b }}{% endfor %}",
    "{% set y = 'outer' %}{% for x in xs %}{{ y }}{% set y = x %}{{ y }},{% endfor %}{{ y }}",
    "{% set ns = namespace(total=0, items=[]) %}{% for x in xs %}{% set ns.total = ns.total + x %}{% endfor %}{{ ns.total }} {{ ns.items }}",
    "{% set a, b = 1, 2 %}{{ a }}{{ b }}{% set c = (3, 4) %}{{ c }}{{ c[0] }}",
    "{% set block %}inside {{ xs|length }}{% endset %}[{{ block }}]",
    "{% macro greet(name, greeting='Hello', punct='!') %}{{ greeting }}, {{ name }}{{ punct }}{% endmacro %}{{ greet('A') }} {{ greet('B', 'Hi') }} {{ greet('C', punct='?') }} {{ greet(name='D') }}",
    "{% macro fact(k) %}{% if k <= 1 %}1{% else %}{{ k * fact(k - 1)|int }}{% endif %}{% endmacro %}{{ fact(6) }}",
    "{% macro m(a) %}[{{ a }}|{{ a is defined }}]{% endmacro %}{{ m() }}{{ m(none) }}",
    "{{ xs[0] }}{{ xs[-1] }}{{ xs[1:] }}{{ xs[:2] }}{{ xs[::-1] }}{{ xs[::2] }}{{ xs[-2:] }}{{ xs[5:] }}{{ xs[1:-1] }}",
    "{{ u[::-1] }}|{{ u[1:4] }}|{{ u[-2:] }}|{{ u|length }}|{{ u[0] }}{{ u[-1] }}",
    "{{ 7 % 3 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 / 2 }} {{ 6 / 3 }} {{ 2 ** 10 }} {{ 2 ** -1 }} {{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ -i }} {{ f * 2 }} {{ i + f }} {{ t + 1 }}",
    "{{ 'a' ~ 1 ~ none ~ t ~ f ~ xs }}|{{ 'ab' * 3 }}|{{ [1] + [2, 3] }}|{{ 'x' + 'y' }}",
    "{{ 1 == 1.0 }} {{ 'a' < 'b' }} {{ 2 > 1 > 0 }} {{ 1 != 2 }} {{ xs == [3, 1, 2] }} {{ d == {'a': 1, 'b': 2, 'c': [1, 2]} }} {{ n == none }} {{ 'ell' in s }} {{ 4 in xs }} {{ 'a' in d }} {{ 'z' not in d }}",
    "{{ t and 'yes' }} {{ e or 'default' }} {{ not e }} {{ n or [] }} {{ 0 or 0.0 }} {{ xs and xs[0] }} {{ not t or not e }}",
    "{{ 'A' if t else 'B' }}{{ 'C' if e else 'D' }}[{{ 'E' if e }}]{{ 1 if n is none else 2 }}",
    "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.strip(' H') }}|{{ 'xxhixx'.strip('x') }}|{{ s.split(',') }}|{{ s.split() }}|{{ 'a,b,c'.split(',', 1) }}|{{ s.replace('l', 'L') }}|{{ s.upper() }}|{{ s.lower() }}|{{ 'hello world'.title() }}|{{ s.startswith('  He') }}|{{ s.endswith(('x', '  ')) }}|{{ 'abc'.find('c') }}|{{ 'hello'.capitalize() }}",
    "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 5) }} {{ d.keys()|list }} {{ d.values()|list }} {{ d['b'] }} {{ d.c[1] }} {{ d['zz'] is defined }}",
    "{{ xs|length }} {{ d|length }} {{ s|length }} {{ xs|join(', ') }} {{ xs|join }} {{ xs|first }} {{ xs|last }} {{ s|trim }} {{ s|upper }} {{ s|lower }} {{ 'a-b'|replace('-', '+') }} {{ 42|string }} {{ '42'|int + 1 }} {{ 'x'|int }} {{ '3.5'|float }} {{ 3.9|int }} {{ 'abc'|list }} {{ d|items|list }} {{ missing|default('dflt') }} {{ e|default('dflt', true) }} {{ e|default('dflt') }} {{ [3, 1, 3]|unique|list }} {{ xs|reverse|list }} {{ i|abs }} {{ u|title }}",
    "{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(',') }} {{ msgs|rejectattr('extra')|list|length }} {{ msgs|selectattr('extra')|list|length }} {{ msgs|map(attribute='role')|list }}",
    "{{ d|tojson }}|{{ d|tojson(indent=2) }}|{{ xs|tojson(separators=(',', ':')) }}|{{ d|tojson(sort_keys=true) }}|{{ u|tojson }}|{{ floats|tojson }}|{{ n|tojson }}|{{ 'q\"\\\\\\n\\t'|tojson }}|{{ {}|tojson }}{{ []|tojson(indent=2) }}",
    "{{ floats }}|{% for x in floats %}{{ x }} {% endfor %}|{{ big }} {{ 1e100 }} {{ 0.1 + 0.2 }}",
    "{{ n }} {{ t }} {{ xs }} {{ d }} {{ ('a', 1) }} {{ ('a',) }} {{ [\"it's\", 'say \"hi\"', 'both \\' \"', 'nl\\n'] }} {{ d.items()|list }}",
    "{{ x is defined }} {{ n is none }} {{ s is string }} {{ d is mapping }} {{ xs is iterable }} {{ s is iterable }} {{ 1 is number }} {{ f is number }} {{ t is number }} {{ xs is sequence }} {{ d is sequence }} {{ t is true }} {{ 1 is true }} {{ false is false }} {{ 2 is equalto 2 }} {{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 'a' is in 'abc' }} {{ s is not string }} {{ n is not none }} {{ 1 is integer }} {{ f is float }} {{ t is boolean }} {{ 'abc' is lower }} {{ missing is undefined }} {{ d.zz is not defined }}",
    "{{ -xs|length }}",
    "{{ not n is none }} {{ xs|length - 1 }} {{ 'ab' ~ 'cd'|upper }} {{ 1 + 2 if t else 3 }}",
    "{{ '\\u00e9\\x41\\101\\'\\\"' }} {{ \"a\" 'b' }} {{ 1_000 }} {{ 1.5e3 }} {{ True }} {{ None }}",
    "{% if n %}a{% elif e %}b{% elif t %}c{% else %}d{% endif %}",
    "{{ range(3)|list }} {{ range(1, 7, 2)|list }} {{ dict(a=1) }} {% for _ in range(2) %}r{% endfor %}",
    "{% set x = msgs[0] %}{{ x.role }} {{ x['content'] }} {{ x.missing }} {{ msgs[10] }} {{ msgs[0].content.upper() }}",
    "{% set w = 'ça ÉTÉ straße łódź ωμεγα ς привет ЁЖ 世界abc ÿ x1y' %}{{ w.upper() }}|{{ w.lower() }}|{{ w.title() }}|{{ w.capitalize() }}|{{ w|upper }}",
    "{{ missing|upper }}|{{ missing|trim }}|{{ missing|join(',') }}|{{ missing|list }}|{{ missing|map(attribute='a')|list }}|{{ missing|selectattr('a')|list }}|{{ missing|unique|list }}|{{ missing|replace('a', 'b') }}|{{ missing|string }}|{{ missing|length }}|{{ missing|first }}|{{ missing|items|list }}|{{ missing|d('x') }}|{{ none|upper }}|{{ xs|string|upper }}",
    "{{ 'x1y hello-world (a) [b] {c} <d> ßa ÉCOLE\tnew'|title }}|{{ 'x1y hello-world'.title() }}",
    "{{ missing|abs }}",
    "{{ missing|int }}",
    "{{ missing|float }}",
    "{{ missing|reverse|list }}{{ missing|capitalize }}{{ missing|lower }}{{ missing|title }}",
    "{{ missing|tojson }}",
    "{{ missing + 1 }}",
    "{{ missing.attr }}",
    "{{ d.zz.attr }}",
    "{{ n.attr }}|{{ n.attr is defined }}",
    "{{ xs|length > 2 and 'long' or 'short' }}",
    "{% set ns = namespace(a=1) %}{% set ns.b = ns.a + 1 %}{{ ns.b }}{{ ns.c is defined }}",
    "{{ 'abc'[5:10] }}|{{ xs[10:] }}|{{ xs[-10:1] }}|{{ xs[::-2] }}|{{ 'abcdef'[4:1:-1] }}|{{ xs[none:2] }}",
    "{{ 'a' in missing }}|{{ 1 in [] }}|{{ msgs[0] in msgs }}|{{ {'role': 'user', 'content': 'x'} in msgs }}",
    "{% generation %}gen {{ xs[0] }}{% endgeneration %}",
]


def snippet_cases(compile_fn):
    cases = []
    for text in SNIPPETS:
        template, _ = compile_fn(text)
        case = {"template": None, "source": text, "name": "snippet", "context": SNIPPET_CONTEXT}
        try:
            case["expected"] = template.render(**SNIPPET_CONTEXT)
        except jinja2.exceptions.TemplateError as e:
            if type(e) is jinja2.exceptions.TemplateError:
                case["error"] = str(e)
            else:
                case["error_kind"] = type(e).__name__
        except Exception as e:
            case["error_kind"] = type(e).__name__
        cases.append(case)
    return cases


def main():
    cases = []
    engine = None
    counts = {}
    for file, spec in TEMPLATES.items():
        with open(os.path.join(HERE, file), encoding="utf-8") as f:
            template, engine = compile_template(f.read())
        for name, messages, extra in conversations():
            for kwargs in variants(spec, name):
                context = {"messages": messages, "tools": extra.get("tools"), "documents": None}
                context.update(kwargs)
                context.update({k: v for k, v in extra.items() if k != "tools"})
                for tok in ("bos_token", "eos_token"):
                    if spec.get(tok) is not None:
                        context[tok] = spec[tok]
                case = {"template": file, "name": name, "context": context}
                try:
                    case["expected"] = template.render(
                        **context, strftime_now=lambda fmt: NOW_DT.strftime(fmt))
                except jinja2.exceptions.TemplateError as e:
                    # raise_exception raises exactly TemplateError; subclasses (UndefinedError,
                    # ...) and Python errors are failures whose wording is not compared.
                    if type(e) is jinja2.exceptions.TemplateError:
                        case["error"] = str(e)
                    else:
                        case["error_kind"] = type(e).__name__
                except Exception as e:  # TypeError etc. from the template's own operations
                    case["error_kind"] = type(e).__name__
                cases.append(case)
                counts[file] = counts.get(file, 0) + 1
    cases += snippet_cases(compile_template)
    counts["snippets"] = len(SNIPPETS)
    # One case a line: small diffs when a template or the engine changes.
    with open(os.path.join(HERE, "cases.json"), "w", encoding="utf-8") as f:
        f.write('{"now": %d, "engine": %s, "cases": [\n' % (NOW, json.dumps(engine)))
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in cases))
        f.write("\n]}\n")
    for file, n in counts.items():
        print(f"{file}: {n} cases", file=sys.stderr)
    print(f"rendered with {engine}: {len(cases)} cases", file=sys.stderr)


if __name__ == "__main__":
    main()
