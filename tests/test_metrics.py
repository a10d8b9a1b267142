"""Task metrics: worked examples pinned to known values and agreement with rouge-score / sacreBLEU."""

from __future__ import annotations

import pytest
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF

from instructune.evaluate.metrics import (PRIMARY_METRIC, TASK_TYPES, classification_metrics, compute_metrics,
                                          ner_metrics, normalize_answer, parse_choice, parse_entities,
                                          per_example_scores, qa_metrics, summarization_metrics,
                                          translation_metrics)

approx = pytest.approx


def test_every_task_has_a_primary_metric_that_compute_metrics_returns():
    cases = {"classification": (["positive"], ["positive"], ["positive", "negative"]),
             "summarization": (["a b"], ["a b"], None), "translation": (["a b c d"], ["a b c d"], None),
             "qa": (["x"], ["x"], None), "ner": (["A: person"], ["A: person"], None)}
    assert set(PRIMARY_METRIC) == set(TASK_TYPES) == set(cases)
    for task, (p, r, c) in cases.items():
        scores, notes = compute_metrics(task, p, r, choices=c)
        assert scores[PRIMARY_METRIC[task]] == approx(1.0)
        assert set(notes) == set(scores)


# --- ROUGE ----------------------------------------------------------------------------------------------------

def test_rouge_worked_example():
    s = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score("It is cold outside",
                                                                            "It is very cold outside")
    assert (s["rouge1"].recall, s["rouge1"].precision, s["rouge1"].fmeasure) == approx((1.0, 0.8, 0.889), abs=1e-3)
    assert (s["rouge2"].recall, s["rouge2"].precision, s["rouge2"].fmeasure) == approx((0.667, 0.5, 0.571), abs=1e-3)
    # ROUGE-L is the longest common *subsequence*: "it is cold outside", length 4 -> 1.0 / 0.8 / 0.889. The course
    # slide's 0.5 / 0.4 / 0.44 counts a longest common *substring* ("it is" or "cold outside", length 2).
    assert (s["rougeL"].recall, s["rougeL"].precision, s["rougeL"].fmeasure) == approx((1.0, 0.8, 0.889), abs=1e-3)
    ours = summarization_metrics(["It is very cold outside"], ["It is cold outside"])
    assert ours == approx({"rouge1": 0.889, "rouge2": 0.571, "rougeL": 0.889, "rougeLsum": 0.889}, abs=1e-3)


def test_rouge_clips_repeated_unigrams():
    s = RougeScorer(["rouge1"], use_stemmer=True).score("It is cold outside", "cold cold cold cold")
    assert s["rouge1"].precision == approx(0.25)  # "cold" counts once, not four times (which would give 1.0)
    assert summarization_metrics(["cold cold cold cold"], ["It is cold outside"])["rouge1"] == approx(0.25)


def test_summarization_is_the_mean_of_rouge_score_f_measures():
    preds = ["the cats are sitting on the mat", "stocks fell sharply today", "nothing in common"]
    refs = ["a cat sat on the mat", "stocks dropped sharply on monday", "completely different words"]
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    direct = [scorer.score(r, p) for p, r in zip(preds, refs)]
    per = per_example_scores("summarization", preds, refs)
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert per[k] == approx([d[k].fmeasure for d in direct])
        assert summarization_metrics(preds, refs)[k] == approx(sum(per[k]) / 3)
    assert per["rouge1"][0] == approx(2 * (4 / 7) * (4 / 6) / (4 / 7 + 4 / 6))  # stemmer: cats -> cat; 4 shared


# --- BLEU / chrF ----------------------------------------------------------------------------------------------

BLEU_REF = "I am very happy to say that I am drinking a warm cup of tea."
BLEU_CANDIDATES = ["I am very happy that I am drinking a cup of tea.",
                   "I am very happy that I am drinking a warm cup of tea.",
                   "I am very happy to say that I am drinking a warm tea."]


