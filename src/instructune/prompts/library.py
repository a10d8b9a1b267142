"""The prompt template library: several phrasings for each task type (FLAN-style paraphrases)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """`prompt` and `completion` are Jinja over a record's fields; `separator` joins them for non-chat models."""

    prompt: str
    completion: str
    separator: str = "\n"


# Named "<task type>/<phrasing>"; each task type (instructune/tasktypes.py) names its default among its own, and
# its templates read the record fields it lists (inputs, then the answer) and its default `variables`.
LIBRARY: dict[str, Template] = {
    # classification: `choices` is filled from the task's choices (default: the training labels)
    "classification/choices": Template(
        "Classify the following text into one of these categories: {{ choices | join(', ') }}.\n\nText: {{ text }}",
        "{{ label }}", "\nCategory: "),
    "classification/predict": Template(
        "Given the following text: {{ text }}\npredict the associated label from the following choices: {{ choices | join(', ') }}",
        "{{ label }}", "\nLabel: "),
    "classification/question": Template(
        "{{ text }}\n\nWhich of these best describes the text above? Options: {{ choices | join(', ') }}",
        "{{ label }}", "\nAnswer: "),
    "classification/no-options": Template(
        "What is the category of this text?\n\n{{ text }}", "{{ label }}", "\nCategory: "),
    # summarization
    "summarization/summarize": Template(
        "Summarize the following text.\n\n{{ text }}", "{{ summary }}", "\n\nSummary: "),
    "summarization/briefly": Template(
        "{{ text }}\n\nBriefly summarize that text.", "{{ summary }}", "\n"),
    "summarization/short-sentence": Template(
        "Give a short sentence describing the following text: {{ text }}", "{{ summary }}", "\n"),
    "summarization/what-happened": Template(
        "{{ text }}\n\nWhat was going on in that text? Answer in one sentence.", "{{ summary }}", "\n"),
    # translation
    "translation/translate": Template(
        "Translate this sentence to {{ target_lang }}: {{ text }}", "{{ translation }}", "\n"),
    "translation/from-to": Template(
        "Translate from {{ source_lang }} to {{ target_lang }}.\n\n{{ source_lang }}: {{ text }}",
        "{{ translation }}", "\n{{ target_lang }}: "),
    "translation/how-say": Template(
        "How do you say \"{{ text }}\" in {{ target_lang }}?", "{{ translation }}", "\n"),
    # question answering (extractive)
    "qa/read-answer": Template(
        "Read the following passage and answer the question.\n\nPassage: {{ context }}\n\nQuestion: {{ question }}",
        "{{ answer }}", "\nAnswer: "),
    "qa/context-question": Template(
        "{{ context }}\n\nQ: {{ question }}", "{{ answer }}", "\nA: "),
    "qa/short-span": Template(
        "Answer the question with a short phrase copied from the text.\n\nText: {{ context }}\nQuestion: {{ question }}",
        "{{ answer }}", "\nAnswer: "),
    # named-entity recognition: completion "Barack Obama: person, Hawaii: location" (or "none")
    "ner/identify": Template(
        "Identify and classify the entities ({{ entity_types | join(', ') }}) in this sentence: {{ text }}",
        "{{ entities | format_entities }}", "\nEntities: "),
    "ner/list": Template(
        "{{ text }}\n\nList the named entities in the sentence above as 'name: type', types being {{ entity_types | join(', ') }}.",
        "{{ entities | format_entities }}", "\n"),
    "ner/extract": Template(
        "Extract every {{ entity_types | join(', ') }} mentioned in the text.\n\nText: {{ text }}",
        "{{ entities | format_entities }}", "\nEntities: "),
}
