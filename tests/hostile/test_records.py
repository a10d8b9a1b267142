"""Hostile records: values of the wrong type, broken chat turns, null or missing labels, labels outside the choices,
malformed NER entities. Each is an error naming the record's file:line (and the message or entity index), never a
coerced value such as a class named "None"."""

from __future__ import annotations

import pytest

from hostile_helpers import accepted, refused, rows_of, tiny_config, with_row, write_jsonl


def _shaped(cfg, rows_for_split, task_type="summarization"):
    """Point the task at records of another shape (chat, Alpaca, prompt/completion), one file per split."""
    task = cfg["tasks"][0]
    task["type"] = task_type
    for split, path in task["data"].items():
        write_jsonl(path, rows_for_split(split))
    return task["data"]["train"]


def _chat(i):
    return {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
                         {"role": "assistant", "content": f"{i}."}]}


def _alpaca(i):
    return {"instruction": f"Repeat {i}.", "input": "", "output": f"{i}"}


def _pc(i):
    return {"prompt": f"Repeat {i}.", "completion": f"{i}"}


def _files(make, n=(12, 4, 6)):
    sizes = dict(zip(("train", "validation", "test"), n))
    return lambda split: [make(i) for i in range(sizes[split])]


CHAT_CASES = {
    "content null": (lambda r: r["messages"][1].update(content=None), "messages[1].content is null"),
    "message a string": (lambda r: r["messages"].__setitem__(0, "hello"), "messages[0] is a string"),
    "unknown role": (lambda r: r["messages"][0].update(role="bot"), "messages[0].role is 'bot'"),
    "no role": (lambda r: r["messages"][1].pop("role"), "messages[1].role is None"),
    "last turn the user's": (lambda r: r["messages"].pop(), "must end with the assistant's answer"),
    "no user turn": (lambda r: r["messages"].pop(1), "messages has no user turn"),
    "empty content": (lambda r: r["messages"][2].update(content="  "), "messages[2].content is empty"),
    "content a list": (lambda r: r["messages"][1].update(content=["a"]), "messages[1].content is a list"),
    "messages a string": (lambda r: r.update(messages="hi"), "messages is a string"),
    "messages empty": (lambda r: r.update(messages=[]), "messages is an empty list"),
}


@pytest.mark.parametrize("case", list(CHAT_CASES))
def test_bad_chat_records_name_the_record_and_the_message(tmp_path, tiny_model, case):
    change, fragment = CHAT_CASES[case]
    cfg = tiny_config(tmp_path, tiny_model)
    _shaped(cfg, _files(_chat))
    path = with_row(cfg, "train", 4, change)
    refused(tmp_path, cfg, f"{path}:5", fragment)


ALPACA_CASES = {
    "instruction a number": (lambda r: r.update(instruction=7), "field 'instruction' is the number 7; expected a string"),
    "instruction empty": (lambda r: r.update(instruction=" "), "field 'instruction' is empty"),
    "output null": (lambda r: r.update(output=None), "field 'output' is null"),
    "input a list": (lambda r: r.update(input=["x"]), "field 'input' is a list"),
}


@pytest.mark.parametrize("case", list(ALPACA_CASES))
def test_bad_alpaca_records_name_the_field(tmp_path, tiny_model, case):
    change, fragment = ALPACA_CASES[case]
    cfg = tiny_config(tmp_path, tiny_model)
    _shaped(cfg, _files(_alpaca))
    path = with_row(cfg, "test", 2, change)
    refused(tmp_path, cfg, f"{path}:3", fragment)


