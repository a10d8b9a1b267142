"""NER from token/tag data: BIO edge cases, integer tag ids (named, and from a datasets ClassLabel), CoNLL files."""

from __future__ import annotations

import pytest

from instructune.data.conll import bio_to_entities, read_conll, records_from_tokens, tag_names_from_features
from instructune.data.load import Record
from instructune.errors import InstructuneError

NAMES = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]


def ents(*pairs):
    return [{"text": t, "type": k} for t, k in pairs]


@pytest.mark.parametrize("tokens,tags,expected", [
    ("Barack Obama visited Hawaii".split(), ["B-PER", "I-PER", "O", "B-LOC"],
     ents(("Barack Obama", "PER"), ("Hawaii", "LOC"))),
    # I- after O (and at the start) starts an entity: IOB1 tolerance
    ("in New York and Paris".split(), ["O", "I-LOC", "I-LOC", "O", "I-LOC"],
     ents(("New York", "LOC"), ("Paris", "LOC"))),
    (["Paris", "is"], ["I-LOC", "O"], ents(("Paris", "LOC"))),
    # B- after B- of the same type: two entities
    ("Ann Bob".split(), ["B-PER", "B-PER"], ents(("Ann", "PER"), ("Bob", "PER"))),
    # B- inside an I- run of the same type also splits
    ("Ann Lee Bob".split(), ["B-PER", "I-PER", "B-PER"], ents(("Ann Lee", "PER"), ("Bob", "PER"))),
    # I-X after B-Y starts a new X
    ("Acme Paris Office".split(), ["B-ORG", "I-LOC", "I-LOC"], ents(("Acme", "ORG"), ("Paris Office", "LOC"))),
    # an entity at the sentence end is closed
    ("met Ann Lee".split(), ["O", "B-PER", "I-PER"], ents(("Ann Lee", "PER"))),
    ("nothing here".split(), ["O", "O"], []),
    ([], [], []),
])
def test_bio_edge_cases(tokens, tags, expected):
    assert bio_to_entities(tokens, tags) == expected


@pytest.mark.parametrize("tag", ["E-PER", "S-LOC", "B-", "I- ", "B", "o", "", 3])
def test_bad_tags_name_where(tag):
    with pytest.raises(InstructuneError, match=r"^here:7: bad NER tag"):
        bio_to_entities(["x"], [tag], "here:7")


def test_lengths_that_differ():
    with pytest.raises(InstructuneError, match="s:1: 2 tokens but 1 NER tags"):
        bio_to_entities(["a", "b"], ["O"], "s:1")


def test_records_from_tokens_with_strings_and_integer_ids():
    records = [Record({"id": "7", "tokens": ["Ann", "works", "at", "Acme", "Corp"], "ner_tags": [1, 0, 0, 3, 4]},
                      "f:1"),
               Record({"tokens": ["Paris"], "ner_tags": ["B-LOC"]}, "f:2")]
    out = records_from_tokens(records, NAMES)
    assert out[0].data == {"id": "7", "tokens": ["Ann", "works", "at", "Acme", "Corp"], "ner_tags": [1, 0, 0, 3, 4],
                           "text": "Ann works at Acme Corp", "entities": ents(("Ann", "PER"), ("Acme Corp", "ORG"))}
    assert out[0].where == "f:1"
    assert out[1].data["text"] == "Paris" and out[1].data["entities"] == ents(("Paris", "LOC"))
    assert records[0].data.get("text") is None  # the input records are left as they were


@pytest.mark.parametrize("data,names,message", [
    ({"tokens": ["a", "b"], "ner_tags": [0]}, NAMES, "2 tokens but 1 ner_tags"),
    ({"tokens": ["a"], "ner_tags": [7]}, NAMES, r"ner_tags\[0\] is 7, outside the 7 tag names"),
    ({"tokens": ["a"], "ner_tags": [-1]}, NAMES, r"ner_tags\[0\] is -1, outside"),
    ({"tokens": ["a"], "ner_tags": [1]}, None, r"ner_tags\[0\] is the integer 1 but no tag names"),
    ({"tokens": "a b", "ner_tags": ["O", "O"]}, None, "field 'tokens' is a str; expected a list"),
    ({"tokens": ["a"], "ner_tags": "O"}, None, "field 'ner_tags' is a str; expected a list"),
    ({"tokens": ["a"]}, None, "field 'ner_tags' is missing"),
    ({"tokens": [1], "ner_tags": ["O"]}, None, r"tokens\[0\] is 1; expected a non-empty string"),
    ({"tokens": ["a"], "ner_tags": ["X-PER"]}, None, "bad NER tag 'X-PER'"),
    ({"tokens": ["a"], "ner_tags": [True]}, NAMES, "bad NER tag True"),
])
def test_records_from_tokens_errors_name_the_record(data, names, message):
    with pytest.raises(InstructuneError, match=r"^d\.jsonl:3: " + message):
        records_from_tokens([Record(data, "d.jsonl:3")], names)


