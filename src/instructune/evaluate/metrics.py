"""Task metrics: score model outputs against references per task type, all on a 0..1 scale."""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from typing import Callable

from .. import tasktypes

# The built-in task types and their primary metrics (a registered type is not here: ask tasktypes.get).
TASK_TYPES = tasktypes.BUILTIN
PRIMARY_METRIC = {name: tasktypes.get(name).primary_metric for name in TASK_TYPES}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_EDGE = string.punctuation + string.whitespace + "“”‘’«»"
_PUNCT = set(string.punctuation)


def _check(predictions, references) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# --- classification -------------------------------------------------------------------------------------------

def parse_choice(text: str, choices: list[str]) -> str | None:
    """Map free text to one of `choices` (returned as given), or None when no choice occurs in it.

    An exact match after normalising (strip, lowercase, strip surrounding punctuation/quotes) wins; otherwise the
    choice whose whole-word occurrence starts earliest ("Sentiment: Positive" -> "positive"); at the same start the
    longer choice wins, so "very positive" beats "positive"."""
    norm = (text or "").strip().lower().strip(_EDGE)
    lowered = {c.strip().lower(): c for c in choices}
    if norm in lowered:
        return lowered[norm]
    best = None  # (start, -length, choice)
    for low, choice in lowered.items():
        m = re.search(r"(?<!\w)" + re.escape(low) + r"(?!\w)", norm) if low else None
        if m and (best is None or (m.start(), -len(low)) < best[:2]):
            best = (m.start(), -len(low), choice)
    return best[2] if best else None


def choice_settled(text: str, choices: list[str]) -> bool:
    """Whether `parse_choice(text + more)` is the same for every continuation `more`, so generation may stop here.

    True when a choice occurs as a whole word that a non-word character already follows, and no choice starts
    at or before it that more text could still complete ("Positive: the" is settled, "Positive" is not: it may
    go on to "Positively"). The exact-match rule of `parse_choice` never disagrees with the earliest-match rule,
    so only the latter is checked. Choices that begin or end with a non-word character are never settled."""
    lows = [c.strip().lower() for c in choices]
    if not lows or any(not low or not re.match(r"\w", low[0]) or not re.match(r"\w", low[-1]) for low in lows):
        return False
    norm = (text or "").strip().lower().lstrip(_EDGE)  # as parse_choice normalises, minus the end more text moves
    settled = None  # (start, -length) of the earliest choice whose match no continuation can undo
    for low in lows:
        m = re.search(r"(?<!\w)" + re.escape(low) + r"(?=[^\w])", norm)
        if m and (settled is None or (m.start(), -len(low)) < settled):
            settled = (m.start(), -len(low))
    if settled is None:
        return False
    for low in lows:  # a choice that starts at or before it and is still open: text at the end could decide it
        for t in range(settled[0] + 1):
            if (t and re.match(r"\w", norm[t - 1])) or (t, -len(low)) >= settled:
                continue
            rest = norm[t:]
            if low.startswith(rest) or (rest.startswith(low) and rest[len(low):len(low) + 1] in ("", "_")):
                return False
    return True


def _parse_labels(predictions, references, choices):
    preds = [parse_choice(p, choices) for p in predictions]
    refs = [parse_choice(r, choices) for r in references]
    bad = [r for r, parsed in zip(references, refs) if parsed is None]
    if bad:  # a gold label outside the label set is a data bug, not a model error
        raise ValueError(f"{len(bad)} reference(s) match none of {list(choices)}, e.g. {bad[0]!r}")
    return preds, refs


def classification_metrics(predictions, references, choices) -> dict:
    """Accuracy, macro-F1 over `choices` and the share of predictions that name no choice.

    An unparseable prediction counts wrong (a false negative for the gold class, a false positive for none).
    Macro-F1 averages per-class F1 = 2TP / (2TP + FP + FN) over the classes seen in references or predictions."""
    _check(predictions, references)
    preds, refs = _parse_labels(predictions, references, choices)
    f1s = []
    for c in dict.fromkeys(choices):
        tp = sum(p == c and r == c for p, r in zip(preds, refs))
        fp = sum(p == c and r != c for p, r in zip(preds, refs))
        fn = sum(p != c and r == c for p, r in zip(preds, refs))
        if tp + fp + fn:  # absent from both sides: F1 is undefined, so the class is left out of the average
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": _mean(p == r for p, r in zip(preds, refs)),
            "macro_f1": _mean(f1s),
            "invalid_rate": _mean(p is None for p in preds)}