PC_CASES = {
    "completion an empty list": (lambda r: r.update(completion=[]), "completion is an empty list"),
    "completion null": (lambda r: r.update(completion=None), "field 'completion' is null"),
    "completion a number in a summary": (lambda r: r.update(completion=5), "field 'completion' is the number 5"),
    "prompt null": (lambda r: r.update(prompt=None), "field 'prompt' is null"),
    "prompt empty": (lambda r: r.update(prompt=""), "field 'prompt' is empty"),
    "prompt turns ending with the assistant": (
        lambda r: r.update(prompt=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        "prompt must end with a user turn"),
    "completion turn of the user": (lambda r: r.update(completion=[{"role": "user", "content": "x"}]),
                                    "completion[0].role is 'user'; expected one of assistant"),
}


@pytest.mark.parametrize("case", list(PC_CASES))
def test_bad_prompt_completion_records_name_the_field(tmp_path, tiny_model, case):
    change, fragment = PC_CASES[case]
    cfg = tiny_config(tmp_path, tiny_model)
    _shaped(cfg, _files(_pc))
    path = with_row(cfg, "validation", 1, change)
    refused(tmp_path, cfg, f"{path}:2", fragment)


LABEL_CASES = {
    "label null": (lambda r: r.update(label=None), "field 'label' is null"),
    "label missing": (lambda r: r.pop("label"), "no label: the record has no field 'label'"),
    "label empty": (lambda r: r.update(label="   "), "empty completion: field 'label' is empty"),
    "label a boolean": (lambda r: r.update(label=True), "field 'label' is true (a boolean)"),
    "label a float": (lambda r: r.update(label=2.5), "field 'label' is the number 2.5"),
    "text a number": (lambda r: r.update(text=12), "field 'text' is the number 12; expected a string"),
    "text a list": (lambda r: r.update(text=["a", "b"]), "field 'text' is a list"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_bad_classification_values_name_the_record(tmp_path, tiny_model, case):
    change, fragment = LABEL_CASES[case]
    cfg = tiny_config(tmp_path, tiny_model)
    path = with_row(cfg, "train", 6, change)
    out = refused(tmp_path, cfg, f"{path}:7", fragment)
    assert "'None'" not in out


def test_an_empty_csv_label_cell_names_the_line(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    rows = rows_of(cfg["tasks"][0]["data"]["train"])
    rows[3]["label"] = ""
    path = tmp_path / "data" / "train.csv"
    path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    cfg["tasks"][0]["data"]["train"] = str(path)
    refused(tmp_path, cfg, f"{path}:5", "field 'label' is empty")


def test_a_label_outside_the_configured_choices_lists_them(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["choices"] = ["billing", "delivery", "technical", "account"]
    path = with_row(cfg, "test", 0, lambda r: r.update(label="refund"))
    refused(tmp_path, cfg, f"{path}:1", "label 'refund' is not among the task's choices",
            "['billing', 'delivery', 'technical', 'account']")


def test_choices_matching_none_of_the_labels_are_refused(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["choices"] = ["positive", "negative"]
    refused(tmp_path, cfg, "train.jsonl:1", "label 'billing' is not among the task's choices")


def test_labels_with_surrounding_spaces_are_stripped_not_new_classes(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["choices"] = [" billing", "delivery ", "technical", "account"]
    with_row(cfg, "train", 0, lambda r: r.update(label="  billing "))
    out = accepted(tmp_path, cfg)
    assert "  billing" not in out and "billing 3" in out


def test_integer_labels_are_taken_as_their_digits(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["choices"] = [1, 2, 3, 4]
    for split, path in cfg["tasks"][0]["data"].items():
        write_jsonl(path, [{**r, "label": i % 4 + 1} for i, r in enumerate(rows_of(path))])
    out = accepted(tmp_path, cfg)
    assert "train labels: 1 3, 2 3, 3 3, 4 3" in out


def test_an_integer_qa_answer_is_accepted(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("qa",))
    for path in cfg["tasks"][0]["data"].values():
        write_jsonl(path, [{**r, "answer": int(r["answer"])} for r in rows_of(path)])
    accepted(tmp_path, cfg)


NER_CASES = {
    "entities as strings": (lambda r: r.update(entities=["Maria", "Lisbon"]), "entities[0] is a string"),
    "entity without type": (lambda r: r["entities"][1].pop("type"), "entities[1] has no `type`"),
    "entity type a number": (lambda r: r["entities"][2].update(type=3), "entities[2].type is the number 3"),
    "entities an object": (lambda r: r.update(entities={"text": "Maria"}), "field 'entities' is an object"),
    "entities null": (lambda r: r.update(entities=None), "field 'entities' is null"),
}


@pytest.mark.parametrize("case", list(NER_CASES))
def test_bad_ner_entities_name_the_record_and_entity(tmp_path, tiny_model, case):
    change, fragment = NER_CASES[case]
    cfg = tiny_config(tmp_path, tiny_model, ("ner",))
    path = with_row(cfg, "train", 9, change)
    refused(tmp_path, cfg, f"{path}:10", fragment)


def test_a_null_field_of_a_user_template_is_named(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model)
    cfg["tasks"][0]["template"] = {"prompt": "Text: {{ text }} (from {{ source }})", "completion": "{{ label }}"}
    for path in cfg["tasks"][0]["data"].values():
        write_jsonl(path, [{**r, "source": "mail"} for r in rows_of(path)])
    path = with_row(cfg, "train", 2, lambda r: r.update(source=None))
    refused(tmp_path, cfg, f"{path}:3", "field 'source' is null (the template renders it)")


def test_a_summary_null_is_refused_through_run_with_no_run_folder(tmp_path, tiny_model):
    cfg = tiny_config(tmp_path, tiny_model, ("summarization",))
    path = with_row(cfg, "test", 3, lambda r: r.update(summary=None))
    refused(tmp_path, cfg, f"{path}:4", "field 'summary' is null", command=("run",))
