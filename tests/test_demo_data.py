"""The built-in demo data generator: sizes, balance, determinism, held-out names, task invariants, French grammar."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from instructune.demo import SIZES, TASKS, generate, write_demo_data
from instructune.demo import data as demo

FIELDS = {
    "support_tickets": ["text", "label"],
    "incident_summaries": ["text", "summary"],
    "en_fr_translation": ["text", "translation"],
    "company_qa": ["context", "question", "answer"],
    "news_ner": ["text", "entities"],
}


def _key(task: str) -> str:
    return "context" if task == "company_qa" else "text"


@pytest.fixture(scope="module")
def suite():
    return {task: generate(task) for task in TASKS}


def test_sizes_and_fields(suite):
    assert set(suite) == set(FIELDS) == set(TASKS)
    for task, splits in suite.items():
        assert {s: len(r) for s, r in splits.items()} == SIZES == {"train": 120, "validation": 20, "test": 40}
        for records in splits.values():
            assert all(list(r) == FIELDS[task] for r in records), task
            assert all(isinstance(r[f], str) and r[f].strip() for r in records for f in FIELDS[task] if f != "entities")


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="unknown demo task"):
        generate("sentiment")


def test_support_labels_are_balanced(suite):
    for split, records in suite["support_tickets"].items():
        counts = Counter(r["label"] for r in records)
        assert set(counts) == {"billing", "delivery", "technical", "account"}
        assert set(counts.values()) == {SIZES[split] // 4}, (split, counts)


def test_deterministic_and_seed_dependent(suite):
    for task in TASKS:
        assert generate(task, 0) == suite[task]
        assert generate(task, 1) != suite[task]
        assert generate(task, 1) == generate(task, 1)


def test_no_record_text_in_two_splits(suite):
    for task, splits in suite.items():
        texts = {s: [r[_key(task)] for r in records] for s, records in splits.items()}
        for s, values in texts.items():
            assert len(set(values)) == len(values), (task, s)
        assert not set(texts["train"]) & set(texts["test"]), task
        assert not set(texts["validation"]) & set(texts["test"]), task
        assert not set(texts["train"]) & set(texts["validation"]), task


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.casefold())


def test_no_normalised_or_near_duplicates_of_training_inputs(suite):
    for task, splits in suite.items():
        train = [_words(r[_key(task)]) for r in splits["train"]]
        train_grams = [{tuple(w[i:i + 3]) for i in range(len(w) - 2)} for w in train]
        normalised = {" ".join(w) for w in train}
        for split in ("validation", "test"):
            for r in splits[split]:
                words = _words(r[_key(task)])
                assert " ".join(words) not in normalised, (task, r)
                grams = {tuple(words[i:i + 3]) for i in range(len(words) - 2)}
                assert max(len(grams & t) / len(grams) for t in train_grams) < 0.8, (task, r)


def test_held_out_pools_are_disjoint():
    pairs = [(demo.FIRST_NAMES, demo.FIRST_NAMES_HELD_OUT), (demo.LAST_NAMES, demo.LAST_NAMES_HELD_OUT),
             (demo.COMPANY_WORDS, demo.COMPANY_WORDS_HELD_OUT), (demo.CITIES, demo.CITIES_HELD_OUT),
             (demo.BRANDS, demo.BRANDS_HELD_OUT), (demo.SERVICES, demo.SERVICES_HELD_OUT),
             (demo.FR_NAMES, demo.FR_NAMES_HELD_OUT)]
    for seen, held_out in pairs:
        assert not set(seen) & set(held_out)


def test_held_out_names_never_appear_outside_test(suite):
    seen_text = " ".join(json.dumps(r, ensure_ascii=False) for splits in suite.values()
                         for s in ("train", "validation") for r in splits[s]).lower()
    held_out = (demo.FIRST_NAMES_HELD_OUT + demo.LAST_NAMES_HELD_OUT + demo.COMPANY_WORDS_HELD_OUT
                + demo.CITIES_HELD_OUT + demo.BRANDS_HELD_OUT + tuple(s for s, _ in demo.SERVICES_HELD_OUT)
                + tuple(n for n, _ in demo.FR_NAMES_HELD_OUT))
    assert not [name for name in held_out if name.lower() in seen_text]
    # and the test split really uses them
    test_people = [e["text"] for r in suite["news_ner"]["test"] for e in r["entities"] if e["type"] == "person"]
    assert test_people and all(p.split()[0] in demo.FIRST_NAMES_HELD_OUT for p in test_people)
    train_text = " ".join(r["text"] for r in suite["news_ner"]["train"])
    assert not [p for p in test_people if p in train_text]
    assert all(r["context"].split(" ")[0] in demo.FIRST_NAMES_HELD_OUT + demo.COMPANY_WORDS_HELD_OUT + ("In",)
               for r in suite["company_qa"]["test"])


def test_qa_answers_are_spans_of_the_context(suite):
    for records in suite["company_qa"].values():
        for r in records:
            assert r["answer"] and r["answer"] in r["context"], r
            assert r["question"].endswith("?")
            assert 3 <= r["context"].count(". ") + 1 <= 5, r["context"]
    questions = {r["question"].split(" ")[0] for r in suite["company_qa"]["train"]}
    assert len(questions) >= 4  # When / Who / Where / How / What / In / Which ...


def test_ner_entities_occur_in_order_with_valid_types(suite):
    for records in suite["news_ner"].values():
        for r in records:
            ents = r["entities"]
            assert 1 <= len(ents) <= 4, r
            assert all(list(e) == ["text", "type"] and e["type"] in ("person", "organization", "location") for e in ents)
            assert all(e["text"] in r["text"] for e in ents), r
            positions = [r["text"].index(e["text"]) for e in ents]
            assert positions == sorted(positions), r
    types = Counter(e["type"] for r in suite["news_ner"]["train"] for e in r["entities"])
    assert set(types) == {"person", "organization", "location"}


SUMMARY = re.compile(r"^The (.+?) (was down|was slow|returned errors) for (\d+) minutes on (\w+) after (.+); (.+) fixed it\.$")


def test_incident_summaries_restate_facts_of_the_text(suite):
    for records in suite["incident_summaries"].values():
        for r in records:
            m = SUMMARY.match(r["summary"])
            assert m, r["summary"]
            service, _, minutes, day, cause, _ = m.groups()
            text = r["text"]
            assert f"the {service} " in text and f"{minutes} minutes" in text and day in text, r
            assert cause.lower() in text.lower(), r
            assert 12 <= len(r["summary"].split()) <= 20, r["summary"]
            assert 3 <= len(re.findall(r"[.!?](?:\s|$)", text)) <= 5, text
    openings = {r["text"].split(" ")[0] for r in suite["incident_summaries"]["train"]}
    assert len(openings) >= 4


def test_templates_are_varied(suite):
    assert all(len(v) >= 6 for v in demo.TICKETS.values())
    assert min(len(demo.OPEN_SENTENCES), len(demo.NEWS), len(demo.VERBS)) >= 6
    for task in TASKS:
        firsts = Counter(r[_key(task)].split(" ")[0].lower() for r in suite[task]["train"])
        assert firsts.most_common(1)[0][1] < 0.5 * SIZES["train"], (task, firsts.most_common(3))


# --- French -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, expected", [
    (("the", "car", "black"), ("the black car", "la voiture noire")),
    (("the", "clock"), ("the clock", "l'horloge")),
    (("the", "computer", "white"), ("the white computer", "l'ordinateur blanc")),
    (("a", "orange", "ripe"), ("a ripe orange", "une orange mûre")),
    (("a", "orange"), ("an orange", "une orange")),
    (("a", "umbrella", "red"), ("a red umbrella", "un parapluie rouge")),
    (("a", "apple", "fresh", True), ("some fresh apples", "des pommes fraîches")),
    (("this", "computer", "expensive"), ("this expensive computer", "cet ordinateur cher")),
    (("this", "clock", "white"), ("this white clock", "cette horloge blanche")),
    (("this", "hat", "white", True), ("these white hats", "ces chapeaux blancs")),
    (("my", "clock"), ("my clock", "mon horloge")),
    (("my", "dress", "expensive", True), ("my expensive dresses", "mes robes chères")),
    (("my", "cake", "delicious"), ("my delicious cake", "mon gâteau délicieux")),
])
def test_noun_phrase_agreement(args, expected):
    assert demo._noun_phrase(*args) == expected


@pytest.mark.parametrize("args, expected", [
    ((("she", "elle", 2, "f"), "arrive", "past", False, None, "station", ("yesterday", "hier")),
     ("She arrived at the station yesterday.", "Elle est arrivée à la gare hier.")),
    ((("the girls", "les filles", 5, "f"), "stay", "past", True, None, "home", None),
     ("The girls did not stay at home.", "Les filles ne sont pas restées à la maison.")),
    ((("I", "je", 0, None), "buy", "past", True, ("the", "apple", "red", True)),
     ("I did not buy the red apples.", "Je n'ai pas acheté les pommes rouges.")),
    ((("I", "je", 0, None), "buy", "pres", False, ("a", "umbrella", None, False)),
     ("I buy an umbrella.", "J'achète un parapluie.")),
    ((("we", "nous", 3, "m"), "eat", "pres", False, ("a", "apple", None, False), None, ("every morning", "chaque matin")),
     ("We eat an apple every morning.", "Nous mangeons une pomme chaque matin.")),
    ((("you", "vous", 4, None), "like", "pres", True, ("this", "computer", None, False)),
     ("You do not like this computer.", "Vous n'aimez pas cet ordinateur.")),
    ((("my friends", "mes amis", 5, "m"), "return", "past", False, None, "to_office", ("last week", "la semaine dernière")),
     ("My friends returned to the office last week.", "Mes amis sont retournés au bureau la semaine dernière.")),
])
def test_sentence_translations(args, expected):
    assert demo._sentence(*args) == expected


def test_generated_french_agrees_with_the_grammar_tables(suite):
    records = [r for split in suite["en_fr_translation"].values() for r in split]
    checked_np = checked_pp = 0
    for r in records:
        en, fr = r["text"], r["translation"]
        assert 5 <= len(en.split()) <= 12 and en.endswith(".") and fr.endswith("."), r
        assert fr[0].isupper()
        # a noun with an adjective takes the adjective form of its gender and number
        for en_sg, en_pl, fr_sg, fr_pl, gender, _, _ in demo.NOUNS:
            for adj, forms in demo.ADJECTIVES.items():
                for plural, en_noun, fr_noun in ((False, en_sg, fr_sg), (True, en_pl, fr_pl)):
                    if re.search(rf"\b{adj} {en_noun}\b", en):
                        form = forms[(2 if plural else 0) + (gender == "f")]
                        assert re.search(rf"\b{fr_noun} {form}\b", fr), (r, form)
                        checked_np += 1
        # être verbs: the past participle agrees with the subject
        subjects = demo.SUBJECTS + tuple((n, n, 2, g) for n, g in demo.FR_NAMES + demo.FR_NAMES_HELD_OUT)
        for key, (base, _, past), _, participle, aux, _, _ in demo.VERBS:
            if aux != "être":
                continue
            for en_subj, _, person, gender in subjects:
                subj = en_subj[0].upper() + en_subj[1:]
                if en.startswith((f"{subj} {past} ", f"{subj} did not {base} ")):
                    expected = participle + ("e" if gender == "f" else "") + ("s" if person >= 3 else "")
                    assert re.search(rf"\b(est|sont|sommes)( pas)? {expected}\b", fr), (r, expected)
                    checked_pp += 1
        # elision and the before-vowel forms of determiners
        assert not re.search(r"\b(le|la|je|ne|ce|ma) [aeiouhâéèêîôû]", fr, re.IGNORECASE), r
    assert checked_np >= 20 and checked_pp >= 10
    assert any("ée" in r["translation"] for r in records) and any(" n'" in r["translation"] for r in records)


# --- writing ------------------------------------------------------------------------------------------------------

def test_write_demo_data_writes_valid_jsonl(tmp_path, suite):
    paths = write_demo_data(tmp_path / "demo")
    jsonl = [p for p in paths if p.suffix == ".jsonl"]
    assert len(jsonl) == len(TASKS) * len(SIZES) and all(p.is_file() for p in paths)
    for task in TASKS:
        for split, records in suite[task].items():
            path = tmp_path / "demo" / task / f"{split}.jsonl"
            lines = path.read_text(encoding="utf-8").splitlines()
            assert [json.loads(line) for line in lines] == records
            assert [list(json.loads(line)) for line in lines] == [FIELDS[task]] * len(records)
    assert (tmp_path / "demo" / "README.md").read_text(encoding="utf-8").startswith("# The demo data")
    assert not list((tmp_path / "demo").rglob("*.tmp"))
    assert "é" in (tmp_path / "demo" / "en_fr_translation" / "train.jsonl").read_text(encoding="utf-8")
    first = {p: p.read_bytes() for p in paths}
    write_demo_data(tmp_path / "demo")  # rewriting in place gives the same bytes
    assert all(p.read_bytes() == b for p, b in first.items())
