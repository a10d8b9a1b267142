"""Classical baselines per task type (TF-IDF + logistic regression, lead, copy, overlap, dictionary)."""

from __future__ import annotations

import re
from collections import Counter

from .. import tasktypes
from ..prompts.template import format_entities
from .metrics import normalize_answer, summarization_metrics

C_GRID = (0.1, 1.0, 10.0, 100.0)
LEAD_WORDS = (5, 8, 10, 15, 20, 30, 50)
FIRST_SENTENCE = "first sentence"
# A sentence ends at . ! ? (perhaps then a closing quote or bracket) followed by whitespace, or at a newline.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'”’)\]])\s+|\n+")


def classical_baseline(task_type: str, train: list[dict], validation: list[dict], test: list[dict],
                       seed: int = 0, choices: list[str] | None = None) -> tuple[list[str], dict]:
    """Predictions for `test` (strings in the same form as the task's completions, so compute_metrics scores them)
    and a description {"method": "...", "params": {...}} for the report.

    Each example holds the task type's input fields and its answer field, the reference. The method is the one
    the task type names (`TaskType.classical`, a key of METHODS). Only `train` and `validation` fit or tune
    anything; `test` is read for its inputs alone. `choices` is accepted for symmetry with compute_metrics: the
    classifier predicts training labels, which are among the choices whenever the data passed the label check."""
    ttype = tasktypes.get(task_type)  # an unknown type: a ValueError listing the known ones
    if ttype.classical is None:
        raise ValueError(f"task type {task_type!r} has no classical baseline")
    if ttype.classical not in METHODS:
        raise ValueError(f"task type {task_type!r} names the classical baseline {ttype.classical!r}, which is not "
                         f"in METHODS ({', '.join(METHODS)})")
    if not train:
        raise ValueError("the classical baseline needs training examples")
    return METHODS[ttype.classical](ttype, train, validation, test, seed)


def _inputs(ttype: tasktypes.TaskType, examples: list[dict]) -> list[str]:
    """Each example's main input (the task type's first input field) as text."""
    return [str(e[ttype.inputs[0]]) for e in examples]


def _answers(ttype: tasktypes.TaskType, examples: list[dict]) -> list:
    return [e[ttype.answer] for e in examples]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by end punctuation or newlines (a simple splitter: "Dr. Smith" splits too); never empty
    for non-blank text."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()] or [text.strip()]


# --- classification -------------------------------------------------------------------------------------------

def _tfidf_logreg(c: float, seed: int):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import FeatureUnion, make_pipeline

    features = FeatureUnion([
        ("words", TfidfVectorizer(analyzer="word", ngram_range=(1, 2), sublinear_tf=True)),
        # char_wb also catches word pieces and typos; a bare-digit or one-letter text still gets features
        ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)),
    ])
    return make_pipeline(features, LogisticRegression(C=c, solver="lbfgs", max_iter=2000, random_state=seed))


def classify(ttype, train, validation, test, seed) -> tuple[list[str], dict]:
    """TF-IDF word 1-2-grams + char_wb 2-5-grams, logistic regression fitted on train; C from C_GRID by validation
    accuracy (ties: the smaller C, the stronger regularisation), C=1 without a validation split."""
    x, y = _inputs(ttype, train), [str(a) for a in _answers(ttype, train)]
    params = {"features": "tfidf word 1-2 + char_wb 2-5", "classifier": "logistic regression (lbfgs)"}
    if len(set(y)) == 1:  # one class: logistic regression cannot be fitted, and there is nothing to choose
        return [y[0]] * len(test), {"method": "majority label", "params": {**params, "label": y[0]}}
    grid = C_GRID if validation else (1.0,)
    vx, vy = _inputs(ttype, validation), [str(a) for a in _answers(ttype, validation)]
    best, tried = None, {}
    for c in grid:
        model = _tfidf_logreg(c, seed).fit(x, y)
        if validation:
            acc = sum(p == t for p, t in zip(model.predict(vx), vy)) / len(vy)
            tried[str(c)] = acc
        if best is None or (validation and acc > best[0]):
            best = (acc if validation else None, c, model)
    _, c, model = best
    preds = [str(p) for p in model.predict(_inputs(ttype, test))] if test else []
    return preds, {"method": "tfidf-logreg", "params": {**params, "C": c, "seed": seed,
                                                         "chosen_on": "validation" if validation else "default",
                                                         "validation_accuracy": tried}}


# --- summarization --------------------------------------------------------------------------------------------

def _lead(text: str, candidate) -> str:
    return split_sentences(text)[0] if candidate == FIRST_SENTENCE else " ".join(text.split()[:candidate])


def lead(ttype, train, validation, test, seed) -> tuple[list[str], dict]:
    """The lead of the text: its first sentence or its first N words (N in LEAD_WORDS), whichever has the best mean
    ROUGE-L on validation (ties: the earlier candidate, the first sentence first; no validation: first sentence)."""
    candidates = [FIRST_SENTENCE, *LEAD_WORDS]
    tried = {}
    if validation:
        texts, refs = _inputs(ttype, validation), [str(a) for a in _answers(ttype, validation)]
        for cand in candidates:
            tried[str(cand)] = summarization_metrics([_lead(t, cand) for t in texts], refs)["rougeL"]
    chosen = max(candidates, key=lambda c: tried[str(c)]) if validation else FIRST_SENTENCE
    preds = [_lead(t, chosen) for t in _inputs(ttype, test)]
    return preds, {"method": "lead", "params": {"lead": chosen if chosen == FIRST_SENTENCE else f"{chosen} words",
                                                "chosen_on": "validation" if validation else "default",
                                                "validation_rougeL": tried}}


