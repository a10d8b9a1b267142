"""Classical baselines: each method pinned on hand-made data where it must win and where it must lose."""

from __future__ import annotations

import random

import pytest

from instructune.evaluate.classical import (best_sentence, build_dictionary, classical_baseline, entity_pairs,
                                            match_entities, split_sentences)
from instructune.evaluate.metrics import compute_metrics

SPORTS = ["football", "goal", "referee", "striker", "match", "league", "stadium", "penalty"]
COOKING = ["oven", "recipe", "flour", "simmer", "garlic", "butter", "saucepan", "whisk"]
FILLER = ["the", "today", "again", "really", "very", "then"]


def _topic_examples(n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        label, words = ("sports", SPORTS) if i % 2 else ("cooking", COOKING)
        text = " ".join(rng.sample(words, 3) + rng.sample(FILLER, 2))
        out.append({"text": text, "label": label})
    return out


def test_classification_separable_topics_are_all_right():
    rng = random.Random(1)
    train, validation, test = _topic_examples(40, rng), _topic_examples(10, rng), _topic_examples(20, rng)
    preds, info = classical_baseline("classification", train, validation, test, seed=0, choices=["sports", "cooking"])
    assert preds == [e["label"] for e in test]
    scores, _ = compute_metrics("classification", preds, [e["label"] for e in test], ["sports", "cooking"])
    assert scores["accuracy"] == 1.0
    assert info["method"] == "tfidf-logreg"
    assert info["params"]["chosen_on"] == "validation"
    assert info["params"]["C"] in (0.1, 1.0, 10.0, 100.0)
    assert set(info["params"]["validation_accuracy"]) == {"0.1", "1.0", "10.0", "100.0"}


def _order_pair(rng: random.Random) -> list[dict]:
    """"u red v u blue v" vs "u blue v u red v": the same words, the same word bigrams and the same character
    n-grams, so TF-IDF gives both one vector, while the label (which colour comes first) differs."""
    u, v = rng.sample(["apple", "stone", "river", "cloud", "grass", "tiger", "lemon", "piano"], 2)
    return [{"text": f"{u} red {v} {u} blue {v}", "label": "redfirst"},
            {"text": f"{u} blue {v} {u} red {v}", "label": "bluefirst"}]


def test_classification_cannot_see_word_order_beyond_bigrams():
    rng = random.Random(2)
    train = [e for _ in range(20) for e in _order_pair(rng)]
    validation = [e for _ in range(4) for e in _order_pair(rng)]
    test = [e for _ in range(15) for e in _order_pair(rng)]
    preds, _ = classical_baseline("classification", train, validation, test, seed=0)
    # each test pair shares one feature vector, so exactly one of the two is right: accuracy is exactly chance
    assert all(preds[i] == preds[i + 1] for i in range(0, len(test), 2))
    assert sum(p == e["label"] for p, e in zip(preds, test)) / len(test) == 0.5
    assert set(preds) <= {"redfirst", "bluefirst"}


def test_classification_is_reproducible_and_uses_c1_without_validation():
    rng = random.Random(3)
    train, test = _topic_examples(30, rng), _topic_examples(8, rng)
    first = classical_baseline("classification", train, [], test, seed=7)
    assert first == classical_baseline("classification", train, [], test, seed=7)
    assert first[1]["params"]["C"] == 1.0 and first[1]["params"]["chosen_on"] == "default"


def test_classification_with_one_training_label_predicts_it():
    train = [{"text": "a b c", "label": "only"}, {"text": "d e f", "label": "only"}]
    preds, info = classical_baseline("classification", train, [], [{"text": "zzz", "label": "x"}])
    assert preds == ["only"] and info["method"] == "majority label"


# --- summarization --------------------------------------------------------------------------------------------

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _doc(rng: random.Random) -> str:
    # one long first sentence (16 words), so "first sentence" is never the same as the first 5 words
    return " ".join(rng.sample(WORDS, 16)) + ". " + " ".join(rng.sample(WORDS, 10)) + "."


def test_summarization_chooses_n_on_validation_only():
    rng = random.Random(4)
    validation = [{"text": t, "summary": " ".join(t.split()[:5])} for t in (_doc(rng) for _ in range(6))]
    test_texts = [_doc(rng) for _ in range(4)]
    # test references that would favour the first 15 words: they must not move the choice
    test = [{"text": t, "summary": " ".join(t.split()[:15])} for t in test_texts]
    preds, info = classical_baseline("summarization", [{"text": "x y", "summary": "x"}], validation, test)
    assert info["params"]["lead"] == "5 words" and info["params"]["chosen_on"] == "validation"
    assert info["params"]["validation_rougeL"]["5"] == pytest.approx(1.0)
    assert info["params"]["validation_rougeL"]["first sentence"] < 1.0
    assert preds == [" ".join(t.split()[:5]) for t in test_texts]


def test_summarization_can_choose_the_first_sentence():
    docs = ["The cat sat down on the warm mat. Then it slept for hours and hours.",
            "Rain fell. The river rose over its banks and flooded the whole valley that night."]
    validation = [{"text": d, "summary": split_sentences(d)[0]} for d in docs]
    test = [{"text": "Short one here. And then a much longer second sentence follows it.", "summary": "?"}]
    preds, info = classical_baseline("summarization", validation, validation, test)
    assert info["params"]["lead"] == "first sentence"
    assert preds == ["Short one here."]


def test_summarization_without_validation_defaults_to_the_first_sentence():
    preds, info = classical_baseline("summarization", [{"text": "a", "summary": "a"}], [],
                                     [{"text": "One two. Three four.", "summary": "x"}])
    assert preds == ["One two."] and info["params"]["chosen_on"] == "default"


# --- translation and QA ---------------------------------------------------------------------------------------

def test_translation_copies_the_source():
    test = [{"text": "Paris est belle.", "translation": "Paris is beautiful."},
            {"text": "Bonjour", "translation": "Hello"}]
    preds, info = classical_baseline("translation", [{"text": "a", "translation": "b"}], [], test)
    assert preds == ["Paris est belle.", "Bonjour"] and info["method"] == "copy source"


CONTEXT = ("Marie Curie was born in Warsaw in 1867. She moved to Paris to study physics. "
           "Tom had five apples. He ate two of them.")


def test_qa_picks_the_sentence_that_shares_most_words_and_loses_on_reasoning():
    test = [{"context": CONTEXT, "question": "Where was Marie Curie born?", "answer": "Warsaw"},
            {"context": CONTEXT, "question": "Why did she move to Paris?", "answer": "to study physics"},
            {"context": CONTEXT, "question": "How many apples are left?", "answer": "three"}]
    preds, info = classical_baseline("qa", [test[0]], [], test)
    assert preds == ["Marie Curie was born in Warsaw in 1867.", "She moved to Paris to study physics.",
                     "Tom had five apples."]
    f1 = [compute_metrics("qa", [p], [e["answer"]])[0]["f1"] for p, e in zip(preds, test)]
    assert f1[0] == pytest.approx(2 * (1 / 8) / (1 / 8 + 1))  # the answer is 1 of the sentence's 8 words
    assert f1[1] == pytest.approx(2 * (3 / 7) / (3 / 7 + 1))  # "to study physics": 3 of 7 words
    assert f1[2] == 0.0  # "three" is in no sentence: it needs arithmetic
    assert info["method"] == "best-overlap sentence"


def test_qa_ties_go_to_the_earliest_sentence():
    assert best_sentence("Nothing here. Nor here.", "What is it?") == "Nothing here."
    assert best_sentence("A dog barked. The dog slept.", "Which dog slept?") == "The dog slept."


# --- NER ------------------------------------------------------------------------------------------------------

NER_TRAIN = [
    {"text": "New York is big.", "entities": "New York: location"},
    {"text": "New York Times wrote it.", "entities": "New York Times: organization"},
    {"text": "Ann met Bob.", "entities": "Ann: person, Bob: person"},
    {"text": "Bob again.", "entities": [{"text": "Bob", "type": "person"}]},
    {"text": "The Bob ship.", "entities": "Bob: organization"},
    {"text": "Nothing here.", "entities": "none"},
]


def test_ner_dictionary_majority_type_and_both_answer_forms():
    d = build_dictionary(NER_TRAIN)
    assert d == {"New York": "location", "New York Times": "organization", "Ann": "person", "Bob": "person"}
    assert entity_pairs("Acme: Inc: organization, X:  person; none") == [("Acme: Inc", "organization"), ("X", "person")]


def test_ner_longest_match_whole_words_case_sensitive_unseen_missed():
    d = build_dictionary(NER_TRAIN)
    test = [
        {"text": "The New York Times and Ann in New York.", "entities": "x"},
        {"text": "Annabel, JoAnn and Bobby met new york people.", "entities": "none"},  # not whole words, wrong case
        {"text": "Carol met Ann.", "entities": "Carol: person, Ann: person"},  # Carol never seen in training
    ]
    preds, info = classical_baseline("ner", NER_TRAIN, [], test)
    assert preds == ["New York Times: organization, Ann: person, New York: location", "none", "Ann: person"]
    assert info["params"]["entries"] == 4
    scores, _ = compute_metrics("ner", preds[1:], [e["entities"] for e in test[1:]])
    assert scores["entity_recall"] == pytest.approx(0.5)  # Carol is missed
    assert scores["entity_precision"] == pytest.approx(1.0)


def test_ner_matches_do_not_overlap_and_repeat_once():
    d = {"New York": "location", "York Times": "organization", "Bob": "person"}
    # the longer "York Times" claims "York" first, so the overlapping "New York" is dropped; Bob is listed once
    assert match_entities("New York Times, Bob and Bob.", d) == [
        {"text": "York Times", "type": "organization"}, {"text": "Bob", "type": "person"}]
    # entries of one length: the alphabetically first claims the shared word
    assert match_entities("red blue tan", {"red blue": "a", "blue tan": "b"}) == [{"text": "blue tan", "type": "b"}]


def test_unknown_task_type_and_empty_train_are_refused():
    with pytest.raises(ValueError, match="unknown task type"):
        classical_baseline("regression", [{"text": "a"}], [], [])
    with pytest.raises(ValueError, match="training examples"):
        classical_baseline("qa", [], [], [])
