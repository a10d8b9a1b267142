"""OpenAI fine-tuning files taken as they are: per-turn `weight`, multi-turn conversations, `tools` and tool calls
rendered by the model's chat template, and OpenAI's documented format errors (file:line, exit 2)."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from conftest import GRAD_RTOL, LOSS_RTOL, grads_gap, tiny_config, write_config, write_jsonl
from instructune.cli import app
from instructune.config import TaskConfig
from instructune.data import Record
from instructune.errors import InstructuneError
from instructune.prompts import PromptFormat, build_task_template
from instructune.prompts.format import IGNORE
from instructune.train.audit import audit_masking
from instructune.train.batching import split_by_tokens
from instructune.train.collate import collate
from instructune.train.loss import completion_loss_sum

# ChatML with tool support, written the way Qwen2.5's template renders tools, calls and results
TOOL_CHATML = (
    "{% if tools %}{{ '<|im_start|>system\n' }}{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\n\n' }}{% endif %}{{ '# Tools\n<tools>' }}{% for tool in tools %}"
    "{{ '\n' + (tool | tojson) }}{% endfor %}{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if message['content'] %}{{ message['content'] }}{% endif %}{% for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>\n' + ({'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson)"
    " + '\n</tool_call>' }}{% endfor %}{{ '<|im_end|>\n' }}{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif message['role'] != 'system' %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def multi_turn(i: int = 0) -> dict:
    """A conversation as OpenAI's guide shows it: a weight-0 turn, a default (trained) one, a weighted final one."""
    return {"messages": [{"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."},
                         {"role": "user", "content": "What's the capital of France?"},
                         {"role": "assistant", "content": f"Paris {i}", "weight": 0},
                         {"role": "user", "content": "Can you be more sarcastic?"},
                         {"role": "assistant", "content": f"Paris, as if everyone doesn't know that already {i}."},
                         {"role": "user", "content": "And of Portugal?"},
                         {"role": "assistant", "content": f"Lisbon {i}, obviously.", "weight": 1}]}


def short(i: int) -> dict:
    """Three assistant turns, two trained, in few tokens (a fused shared-prefix row stays within FUSED_MAX)."""
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": f"A{i}"}, {"role": "user", "content": "More"},
                         {"role": "assistant", "content": f"B{i}", "weight": 0}, {"role": "user", "content": "Last"},
                         {"role": "assistant", "content": f"C{i}"}]}


def with_tools(i: int = 0) -> dict:
    return {"tools": [WEATHER],
            "messages": [{"role": "user", "content": f"What is the weather in Paris {i}?"},
                         {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {
                             "name": "get_weather", "arguments": json.dumps({"city": f"Paris {i}"})}}]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                         {"role": "assistant", "content": f"It is sunny in Paris {i}."}]}