def test_bleu_course_example_with_sacrebleu_13a_tokenizer():
    # sacreBLEU defaults (13a splits off the final "."); every n-gram order has a match, so smoothing and
    # effective order do not change these.
    scores = [BLEU(effective_order=True).sentence_score(c, [BLEU_REF]).score / 100 for c in BLEU_CANDIDATES]
    assert [round(s, 3) for s in scores] == [0.539, 0.750, 0.772]
    assert [round(s, 3) for s in per_example_scores("translation", BLEU_CANDIDATES, [BLEU_REF] * 3)["bleu"]] == \
        [0.539, 0.750, 0.772]
    for c, s in zip(BLEU_CANDIDATES, scores):
        assert translation_metrics([c], [BLEU_REF])["bleu"] == approx(s)  # one sentence: corpus == sentence


def test_bleu_course_example_with_whitespace_tokens():
    # The same sentences split on whitespace only ("tea." is one token) give the other set of course figures.
    bleu = BLEU(tokenize="none", effective_order=True)
    assert [round(bleu.sentence_score(c, [BLEU_REF]).score / 100, 3) for c in BLEU_CANDIDATES] == [0.495, 0.730, 0.798]


def test_translation_corpus_scores_match_sacrebleu_and_are_not_sentence_means():
    preds = ["the cat sat on the mat", "a quick brown fox", "hello world there"]
    refs = ["the cat is sitting on the mat", "the quick brown fox jumps", "hello world"]
    got, bleu, chrf = translation_metrics(preds, refs), BLEU(), CHRF()
    assert got["bleu"] == approx(bleu.corpus_score(preds, [refs]).score / 100)
    assert got["chrf"] == approx(chrf.corpus_score(preds, [refs]).score / 100)
    per = per_example_scores("translation", preds, refs)
    assert per["chrf"] == approx([CHRF().sentence_score(p, [r]).score / 100 for p, r in zip(preds, refs)])
    assert got["bleu"] != approx(sum(per["bleu"]) / 3)  # corpus BLEU pools n-gram counts before dividing
    scores, notes = compute_metrics("translation", preds, refs)
    assert notes["bleu"] == str(bleu.get_signature()) and "tok:13a" in notes["bleu"]
    assert notes["chrf"] == str(chrf.get_signature())
    assert 0.0 <= scores["bleu"] <= 1.0 and 0.0 <= scores["chrf"] <= 1.0


# --- QA (SQuAD v1.1) ------------------------------------------------------------------------------------------

def test_squad_normalisation():
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("  An apple, a Pear & THE plum. ") == "apple pear plum"
    assert normalize_answer("theory") == "theory"  # articles only as whole words


def test_squad_em_and_f1_hand_cases():
    # "the black cat sat" vs "a cat sat down": tokens {black, cat, sat} vs {cat, sat, down}: P = R = 2/3.
    assert qa_metrics(["the black cat sat"], ["a cat sat down"]) == approx({"exact_match": 0.0, "f1": 2 / 3})
    # Counter overlap clips repeats: "cat cat cat" vs "cat sat": 1 shared, P = 1/3, R = 1/2, F1 = 0.4.
    assert qa_metrics(["cat cat cat"], ["cat sat"])["f1"] == approx(0.4)
    assert qa_metrics(["The Eiffel Tower."], ["eiffel tower"]) == approx({"exact_match": 1.0, "f1": 1.0})
    assert qa_metrics(["Paris"], ["London"]) == approx({"exact_match": 0.0, "f1": 0.0})


def test_squad_takes_the_best_of_several_answers():
    # "in Paris" vs "Paris, France": P = R = 1/2 -> 0.5; vs "the city of Paris": P = 1/2, R = 1/3 -> 0.4; max 0.5.
    preds, refs = ["in Paris", "1998"], [["Paris, France", "the city of Paris"], ["in 1997", "1998"]]
    assert per_example_scores("qa", preds, refs) == {"exact_match": [0.0, 1.0], "f1": approx([0.5, 1.0])}
    assert qa_metrics(preds, refs) == approx({"exact_match": 0.5, "f1": 0.75})


# --- NER ------------------------------------------------------------------------------------------------------