# --- translation ----------------------------------------------------------------------------------------------

def copy_source(ttype, train, validation, test, seed) -> tuple[list[str], dict]:
    """The source text unchanged: what chrF gives for names, numbers and cognates with no translation at all."""
    return _inputs(ttype, test), {"method": "copy source", "params": {}}


# --- question answering ---------------------------------------------------------------------------------------

def best_sentence(context: str, question: str) -> str:
    """The sentence of `context` sharing the most distinct words with `question` after SQuAD normalisation
    (lowercase, no punctuation or articles); ties go to the earliest sentence."""
    q = set(normalize_answer(question).split())
    sentences = split_sentences(context)
    overlaps = [len(q & set(normalize_answer(s).split())) for s in sentences]
    return sentences[overlaps.index(max(overlaps))]


def overlap_sentence(ttype, train, validation, test, seed) -> tuple[list[str], dict]:
    """For each test question (the second input field), the sentence of the context (the first) with the highest
    word overlap (nothing is fitted)."""
    context, question = ttype.inputs[:2]
    preds = [best_sentence(str(e[context]), str(e[question])) for e in test]
    return preds, {"method": "best-overlap sentence",
                   "params": {"overlap": "distinct words shared with the question, SQuAD-normalised",
                              "ties": "earliest sentence"}}


# --- named entities -------------------------------------------------------------------------------------------

def entity_pairs(value) -> list[tuple[str, str]]:
    """(text, type) pairs from a list of {text, type} or a completion "Barack Obama: person, Hawaii: location".

    Split as metrics.parse_entities does (on ", ", ";" or newlines, each item on its last ":"), but the text keeps
    its case: the dictionary matches case-sensitively, and parse_entities casefolds. "none" gives []."""
    if isinstance(value, list):
        items = [(str(e.get("text", "")), str(e.get("type", ""))) for e in value if isinstance(e, dict)]
    else:
        items = [tuple(i.rsplit(":", 1)) for i in re.split(r",\s|;|\n", str(value or "")) if ":" in i]
    out = [(" ".join(t.split()), k.strip()) for t, k in items]
    return [(t, k) for t, k in out if t and k]


def build_dictionary(examples: list[dict], answer: str = "entities") -> dict[str, str]:
    """Entity text -> its most frequent type among the training entities, the examples' `answer` field (ties: the
    type seen first)."""
    counts: dict[str, Counter] = {}
    for value in (e[answer] for e in examples):
        for text, etype in entity_pairs(value):
            counts.setdefault(text, Counter())[etype] += 1
    return {text: c.most_common(1)[0][0] for text, c in counts.items()}


def match_entities(text: str, dictionary: dict[str, str]) -> list[dict[str, str]]:
    """Dictionary entries found in `text`: case-sensitive, whole words, longest entry first, no overlapping
    matches; each (text, type) once, in order of first appearance."""
    taken: list[tuple[int, int]] = []
    found: list[tuple[int, str]] = []
    for entry in sorted(dictionary, key=lambda e: (-len(e), e)):
        # spaces in an entry match any run of whitespace, as the entry text was whitespace-normalised
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, entry.split())) + r"(?!\w)"
        for m in re.finditer(pattern, text):
            if all(m.end() <= s or m.start() >= e for s, e in taken):
                taken.append(m.span())
                found.append((m.start(), entry))
    out, seen = [], set()
    for _, entry in sorted(found):
        if entry not in seen:
            seen.add(entry)
            out.append({"text": entry, "type": dictionary[entry]})
    return out


def entity_dictionary(ttype, train, validation, test, seed) -> tuple[list[str], dict]:
    """Every training entity looked up in the test text (see match_entities), written as format_entities does."""
    dictionary = build_dictionary(train, ttype.answer)
    preds = [format_entities(match_entities(t, dictionary)) for t in _inputs(ttype, test)]
    return preds, {"method": "training-entity dictionary",
                   "params": {"entries": len(dictionary), "match": "case-sensitive, whole words, longest first"}}


# The classical baselines a task type may name in `TaskType.classical`; each takes (task type, train, validation,
# test, seed) and returns the test predictions and a description for the report.
METHODS = {
    "tfidf_logreg": classify,
    "lead": lead,
    "copy_source": copy_source,
    "overlap_sentence": overlap_sentence,
    "entity_dictionary": entity_dictionary,
}


def classical_variant(template, records: dict, seed: int) -> dict | None:
    """The classical baseline as a result variant (metrics, predictions) of a templated task, fitted on the training
    split and tuned on the validation split; None for records that bring their own prompts (no canonical fields) and
    for a task type without a classical baseline."""
    from .score import score

    ttype = tasktypes.get(template.type)
    if template.template is None or ttype.classical is None:
        return None
    fields = (*ttype.inputs, ttype.answer)
    examples, tests = {}, []
    for split in ("train", "validation", "test"):
        examples[split] = []
        for r in records.get(split, []):
            pair = template.pair(r)  # the answer as the other variants' references render it
            ctx = template.context(r, need_answer=True)
            examples[split].append({**{f: ctx[f] for f in fields[:-1]}, fields[-1]: pair.completion})
            if split == "test":
                tests.append(pair)
    predictions, method = classical_baseline(template.type, examples["train"], examples["validation"],
                                             examples["test"], seed=seed, choices=template.choices)
    inputs = [" | ".join(str(e[f]) for f in fields[:-1]) for e in examples["test"]]
    return {**score(template, tests, predictions, inputs, "classical"), "method": method}