@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory):
    """The tiny chat model with a chat template that renders tools."""
    path = tmp_path_factory.mktemp("tiny-tools")
    shutil.copytree(tiny_model, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = TOOL_CHATML
    tok.save_pretrained(path)
    return path


def pair_of(record: dict, where: str = "chat.jsonl:3"):
    task = TaskConfig(name="t", type="summarization", data={"path": "x.jsonl"})
    return build_task_template(task, "messages", 64).pair(Record(copy.deepcopy(record), where))


def as_template_takes(record: dict) -> tuple[list[dict], list[int | None]]:
    """The turns as transformers' chat templates take them (tool-call arguments as objects), and their weights."""
    turns, weights = [], []
    for m in record["messages"]:
        m = {k: v for k, v in m.items() if k != "weight"}
        for call in m.get("tool_calls", []):
            call["function"] = {**call["function"], "arguments": json.loads(call["function"]["arguments"])}
        turns.append(m)
        weights.append(record["messages"][len(weights)].get("weight", 1) if m["role"] == "assistant" else None)
    return turns, weights


def expected_labels(tok, record: dict) -> tuple[list[int], list[int], list[str]]:
    """From the template's own text alone: the conversation's tokens, the label each should get (its own id inside
    an assistant turn of weight 1, from its first character to its end-of-turn token, IGNORE elsewhere), and the text
    of each trained turn."""
    turns, weights = as_template_takes(record)
    tools = record.get("tools")
    full = tok.apply_chat_template(turns, tools=tools, tokenize=False).rstrip("\n ")
    spans = []
    for j, w in enumerate(weights):
        if w:
            start = len(tok.apply_chat_template(turns[:j], tools=tools, add_generation_prompt=True, tokenize=False))
            end = len(tok.apply_chat_template(turns[:j + 1], tools=tools, tokenize=False).rstrip("\n "))
            spans.append((start, end))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(s <= a and b <= e for s, e in spans) else IGNORE
              for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels, [full[s:e] for s, e in spans]


def runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    out, cur = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE:
            cur.append(t)
        elif cur:
            out, cur = out + [cur], []
    return out + ([cur] if cur else [])


def unweighted() -> dict:
    """The same conversation with no `weight` at all: every assistant turn is trained, as at OpenAI."""
    return {"messages": [{k: v for k, v in m.items() if k != "weight"} for m in multi_turn()["messages"]]}


@pytest.mark.parametrize("record", [multi_turn(), with_tools(), unweighted()], ids=["weights", "tools", "no weights"])
def test_supervised_tokens_are_exactly_the_weighted_assistant_turns(tool_model, record):
    tok = AutoTokenizer.from_pretrained(tool_model)
    fmt = PromptFormat(tok, chat=True)
    pair = pair_of(record)
    enc = fmt.encode(pair, max_length=512, answer_tokens=16)
    ids, labels, texts = expected_labels(tok, record)
    assert enc.input_ids == ids  # the rendered conversation, token for token
    assert enc.labels == labels  # trained: exactly the weighted assistant turns, each with its end-of-turn token
    assert [tok.decode(r) for r in runs(enc.input_ids, enc.labels)] == texts
    assert all(t.endswith("<|im_end|>") for t in texts)
    weights = [m.get("weight", 1) for m in record["messages"] if m["role"] == "assistant"]
    assert len(texts) == sum(weights)
    assert audit_masking([enc], fmt.end_ids(), "train")["trained_turns"] == sum(weights)
    # evaluation: the last assistant turn is the answer, everything before it the prompt generation sees
    prompt = fmt.encode_prompt(fmt.prompt_text(pair.messages, tools=pair.tools))
    assert enc.input_ids[:len(prompt)] == prompt
    assert pair.completion == record["messages"][-1]["content"]


def test_tool_calls_render_as_the_chat_template_says(tool_model):
    tok = AutoTokenizer.from_pretrained(tool_model)
    fmt = PromptFormat(tok, chat=True)
    enc = fmt.encode(pair_of(with_tools(7)), max_length=512, answer_tokens=16)
    call, answer = [tok.decode(r) for r in runs(enc.input_ids, enc.labels)]
    assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris 7"}}\n</tool_call><|im_end|>'
    assert answer == "It is sunny in Paris 7.<|im_end|>"
    text = tok.decode(enc.input_ids)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in text  # the record's tools, where the template puts them
    assert "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>" in text  # the tool's result
    # a conversation that ends in a tool call: its reference answer is the call as JSON
    record = with_tools(7)
    record["messages"] = record["messages"][:2]
    assert json.loads(pair_of(record).completion) == {"name": "get_weather", "arguments": {"city": "Paris 7"}}


def test_tools_are_refused_by_name_where_the_template_has_none(tiny_model, tiny_plain_model):
    fmt = PromptFormat(AutoTokenizer.from_pretrained(tiny_model), chat=True)  # plain ChatML: no tool support
    with pytest.raises(InstructuneError, match=r"chat.jsonl:3: the chat template of .*tiny-chat.* has no tool support: "
                                               r"it never reads `tools`"):
        fmt.encode(pair_of(with_tools()), 512, 16)
    no_tools = with_tools()
    del no_tools["tools"]
    with pytest.raises(InstructuneError, match="never reads assistant `tool_calls`"):
        fmt.encode(pair_of(no_tools), 512, 16)
    plain = PromptFormat(AutoTokenizer.from_pretrained(tiny_plain_model), chat=False)
    with pytest.raises(InstructuneError, match=r"chat.jsonl:3: this record has 1 earlier trained assistant turn\(s\), "
                                               "which needs the model's chat template"):
        plain.encode(pair_of(multi_turn()), 512, 16)


def _loss_and_grads(model, batches):
    model.zero_grad()
    loss = sum(completion_loss_sum(model, b) for b in batches)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_every_lean_training_path_trains_each_weighted_turn_alike(tool_model):
    """Several trained turns per example: packing, the shared prefix (fused and two passes) and passes split by a
    token budget give the loss and gradients of the plain padded batch, which equal the model's own full-logits
    cross-entropy over the weighted turns."""
    tok = AutoTokenizer.from_pretrained(tool_model)
    model = AutoModelForCausalLM.from_pretrained(tool_model).train()
    fmt = PromptFormat(tok, chat=True)
    exs = [fmt.encode(pair_of(multi_turn(i)), 512, 16) for i in range(3)] + [fmt.encode(pair_of(with_tools()), 512, 16)]
    reference = _loss_and_grads(model, [collate(exs, tok.pad_token_id)])
    with torch.no_grad():
        full = sum(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1],
                                                     torch.tensor(e.labels[1:]), ignore_index=IGNORE, reduction="sum")
                   for e in exs)
    assert full.item() == pytest.approx(reference[0], rel=LOSS_RTOL)
    shared = [fmt.encode(pair_of(short(i)), 512, 16) for i in range(3)]  # one system prompt and first question
    shared_ref = _loss_and_grads(model, [collate(shared, tok.pad_token_id)])
    two_pass = collate(shared, tok.pad_token_id, min_shared=8)
    fused = collate(shared, tok.pad_token_id, min_shared=8, fused=True)
    assert "prefix_ids" in two_pass and fused["attention_mask"].dim() == 4
    lengths = [len(e.input_ids) for e in exs]
    passes = [collate([exs[i] for i in p], tok.pad_token_id) for p in split_by_tokens(list(range(4)), lengths, 150)]
    assert len(passes) > 1
    for batches, ref in (([collate(exs, tok.pad_token_id, packed=True)], reference), (passes, reference),
                         ([two_pass], shared_ref), ([fused], shared_ref)):
        loss, grads = _loss_and_grads(model, batches)
        assert loss == pytest.approx(ref[0], rel=LOSS_RTOL)
        assert grads_gap(grads, ref[1]) < GRAD_RTOL


