"""data/lint.py: valid records that make a run measure less than it seems are counted, with up to three examples."""

from __future__ import annotations

from instructune.data.lint import format_warnings, lint_pairs, lint_records
from instructune.data.load import Record
from instructune.prompts.template import Pair


def _pair(record: dict, prompt: str, completion: str, where: str) -> Pair:
    return Pair([{"role": "user", "content": prompt}], completion, where, record)


def test_ner_entities_not_in_their_text_are_counted_with_examples():
    pairs = [_pair({"text": f"Maria {i} visited Lisbon.", "entities": [{"text": f"Maria {i}", "type": "person"},
                                                                      {"text": "Porto", "type": "location"}]},
                   "p", "c", f"t.jsonl:{i + 1}") for i in range(5)]
    [w] = lint_pairs("ner", {}, pairs)
    assert (w["kind"], w["count"]) == ("ner_entity_not_in_text", 5)
    assert [e["where"] for e in w["examples"]] == ["t.jsonl:1", "t.jsonl:2", "t.jsonl:3"]
    assert w["examples"][0]["text"] == "Porto"


def test_qa_answers_not_in_context_respect_field_mapping_and_case():
    pairs = [_pair({"passage": "Founded in 1998 by MARIA.", "q": "?", "ans": "maria"}, "p", "maria", "a:1"),
             _pair({"passage": "Founded in 1998.", "q": "?", "ans": "2001"}, "p", "2001", "a:2")]
    [w] = lint_pairs("qa", {"context": "passage", "answer": "ans", "question": "q"}, pairs)
    assert (w["kind"], w["count"], w["examples"][0]["where"]) == ("qa_answer_not_in_context", 1, "a:2")


def test_answers_verbatim_in_the_prompt_and_empty_inputs():
    pairs = [_pair({"text": "The cat eats.", "translation": "Le chat mange."}, "Translate: The cat eats. Le chat mange.",
                   "Le chat mange.", "x:1"),
             _pair({"text": " ", "translation": "Rien."}, "Translate:  ", "Rien.", "x:2")]
    warnings = {w["kind"]: w for w in lint_pairs("translation", {}, pairs)}
    assert warnings["answer_in_prompt"]["count"] == 1 and warnings["answer_in_prompt"]["examples"][0]["where"] == "x:1"
    assert warnings["empty_input"]["count"] == 1 and "field 'text' is empty" in warnings["empty_input"]["examples"][0]["text"]
    lines = format_warnings("t", list(warnings.values()))
    assert lines[0].startswith("  t: 1 answers that appear verbatim")


def test_classification_labels_listed_as_choices_are_not_a_leak():
    pairs = [_pair({"text": "late parcel", "label": "delivery"}, "Choices: billing, delivery. Text: late parcel",
                   "delivery", "c:1")]
    assert lint_pairs("classification", {}, pairs) == []


def test_duplicate_keys_are_reported_from_the_records():
    records = [Record({"a": 1}, "f:1"), Record({"a": 2}, "f:2", {"duplicate_keys": ["label", "text"]})]
    [w] = lint_records(records)
    assert (w["count"], w["examples"]) == (1, [{"where": "f:2", "text": "label, text"}])
    assert lint_records(records[:1]) == []
