"""Hostile templates: renders that would take unbounded time or memory are refused within seconds and well under
1 GB, with the task's template, the record's file:line and the limit; templates that fail on a record or render an
empty prompt are errors, never tracebacks."""

from __future__ import annotations

import pytest

from hostile_helpers import Bounded, refused, tiny_config
from instructune.config import LimitsConfig, TaskConfig
from instructune.data.load import Record
from instructune.errors import InstructuneError
from instructune.prompts.template import RenderLimit, build_task_template, render


def _with_prompt(tmp_path, tiny_model, prompt: str) -> tuple[dict, str]:
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["template"] = {"prompt": prompt, "completion": "{{ label }}"}
    return cfg, cfg["tasks"][0]["data"]["train"]


UNBOUNDED = {  # a prompt whose render would take unbounded memory or time -> what the refusal says
    "a one-gigabyte string": ("{{ text }} {{ 'a' * 10**9 }}",
                              ("'tiny_classification' template's prompt", "max_render_chars = 1,000,000")),
    "the nested range loop": (
        "{% for i in range(10**6) %}{% for j in range(10**6) %}x{% endfor %}{% endfor %}{{ text }}",
        ("range() of 1,000,000 numbers is over the limit of 100,000",)),
    "a nested loop within the range cap (the time limit)": (
        "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}{{ text }}",
        ("took longer than max_render_seconds = 2",)),
}


@pytest.mark.parametrize("case", list(UNBOUNDED))
def test_an_unbounded_render_is_refused_fast_and_small(tmp_path, tiny_model, case):
    prompt, fragments = UNBOUNDED[case]
    cfg, train = _with_prompt(tmp_path, tiny_model, prompt)
    with Bounded() as b:
        refused(tmp_path, cfg, f"{train}:1", *fragments)
    assert b.seconds < 5 and b.grown_mib < 200, (b.seconds, b.grown_mib)


def test_a_template_that_renders_an_empty_prompt(tmp_path, tiny_model):
    cfg, train = _with_prompt(tmp_path, tiny_model, "{% if false %}{{ text }}{% endif %}  ")
    refused(tmp_path, cfg, f"{train}:1", "template's prompt renders empty")


def test_a_division_by_zero_names_the_record(tmp_path, tiny_model):
    cfg, train = _with_prompt(tmp_path, tiny_model, "{{ text }} {{ 1 / (text|length - text|length) }}")
    refused(tmp_path, cfg, f"{train}:1", "failed on this record: ZeroDivisionError")


def test_an_include_is_a_template_error(tmp_path, tiny_model):
    cfg, train = _with_prompt(tmp_path, tiny_model, "{% include '/etc/passwd' %}{{ text }}")
    refused(tmp_path, cfg, f"{train}:1", "'tiny_classification'")


def test_a_sandbox_escape_is_refused(tmp_path, tiny_model):
    cfg, train = _with_prompt(tmp_path, tiny_model, "{{ text.__class__.__mro__[1].__subclasses__() }}")
    refused(tmp_path, cfg, f"{train}:1", "'tiny_classification' prompt", "is unsafe")