# --- summarization --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _rouge():
    from rouge_score.rouge_scorer import RougeScorer
    return RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def _rouge_per_example(predictions, references) -> dict[str, list[float]]:
    # RougeScorer.score(target, prediction): the reference comes first.
    scores = [_rouge().score(r, p) for p, r in zip(predictions, references)]
    return {k: [s[k].fmeasure for s in scores] for k in ROUGE_TYPES}


def summarization_metrics(predictions, references) -> dict:
    """Mean ROUGE F-measure (rouge-score, Porter stemmer). rougeLsum splits sentences on newlines only, and the
    default tokenizer keeps only [a-z0-9], so non-Latin text scores 0."""
    _check(predictions, references)
    return {k: _mean(v) for k, v in _rouge_per_example(predictions, references).items()}


# --- translation ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _sacre(kind: str):
    from sacrebleu.metrics import BLEU, CHRF
    return {"bleu": BLEU(), "chrf": CHRF(), "sentence_bleu": BLEU(effective_order=True)}[kind]


def translation_metrics(predictions, references) -> dict:
    """Corpus-level sacreBLEU BLEU (13a tokenizer) and chrF with default settings, divided by 100."""
    _check(predictions, references)
    return {k: _sacre(k).corpus_score(list(predictions), [list(references)]).score / 100 for k in ("bleu", "chrf")}


# --- extractive / generative QA -------------------------------------------------------------------------------