def test_audit_checks_every_trained_turn_ends_its_turn():
    from instructune.prompts.format import Encoded

    with pytest.raises(InstructuneError, match="chat.jsonl:4: trained assistant turn 1 ends with token 6"):
        audit_masking([Encoded([1, 5, 6, 2, 7, 9], [IGNORE, 5, 6, IGNORE, 7, 9], "chat.jsonl:4")], {9}, "train")


# -- OpenAI's documented format errors, through the CLI: one line naming file:line, exit status 2 ---------------
def _chat_config(tmp_path, model, change=None, line=3, **train):
    cfg = tiny_config(tmp_path, model, ("summarization",), **train)
    task = cfg["tasks"][0]
    for split, n in (("train", 8), ("validation", 3), ("test", 4)):
        rows = [with_tools(i) if i % 2 else multi_turn(i) for i in range(n)]
        if split == "train" and change:
            change(rows[line - 1])
        task["data"][split] = str(write_jsonl(tmp_path / "data" / f"{split}.jsonl", rows))
    return write_config(tmp_path, cfg)


def _msg(i, **update):
    return lambda r: r["messages"][i].update(update)


FORMAT_ERRORS = {
    "missing_messages_list": (lambda r: r.update(messages=None), "no `messages` list (OpenAI: missing_messages_list)"),
    "message_missing_key": (lambda r: r["messages"][1].pop("content"), "messages[1] has no `content` (OpenAI: "
                                                                       "message_missing_key)"),
    "missing role": (lambda r: r["messages"][1].pop("role"), "messages[1].role is None"),
    "message_unrecognized_key": (_msg(1, speaker="bob"), "messages[1] has unrecognized key(s) 'speaker'"),
    "unrecognized_role": (_msg(0, role="bot"), "messages[0].role is 'bot'; expected one of system, user, assistant, "
                                               "tool (OpenAI: unrecognized_role)"),
    "missing_content": (_msg(1, content=""), "messages[1].content is empty (OpenAI: missing_content)"),
    "content not a string": (_msg(1, content=5), "messages[1].content is the number 5; expected a string"),
    "example_missing_assistant_message": (
        lambda r: r.update(messages=[m for m in r["messages"] if m["role"] != "assistant"]),
        "(OpenAI: example_missing_assistant_message)"),
    "too many tokens": (_msg(1, content="word " * 1500), "too many tokens: the conversation is"),
    "weight not 0 or 1": (_msg(2, weight=2), "messages[2].weight is the number 2; expected 0 (not trained) or 1"),
    "weight on a user turn": (_msg(1, weight=1), "messages[1].weight is on a user message"),
    "every weight 0": (lambda r: [m.update(weight=0) for m in r["messages"] if m["role"] == "assistant"],
                       "every assistant turn has weight 0"),
    "tool call arguments": (lambda r: r.update(with_tools()) or r["messages"][1]["tool_calls"][0]["function"].update(
        arguments="{city"), "messages[1].tool_calls[0].function.arguments is not JSON"),
    "deprecated function_call": (_msg(2, function_call={"name": "f", "arguments": "{}"}),
                                 "function_call is OpenAI's deprecated function calling"),
}