def test_a_bad_separator_is_named_by_its_key(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["template"] = {"prompt": "{{ text }}", "completion": "{{ label }}", "separator": "{% if %}"}
    refused(tmp_path, cfg, "tasks.tiny_classification.template.separator", "not valid Jinja")


# Every way a template can spend unbounded memory or time, refused by render() itself within a second.
HOSTILE = {
    "string times a billion": "{{ 'a' * 10**9 }}",
    "list times a billion": "{{ ([1] * 10**9)|length }}",
    "huge power": "{{ 2 ** (10 ** 9) }}",
    "range of a million": "{{ range(10**6)|list|length }}",
    "center filter": "{{ 'a'|center(10**9) }}",
    "center method": "{{ 'a'.center(10**9) }}",
    "format width": "{{ '{:>999999999}'.format('a') }}",
    "format width as argument": "{{ '{:>{}}'.format('a', 10**9) }}",
    "percent width": "{{ '%999999999s' % 'a' }}",
    "percent star width": "{{ '%*s' % (10**9, 'a') }}",
    "replace growth": "{{ ('a' * 1000000)|replace('a', 'a' * 1000) }}",
    "tilde doubling": "{% set a = 'x' * 1000000 %}{% set b = a ~ a %}{{ b|length }}",
    "namespace doubling in a loop": "{% set ns = namespace(s='xx') %}{% for i in range(100) %}"
                                    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "captured block of repeats": "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}"
                                 "{{ x|length }}",
    "literal text repeated by loops": "{% for i in range(100000) %}" + "z" * 100 + "{% endfor %}",
    "macro doubling": "{% macro d(s) %}{{ s }}{{ s }}{% endmacro %}" + "{{ " + "d(" * 24 + "'x'" + ")" * 24 + " }}",
    "join of a long list": "{{ ('a' * 1000000)|list|join('bbbbbbbbbbbbbbbb') }}",
    "sum of repeated lists": "{{ ([['a'] * 100000] * 100000)|sum(start=[]) }}",
    "batch with a fill": "{{ [1]|batch(10**9, 0)|list }}",
    "indent width": "{{ ('a\n' * 1000)|indent(10**6) }}",
    "plus doubling": "{% set a = 'x' * 600000 %}{{ a + a }}",
    "empty nested loops": "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_render_refuses_each_unbounded_construct(case):
    with Bounded() as b:
        with pytest.raises(RenderLimit) as e:
            render(HOSTILE[case], {}, 1_000_000, 0.5)
    assert "max_render" in str(e.value) or "range()" in str(e.value) or "bits" in str(e.value)
    assert b.seconds < 1.5 and b.grown_mib < 200, (b.seconds, b.grown_mib)


def test_render_within_the_limits_is_unchanged():
    src = ("{{ name }} {% for i in range(3) %}{{ i }}{% endfor %} {{ 'ab' ~ 'c' }} {{ '%5s' % 'x' }} "
           "{{ '{:>3}'.format('a') }} {{ [1, 2]|join(',') }} {{ '-' * 3 }} {{ 2 ** 10 }}")
    assert render(src, {"name": "Bob"}, 1000, 1.0) == "Bob 012 abc     x   a 1,2 --- 1024"


def test_configured_limits_reach_the_template_and_name_the_record():
    task = TaskConfig(name="t", type="summarization", data={"path": "x.jsonl"},
                      template={"prompt": "{{ text * 3 }}", "completion": "{{ summary }}"})
    template = build_task_template(task, "raw", 32, LimitsConfig(max_render_chars=100, max_render_seconds=1))
    assert template.pair(Record({"text": "a" * 30, "summary": "s"}, "f.jsonl:1")).messages[0]["content"] == "a" * 90
    with pytest.raises(InstructuneError) as e:
        template.pair(Record({"text": "a" * 40, "summary": "s"}, "f.jsonl:2"))
    assert e.value.where == "f.jsonl:2"
    assert "'t' template's prompt" in str(e.value) and "max_render_chars = 100 (limits.max_render_chars)" in str(e.value)
    saved = type(template).from_dict(template.to_dict())  # the limits travel with the saved template
    assert (saved.max_render_chars, saved.max_render_seconds) == (100, 1)


def test_a_configured_time_limit_is_kept():
    task = TaskConfig(name="t", type="summarization", data={"path": "x.jsonl"},
                      template={"prompt": "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}"
                                          "{% endfor %}{{ text }}", "completion": "{{ summary }}"})
    template = build_task_template(task, "raw", 32, LimitsConfig(max_render_seconds=0.3))
    with Bounded() as b:
        with pytest.raises(InstructuneError) as e:
            template.pair(Record({"text": "a", "summary": "s"}, "f.jsonl:9"))
    assert e.value.where == "f.jsonl:9" and "max_render_seconds = 0.3" in str(e.value)
    assert b.seconds < 1.5
