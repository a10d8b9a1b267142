"""Task metrics: worked examples and hand-computed cases pinned to their values."""

from __future__ import annotations

import math
import random

import pytest

from instructune.evaluate.metrics import (PRIMARY_METRIC, TASK_TYPES, classification_metrics, compute_metrics,
                                          choice_settled, ner_metrics, normalize_answer, parse_choice, parse_entities,
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
    # Reference "It is cold outside", output "It is very cold outside" (instructune reports F-measures):
    # ROUGE-1: 4 shared unigrams, R 4/4, P 4/5 -> F1 8/9.  ROUGE-2: "it is", "cold outside" shared, R 2/3, P 2/4 ->
    # F1 4/7.  ROUGE-L is the longest common *subsequence* "it is cold outside" (4) -> 1.0 / 0.8 / 8/9; the course
    # slide's 0.5 / 0.4 / 0.44 counts a longest common *substring* ("it is" or "cold outside", length 2).
    ours = summarization_metrics(["It is very cold outside"], ["It is cold outside"])
    assert ours == approx({"rouge1": 8 / 9, "rouge2": 4 / 7, "rougeL": 8 / 9, "rougeLsum": 8 / 9}, abs=1e-9)
    assert [round(ours[k], 2) for k in ("rouge1", "rouge2", "rougeL")] == [0.89, 0.57, 0.89]


def test_rouge_clips_repeated_unigrams():
    # "cold" counts once, not four times: unigram P = R = 1/4 (4/4 = 1.0 without clipping); no shared bigram.
    got = summarization_metrics(["cold cold cold cold"], ["It is cold outside"])
    assert got == approx({"rouge1": 0.25, "rouge2": 0.0, "rougeL": 0.25, "rougeLsum": 0.25}, abs=1e-9)


def test_summarization_stems_and_averages_per_example_f_measures():
    preds = ["the cats are sitting on the mat", "stocks fell sharply today", "nothing in common"]
    refs = ["a cat sat on the mat", "stocks dropped sharply on monday", "completely different words"]
    # Porter stems: cats -> cat, sitting -> sit, stocks -> stock, sharply -> sharpli, dropped -> drop.
    # 1: unigrams the, cat, on, mat shared: P 4/7, R 4/6 -> 8/13 (3/7, 3/6 -> 6/13 without the stemmer); bigrams
    #    "on the", "the mat": P 2/6, R 2/5 -> 4/11; LCS "cat on the mat" (4) -> 8/13.
    # 2: stock, sharpli shared: P 2/4, R 2/5 -> 4/9; no shared bigram; LCS 2 -> 4/9.   3: nothing shared -> 0.
    per = per_example_scores("summarization", preds, refs)
    rouge1 = [8 / 13, 4 / 9, 0.0]
    assert per == {"rouge1": approx(rouge1), "rouge2": approx([4 / 11, 0.0, 0.0]), "rougeL": approx(rouge1),
                   "rougeLsum": approx(rouge1)}  # one line each: rougeLsum is rougeL
    assert summarization_metrics(preds, refs) == approx({"rouge1": (8 / 13 + 4 / 9) / 3, "rouge2": 4 / 33,
                                                         "rougeL": (8 / 13 + 4 / 9) / 3,
                                                         "rougeLsum": (8 / 13 + 4 / 9) / 3})
    notes = compute_metrics("summarization", preds, refs)[1]
    assert set(notes) == {"rouge1", "rouge2", "rougeL", "rougeLsum"} and "use_stemmer=True" in notes["rougeL"]


# --- BLEU / chrF ----------------------------------------------------------------------------------------------

BLEU_REF = "I am very happy to say that I am drinking a warm cup of tea."
BLEU_CANDIDATES = ["I am very happy that I am drinking a cup of tea.",
                   "I am very happy that I am drinking a warm cup of tea.",
                   "I am very happy to say that I am drinking a warm tea."]


def test_bleu_course_example_with_sacrebleu_13a_tokenizer():
    # The 13a tokenizer splits off the final "."; every n-gram order has a match, so smoothing and effective order
    # do not change these, and one sentence's corpus BLEU is its sentence BLEU.
    per = per_example_scores("translation", BLEU_CANDIDATES, [BLEU_REF] * 3)["bleu"]
    assert [round(s, 3) for s in per] == [0.539, 0.750, 0.772]
    assert [round(translation_metrics([c], [BLEU_REF])["bleu"], 3) for c in BLEU_CANDIDATES] == [0.539, 0.750, 0.772]


def test_bleu_course_example_with_whitespace_tokens():
    # The course's other figures split on whitespace only, so "tea." is one token. Writing it as the single word
    # "teadot" gives 13a exactly those tokens; the scores must then be the whitespace figures, not the 13a ones.
    cands, ref = [c.replace("tea.", "teadot") for c in BLEU_CANDIDATES], BLEU_REF.replace("tea.", "teadot")
    per = per_example_scores("translation", cands, [ref] * 3)["bleu"]
    assert [round(s, 3) for s in per] == [0.495, 0.730, 0.798]


def test_corpus_bleu_pools_counts_and_lengths():
    preds = ["the cat sat on", "he ran very fast today again"]
    refs = ["the cat sat on the mat", "he ran very fast"]
    # Sentence 1: every n-gram matches (4/4, 3/3, 2/2, 1/1), 4 tokens for 6: brevity penalty exp(1 - 6/4) = e^-0.5.
    # Sentence 2: 4/6, 3/5, 2/4, 1/3, longer than its reference: BLEU = (1/15)^(1/4).
    # Corpus: 8/10, 6/8, 4/6, 2/4 and 10 tokens for 10 (no brevity penalty): BLEU = 0.2^(1/4).
    per = per_example_scores("translation", preds, refs)["bleu"]
    assert per == approx([math.exp(-0.5), (1 / 15) ** 0.25])
    corpus = translation_metrics(preds, refs)["bleu"]
    assert corpus == approx(0.2 ** 0.25)
    assert corpus - sum(per) / 2 == approx(0.2 ** 0.25 - (math.exp(-0.5) + (1 / 15) ** 0.25) / 2)  # +0.1114
    assert round(corpus - sum(per) / 2, 4) == 0.1114


def test_chrf_hand_cases_and_corpus_pooling():
    # chrF (not chrF++): character n-grams 1..6 without spaces, precision and recall averaged over the orders both
    # sides have, then F-beta with beta = 2.  "ab" vs "abc": orders 1, 2: P (1 + 1)/2 = 1, R (2/3 + 1/2)/2 = 7/12
    # -> 5 * 7/12 / (4 + 7/12) = 7/11 (beta = 1 would give 14/19).  "abc" vs "abd": P = R = (2/3 + 1/2 + 0)/3 = 7/18.
    preds, refs = ["ab", "abc"], ["abc", "abd"]
    assert per_example_scores("translation", preds, refs)["chrf"] == approx([7 / 11, 7 / 18])
    assert translation_metrics(preds[:1], refs[:1])["chrf"] == approx(7 / 11)
    # Corpus: counts pooled per order first: P (4/5 + 2/3 + 0)/3 = 22/45, R (4/6 + 2/4 + 0)/3 = 7/18
    # -> 5PR / (4P + R) = 6930/17091 = 0.4055, not the mean of the sentence scores (0.5126).
    assert translation_metrics(preds, refs)["chrf"] == approx(6930 / 17091)


def test_translation_notes_name_the_settings():
    # One-word sentences have no bigrams: corpus BLEU (no effective order) is 0 while chrF is the pooled 0.4055.
    scores, notes = compute_metrics("translation", ["ab", "abc"], ["abc", "abd"])
    assert scores == approx({"bleu": 0.0, "chrf": 6930 / 17091})
    assert notes["bleu"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert notes["chrf"].startswith("nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")


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


@pytest.mark.parametrize("text, choices, settled", [
    ("Positive:", ["positive", "negative"], True),                   # a non-word character closed the word
    ("Positive. The text is", ["positive", "negative"], True),
    ("Positive", ["positive", "negative"], False),                   # may still become "Positively"
    ("Positively good", ["positive", "negative"], False),            # no choice yet
    ("It is negative, not positive", ["positive", "negative"], True),
    ("very ", ["positive", "very positive"], False),                 # "very positive" is still open
    ("positive or", ["positive", "positive or negative"], False),    # a longer choice at the same start is open
    ("positive, very", ["positive", "very positive"], True),
    ("Label: very positive.", ["positive", "very positive"], True),
    ('  "Negative." ', ["positive", "negative"], True),
    ("yes!", ["yes!", "no!"], False),                                # choices ending in punctuation: never settled
    ("", ["positive", "negative"], False),
    ("positive_ ", ["positive", "negative"], False),                  # "_" is a word character
])
def test_choice_settled(text, choices, settled):
    assert choice_settled(text, choices) is settled
    if settled:
        assert all(parse_choice(text + more, choices) == parse_choice(text, choices) is not None
                   for more in ("", "ly", " negative", "_x", "!", "\n\nnot positive"))


def test_a_settled_answer_parses_the_same_whatever_follows():
    """Random texts over an alphabet of word parts, spaces, underscores and punctuation, with choices that overlap
    (one a prefix or a word of another): once `choice_settled`, no continuation changes `parse_choice`."""
    rng = random.Random(0)
    alphabet = ["a", "b", "ab", " ", "_", ".", ":", "\n", '"', "-"]
    choice_sets = [["a", "b"], ["a", "a b"], ["ab", "b"], ["a b", "b a", "a"], ["A", "B a"], ["ab", "a"], ["a_b", "a"]]
    seen = 0
    for _ in range(20000):
        choices = rng.choice(choice_sets)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 7)))
        if not choice_settled(text, choices):
            continue
        seen += 1
        for _ in range(10):
            more = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
            assert parse_choice(text + more, choices) == parse_choice(text, choices), (text, more, choices)
    assert seen > 2000  # and the rule is not so cautious that it never stops


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