def test_parse_entities():
    assert parse_entities("Barack Obama: Person, Hawaii: Location, President of the United States: Title") == {
        ("barack obama", "person"), ("hawaii", "location"), ("president of the united states", "title")}
    assert parse_entities("Barack   Obama : PERSON; Hawaii: Location.\nUN: Organization") == {
        ("barack obama", "person"), ("hawaii", "location"), ("un", "organization")}
    assert parse_entities("Time: 10:30: Date") == {("time: 10:30", "date")}  # split on the last colon
    assert parse_entities("none") == parse_entities("None.") == parse_entities("") == set()
    assert parse_entities("Obama, Hawaii: Location") == {("hawaii", "location")}  # items without ":" ignored


def test_ner_micro_f1_hand_case():
    preds = ["Barack Obama: Person, Hawaii: Location", "Google: Location", "none"]
    refs = ["barack  obama: PERSON, Hawaii: Location, Honolulu: Location", "Google: Organization", "none"]
    # tp = 2 + 0 + 0, predicted = 2 + 1 + 0, gold = 3 + 1 + 0: P = 2/3, R = 1/2, F1 = 4/7.
    assert ner_metrics(preds, refs) == approx({"entity_precision": 2 / 3, "entity_recall": 0.5, "entity_f1": 4 / 7})
    # per example: P 1, R 2/3 -> 0.8; a wrong type -> 0; "none" for a sentence without entities -> 1.
    assert per_example_scores("ner", preds, refs)["entity_f1"] == approx([0.8, 0.0, 1.0])


def test_ner_empty_set_conventions():
    # 0/0 counts as perfect only when nothing was predicted and nothing was expected.
    assert ner_metrics(["none", ""], ["none", "None"])["entity_f1"] == 1.0
    assert ner_metrics(["none"], ["Hawaii: Location"]) == {"entity_precision": 0.0, "entity_recall": 0.0,
                                                           "entity_f1": 0.0}
    assert ner_metrics(["Hawaii: Location"], ["none"]) == {"entity_precision": 0.0, "entity_recall": 0.0,
                                                           "entity_f1": 0.0}


# --- classification -------------------------------------------------------------------------------------------

def test_parse_choice():
    choices = ["positive", "negative"]
    assert parse_choice("Sentiment: Positive", choices) == "positive"
    assert parse_choice('  "Negative."  ', choices) == "negative"
    assert parse_choice("It is negative, not positive", choices) == "negative"  # first occurrence wins
    assert parse_choice("positively", choices) is None  # whole words only
    assert parse_choice("", choices) is None
    assert parse_choice("NEGATIVE", ["Positive", "Negative"]) == "Negative"  # returned as given
    assert parse_choice("Label: very positive", ["positive", "very positive"]) == "very positive"
    assert parse_choice("billing", ["Billing issue", "billing"]) == "billing"  # exact match beats a substring


def test_classification_hand_case():
    choices = ["positive", "negative", "neutral"]
    preds = ["Positive", "Sentiment: negative", "negative.", "I don't know"]
    refs = ["positive", "positive", "negative", "Negative"]
    # correct: 1 and 3 -> accuracy 2/4.  positive: TP 1, FP 0, FN 1 -> 2/3.  negative: TP 1, FP 1, FN 1 -> 1/2.
    # neutral appears nowhere -> skipped.  macro-F1 = (2/3 + 1/2) / 2 = 7/12.  One of four unparseable.
    assert classification_metrics(preds, refs, choices) == approx(
        {"accuracy": 0.5, "macro_f1": 7 / 12, "invalid_rate": 0.25})
    assert per_example_scores("classification", preds, refs, choices) == {"accuracy": [1.0, 0.0, 1.0, 0.0]}


def test_classification_rejects_a_reference_outside_the_label_set():
    with pytest.raises(ValueError, match="match none"):
        classification_metrics(["positive"], ["mixed"], ["positive", "negative"])


# --- dispatch errors ------------------------------------------------------------------------------------------

def test_compute_metrics_errors():
    with pytest.raises(ValueError, match="classification, summarization, translation, qa, ner"):
        compute_metrics("sentiment", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics("qa", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("summarization", [], [])
    with pytest.raises(ValueError, match="choices"):
        compute_metrics("classification", ["positive"], ["positive"])
    with pytest.raises(ValueError, match="unknown task type"):
        per_example_scores("nope", ["a"], ["a"])