def test_integer_tags_from_a_saved_datasets_folder(tmp_path):
    import datasets

    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=NAMES))})
    rows = {"tokens": [["Ann", "visited", "New", "York"], ["no", "one"]], "ner_tags": [[1, 0, 5, 6], [0, 0]]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    loaded = datasets.load_from_disk(str(tmp_path / "hf"))
    names = tag_names_from_features(loaded)
    assert names == NAMES
    assert tag_names_from_features(datasets.DatasetDict({"train": loaded})) == NAMES
    records = [Record(dict(r), f"hf[train {i}]") for i, r in enumerate(loaded)]
    out = records_from_tokens(records, names)
    assert [r.data["entities"] for r in out] == [ents(("Ann", "PER"), ("New York", "LOC")), []]
    assert out[0].data["text"] == "Ann visited New York"
    # string tags, or no ner_tags column: no names to find
    plain = datasets.Dataset.from_dict({"tokens": [["a"]], "ner_tags": [["O"]]})
    assert tag_names_from_features(plain) is None
    assert tag_names_from_features(datasets.Dataset.from_dict({"text": ["a"]})) is None


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER


-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP I-LOC
1996-08-22 CD I-NP O"""


def test_read_conll_sentences_docstart_and_trailing_sentence(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL, encoding="utf-8")
    records = read_conll(path)
    assert [r.where for r in records] == [f"{path}:3", f"{path}:9", f"{path}:15"]
    assert [r.data["text"] for r in records] == ["EU rejects German call .", "Peter Blackburn", "BRUSSELS 1996-08-22"]
    assert records[0].data["entities"] == ents(("EU", "ORG"), ("German", "MISC"))
    assert records[0].data["tokens"] == ["EU", "rejects", "German", "call", "."]
    assert records[0].data["ner_tags"] == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert records[1].data["entities"] == ents(("Peter Blackburn", "PER"))
    assert records[2].data["entities"] == ents(("BRUSSELS", "LOC"))  # IOB1: I- after a blank line starts one


def test_read_conll_two_columns_tabs_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("\ufeffAnn\tB-PER\r\nran\tO\r\n\r\n\r\nBob\tB-PER\r\n".encode("utf-8"))
    records = read_conll(path)
    assert [(r.data["text"], r.where) for r in records] == [("Ann ran", f"{path}:1"), ("Bob", f"{path}:5")]
    assert records[0].data["entities"] == ents(("Ann", "PER"))


@pytest.mark.parametrize("text,line,message", [
    ("Ann B-PER\nran O\nlonely\n", 3, "expected a token and an NER tag"),
    ("Ann B-PER\n\nBob E-PER\n", 3, "bad NER tag 'E-PER'"),
    ("Ann B-PER\nBob per\n", 2, "bad NER tag 'per'"),
])
def test_read_conll_malformed_line_names_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.conll"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InstructuneError, match=f"^{path}:{line}: {message}"):
        read_conll(path)


@pytest.mark.parametrize("content", [b"", b"\n\n", b"-DOCSTART- -X- O\n\n"])
def test_read_conll_without_sentences(tmp_path, content):
    path = tmp_path / "empty.conll"
    path.write_bytes(content)
    with pytest.raises(InstructuneError, match=f"^{path}: no sentences found"):
        read_conll(path)


def test_read_conll_not_utf8_names_the_line_and_a_missing_file(tmp_path):
    path = tmp_path / "latin1.conll"
    path.write_bytes("Ann B-PER\n\nJosé B-PER\n".encode("latin-1"))
    with pytest.raises(InstructuneError, match=rf"^{path}:3: not UTF-8: byte 0xe9"):
        read_conll(path)
    with pytest.raises(InstructuneError, match="cannot read"):
        read_conll(tmp_path / "nope.conll")