@pytest.mark.parametrize("case", list(FORMAT_ERRORS))
def test_each_documented_format_error_names_the_line_and_exits_2(tool_model, tmp_path, case):
    change, fragment = FORMAT_ERRORS[case]
    result = CliRunner().invoke(app, ["data", "lint", str(_chat_config(tmp_path, tool_model, change, line=3))])
    assert result.exit_code == 2, result.output
    assert f"train.jsonl:3: " in result.output and fragment in result.output, result.output
    assert "Traceback" not in result.output and result.output.count("error:") == 1


def test_tools_without_template_support_fail_before_anything_is_written(tiny_model, tmp_path):
    result = CliRunner().invoke(app, ["data", "lint", str(_chat_config(tmp_path, tiny_model))])
    assert result.exit_code == 2 and "train.jsonl:2: the chat template of" in result.output, result.output
    assert "has no tool support: it never reads `tools`" in result.output


def test_data_lint_reports_tokens_per_turn_and_what_a_cut_takes(tool_model, tmp_path):
    long = _msg(3, content="Can you be more sarcastic? " * 20)  # over max_length 384, well within the context
    result = CliRunner().invoke(app, ["data", "lint", str(_chat_config(tmp_path, tool_model, long, line=3,
                                                                       max_length=384))])
    assert result.exit_code == 0, result.output
    assert "tokens per turn, most: system 41, user 367, assistant 76, tool 41; 16 trained assistant turns in 8 " \
           "conversations" in result.output
    assert "1 training pairs longer than train.max_length 384 (cut by up to 154 tokens" in result.output
    # the oldest turns go first (all but the first token); the final answer keeps what the prompt's rule leaves it
    # (max_length less the prompt cut to leave the task's max_new_tokens, as inference cuts it), its end token last
    assert ("train.jsonl:3: 'turn 0 (system) loses 40 of 41 tokens; turn 1 (user) loses 26 of 26 tokens; turn 2 "
            "(assistant) loses 14 of 14 tokens; turn 3 (user) loses 65 of 367 tokens; turn 6 (assistant, trained) "
            "loses 9 of 24 tokens'") in result.output  # 40 + 26 + 14 + 65 + 9 = 154


def test_inference_on_a_record_with_tools_sees_them_as_training_did(tool_model):
    """`predict` and `generate` read a chat record's `tools` too: the prompt is evaluation's (and training's) prompt
    for the same turns, the tools where the chat template puts them."""
    tok = AutoTokenizer.from_pretrained(tool_model)
    fmt = PromptFormat(tok, chat=True)
    task = TaskConfig(name="t", type="summarization", data={"path": "x.jsonl"})
    template = build_task_template(task, "messages", 64)
    record = {"tools": [WEATHER], "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    trained = pair_of({**record, "messages": record["messages"] + [{"role": "assistant", "content": "Sunny."}]})
    asked = Record(copy.deepcopy(record), "new.jsonl:1")
    pair = template.inference_pair(asked)
    prompt = fmt.prompt_text(pair.messages, tools=pair.tools)
    assert prompt == fmt.prompt_text(trained.messages, tools=trained.tools)
    assert "<tools>\n" + json.dumps(WEATHER) + "\n</tools>" in prompt
    bad = Record({"tools": [{"type": "function"}], "messages": record["messages"]}, "new.jsonl:2")
    with pytest.raises(InstructuneError, match=r"tools\[0\] has no `function`"):
        template.inference_pair(bad)