def normalize_answer(s: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _em(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:  # as in the v1.1 script: also 0 when both normalise to empty
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _qa_per_example(predictions, references) -> dict[str, list[float]]:
    golds = [[r] if isinstance(r, str) else list(r) for r in references]
    return {"exact_match": [max(_em(p, g) for g in gs) for p, gs in zip(predictions, golds)],
            "f1": [max(_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]}


def qa_metrics(predictions, references) -> dict:
    """SQuAD v1.1 exact match and token F1; a reference may be a list of acceptable answers (best one counts)."""
    _check(predictions, references)
    if any(not isinstance(r, str) and not r for r in references):
        raise ValueError("a QA reference is an empty list of answers")
    return {k: _mean(v) for k, v in _qa_per_example(predictions, references).items()}


# --- named entities -------------------------------------------------------------------------------------------

def parse_entities(text: str) -> set[tuple[str, str]]:
    """Parse "Barack Obama: Person, Hawaii: Location" into {("barack obama", "person"), ("hawaii", "location")}.

    Items split on ", ", ";" or newlines; each splits on its last ":" (so entity text may contain colons).
    Entity text is whitespace-normalised and casefolded (matching is case-insensitive); the type is lowercased
    with surrounding punctuation removed ("Location." -> "location"). Items without ":" ("none") are ignored."""
    out = set()
    for item in re.split(r",\s|;|\n", text or ""):
        if ":" not in item:
            continue
        entity, etype = item.rsplit(":", 1)
        entity, etype = " ".join(entity.split()).casefold(), etype.strip().strip(_EDGE).lower()
        if entity and etype:
            out.add((entity, etype))
    return out


def _prf(tp: int, n_pred: int, n_gold: int) -> dict:
    # Both sides empty ("none" predicted for a sentence without entities) is a perfect answer; otherwise an
    # undefined ratio (0/0) counts 0, so predicting nothing when entities exist scores 0.
    if n_pred == 0 and n_gold == 0:
        return {"entity_precision": 1.0, "entity_recall": 1.0, "entity_f1": 1.0}
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return {"entity_precision": p, "entity_recall": r, "entity_f1": 2 * p * r / (p + r) if p + r else 0.0}


def _ner_counts(predictions, references):
    for p, r in zip(predictions, references):
        ps, rs = parse_entities(p), parse_entities(r)
        yield len(ps & rs), len(ps), len(rs)


def ner_metrics(predictions, references) -> dict:
    """Micro-averaged entity precision/recall/F1 over exact (text, type) matches pooled across all examples."""
    _check(predictions, references)
    tp, n_pred, n_gold = (sum(col) for col in zip(*_ner_counts(predictions, references)))
    return _prf(tp, n_pred, n_gold)


# --- metric sets: one per kind of answer, named by task types (tasktypes.TaskType.metrics) -----------------

@dataclass(frozen=True)
class MetricSet:
    """How one kind of answer is scored, every metric on a 0..1 scale. Each function takes (predictions, references),
    and the task's choices third when `needs_choices`; predictions and references are never empty and pair up."""

    per_example: Callable[..., dict[str, list[float]]]  # {metric: per-example scores aligned with the inputs}
    notes: Callable[[], dict[str, str]]  # how each corpus metric was computed (library signatures), same keys
    corpus: Callable[..., dict[str, float]] | None = None  # the corpus metrics; None: means of per_example
    statistics: Callable[..., dict] | None = None  # see metric_statistics; None: means of per_example
    needs_choices: bool = False


def _mean_statistics(scores):
    import numpy as np

    return np.column_stack([np.asarray(scores, dtype=float), np.ones(len(scores))]), lambda s: s[:, 0] / s[:, 1]


def _labels_notes() -> dict[str, str]:
    note = "parse_choice to one of the choices; unparseable predictions count wrong"
    return {"accuracy": note, "macro_f1": note + "; macro F1 over classes present in refs or preds",
            "invalid_rate": "share of predictions matching no choice"}


def _labels_per_example(predictions, references, choices) -> dict[str, list[float]]:
    preds, refs = _parse_labels(predictions, references, choices)
    return {"accuracy": [float(p == r) for p, r in zip(preds, refs)]}


def _labels_statistics(predictions, references, choices):
    import numpy as np

    preds, refs = _parse_labels(predictions, references, choices)
    labels = list(dict.fromkeys(choices))
    # per class: tp, fp, fn; macro F1 over classes with tp + fp + fn > 0
    cols = [[float(p == c and r == c), float(p == c and r != c), float(p != c and r == c)]
            for p, r in zip(preds, refs) for c in labels]
    stats = np.asarray(cols).reshape(len(preds), 3 * len(labels))

    def macro_f1(s):
        tp, fp, fn = s[:, 0::3], s[:, 1::3], s[:, 2::3]
        seen = (tp + fp + fn) > 0
        f1 = np.where(seen, 2 * tp / np.maximum(2 * tp + fp + fn, 1e-12), 0.0)
        return f1.sum(1) / np.maximum(seen.sum(1), 1)
    return {"accuracy": _mean_statistics([p == r for p, r in zip(preds, refs)]), "macro_f1": (stats, macro_f1)}


def _rouge_notes() -> dict[str, str]:
    rs = f"rouge-score {version('rouge-score')}, use_stemmer=True, F-measure, mean over examples"
    return {k: rs for k in ROUGE_TYPES}


def _sacrebleu_notes() -> dict[str, str]:
    return {k: str(_sacre(k).get_signature()) for k in ("bleu", "chrf")}


def _sacrebleu_per_example(predictions, references) -> dict[str, list[float]]:
    return {k: [_sacre(s).sentence_score(p, [r]).score / 100 for p, r in zip(predictions, references)]
            for k, s in (("bleu", "sentence_bleu"), ("chrf", "chrf"))}


def _sacrebleu_statistics(predictions, references):
    import numpy as np

    out = {}
    for k in ("bleu", "chrf"):
        metric = _sacre(k)
        stats = np.asarray(metric._extract_corpus_statistics(list(predictions), [list(references)]), dtype=float)
        out[k] = (stats, lambda s, m=metric: np.array([m._compute_score_from_stats(list(row)).score / 100 for row in s]))
    return out


def _squad_notes() -> dict[str, str]:
    note = "SQuAD v1.1 normalisation (lowercase, no punctuation/articles); max over acceptable answers"
    return {"exact_match": note, "f1": note + "; token-overlap F1"}


def _entity_notes() -> dict[str, str]:
    note = "micro-averaged over exact (text, type) matches, text case-insensitive; both empty = 1.0"
    return {k: note for k in ("entity_precision", "entity_recall", "entity_f1")}


def _entity_per_example(predictions, references) -> dict[str, list[float]]:
    return {"entity_f1": [_prf(*c)["entity_f1"] for c in _ner_counts(predictions, references)]}


def _entity_statistics(predictions, references):
    import numpy as np

    stats = np.asarray(list(_ner_counts(predictions, references)), dtype=float)  # tp, n_pred, n_gold

    def ner(key):
        def finish(s):
            return np.array([_prf(*(int(x) for x in row))[key] for row in s])
        return finish
    return {k: (stats, ner(k)) for k in ("entity_precision", "entity_recall", "entity_f1")}


METRIC_SETS: dict[str, MetricSet] = {
    "labels": MetricSet(_labels_per_example, _labels_notes, classification_metrics, _labels_statistics,
                        needs_choices=True),
    "rouge": MetricSet(_rouge_per_example, _rouge_notes, summarization_metrics),
    "sacrebleu": MetricSet(_sacrebleu_per_example, _sacrebleu_notes, translation_metrics, _sacrebleu_statistics),
    "squad": MetricSet(_qa_per_example, _squad_notes, qa_metrics),
    "entities": MetricSet(_entity_per_example, _entity_notes, ner_metrics, _entity_statistics),
}


# --- dispatch: the task type's metric set ---------------------------------------------------------------------

def _scoring(task_type: str, predictions, references, choices) -> tuple[MetricSet, tuple]:
    """The task type's metric set and the arguments its functions take, the inputs checked."""
    kind = tasktypes.get(task_type)  # an unknown type: a ValueError listing the known ones
    if kind.metrics not in METRIC_SETS:
        raise ValueError(f"task type {task_type!r} is scored by the metric set {kind.metrics!r}, which is not in "
                         f"METRIC_SETS ({', '.join(METRIC_SETS)})")
    metric_set = METRIC_SETS[kind.metrics]
    if metric_set.needs_choices and not choices:
        raise ValueError(f"{task_type} needs the list of choices")
    _check(predictions, references)
    return metric_set, (predictions, references, choices) if metric_set.needs_choices else (predictions, references)


def per_example_scores(task_type, predictions, references, choices=None) -> dict[str, list[float]]:
    """Per-example scores for a paired bootstrap: one list per metric, aligned with the inputs.

    Translation gives sentence-level chrF and sentence BLEU (effective order), each /100. Corpus BLEU and chrF are
    NOT the means of these (they pool n-gram statistics before dividing), so resample corpus scores with
    `metric_statistics` (sufficient statistics) when the corpus figure is the one being tested."""
    metric_set, args = _scoring(task_type, predictions, references, choices)
    return metric_set.per_example(*args)


def compute_metrics(task_type, predictions, references, choices=None) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus metrics for a task type, plus a note per metric saying how it was computed (library signatures)."""
    metric_set, args = _scoring(task_type, predictions, references, choices)
    if metric_set.corpus is not None:
        metrics = metric_set.corpus(*args)
    else:
        metrics = {k: _mean(v) for k, v in metric_set.per_example(*args).items()}
    return metrics, metric_set.notes()


# --- sufficient statistics (for the paired bootstrap) ---------------------------------------------------------

def metric_statistics(task_type, predictions, references, choices=None):
    """Per-example sufficient statistics for every metric: {metric: (stats [n, d], finish)}.

    `finish(summed [r, d]) -> [r]` turns stats summed over any resample of the examples into the corpus metric,
    so a bootstrap resamples rows and never re-runs a scorer. finish(stats.sum(0)) equals compute_metrics exactly,
    corpus BLEU/chrF (sacreBLEU's own n-gram statistics) and micro entity F1 included."""
    metric_set, args = _scoring(task_type, predictions, references, choices)
    if metric_set.statistics is not None:
        return metric_set.statistics(*args)
    return {k: _mean_statistics(v) for k, v in metric_set.per_example(*args).items()}
