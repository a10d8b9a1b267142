"""NER from token/tag data: BIO tags to {text, type} entities, CoNLL text files and token-tagged records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import InstructuneError
from .record import Record


def check_tag(tag: Any, where: str) -> str:
    """`tag` if it is O, B-<type> or I-<type>; anything else (IOBES E-/S-, a bare B, a number) is the user's error."""
    if isinstance(tag, str) and (tag == "O" or (tag[:2] in ("B-", "I-") and tag[2:].strip())):
        return tag
    raise InstructuneError(f"bad NER tag {tag!r}; expected O, B-<type> or I-<type> (BIO/IOB2)", where)


def bio_to_entities(tokens: list[str], tags: list[str], where: str = "") -> list[dict]:
    """[{"text": "...", "type": "..."}] from BIO/IOB2 tags, in order.

    Rules: B-X starts an entity of type X (so B-X B-X is two entities); I-X continues the open entity when it has
    type X; an I-X after O, at the start, or after an entity of another type starts a new entity (IOB1-style
    tolerance, so CoNLL-2003's original IOB1 tags read correctly); O ends the open entity, as does the end of the
    sentence. Entity text is its tokens joined with single spaces. A tag other than O / B-* / I-* is an
    InstructuneError naming `where`; so are `tokens` and `tags` of different lengths."""
    if len(tokens) != len(tags):
        raise InstructuneError(f"{len(tokens)} tokens but {len(tags)} NER tags", where)
    entities: list[dict] = []
    words: list[str] = []
    kind = None  # the open entity's type, None outside one

    def close() -> None:
        if kind is not None:
            entities.append({"text": " ".join(words), "type": kind})

    for token, tag in zip(tokens, tags):
        tag = check_tag(tag, where)
        if tag == "O":
            close()
            kind, words = None, []
        elif tag.startswith("I-") and tag[2:] == kind:
            words.append(token)
        else:  # B-X, or I-X that cannot continue the open entity
            close()
            kind, words = tag[2:], [token]
    close()
    return entities


def _decode_line(raw: bytes, path: Path, lineno: int, offset: int) -> str:
    """One line as UTF-8 (a byte-order mark dropped on line 1); a bad byte is named by line and byte offset, worded as
    load.py words it."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise InstructuneError(f"not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} of the file; "
                               "save it as UTF-8", f"{path}:{lineno}") from None


def _tag_strings(tags: list, tag_names: list[str] | None, where: str) -> list[str]:
    out = []
    for i, tag in enumerate(tags):
        if isinstance(tag, int) and not isinstance(tag, bool):
            if tag_names is None:
                raise InstructuneError(f"ner_tags[{i}] is the integer {tag} but no tag names are known; give the "
                                       "names (a datasets ClassLabel feature) or write the tags as strings", where)
            if not 0 <= tag < len(tag_names):
                raise InstructuneError(f"ner_tags[{i}] is {tag}, outside the {len(tag_names)} tag names "
                                       f"{list(tag_names)}", where)
            tag = tag_names[tag]
        out.append(check_tag(tag, where))
    return out


def records_from_tokens(records: list[Record], tag_names: list[str] | None = None) -> list[Record]:
    """Records with `tokens` + `ner_tags` (tag strings, or integer ids mapped through `tag_names`) turned into
    records with `text` (tokens joined by spaces; an existing `text` is replaced, as the tags describe the tokens)
    and `entities` (list of {text, type}); other fields, `tokens` and `ner_tags` included, kept.

    Errors (InstructuneError with the record's `where`): a missing or non-list field, a non-string token, lengths
    that differ, an id out of range or ids without names, a bad tag."""
    out = []
    for r in records:
        for name in ("tokens", "ner_tags"):
            if not isinstance(r.data.get(name), list):
                got = "missing" if name not in r.data else f"a {type(r.data[name]).__name__}"
                raise InstructuneError(f"field {name!r} is {got}; expected a list", r.where)
        tokens, tags = r.data["tokens"], r.data["ner_tags"]
        bad = [i for i, t in enumerate(tokens) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise InstructuneError(f"tokens[{bad[0]}] is {tokens[bad[0]]!r}; expected a non-empty string", r.where)
        if len(tokens) != len(tags):
            raise InstructuneError(f"{len(tokens)} tokens but {len(tags)} ner_tags", r.where)
        entities = bio_to_entities(tokens, _tag_strings(tags, tag_names, r.where), r.where)
        out.append(Record({**r.data, "text": " ".join(tokens), "entities": entities}, r.where, dict(r.meta)))
    return out


def tag_names_from_features(dataset) -> list[str] | None:
    """The tag names of a `datasets` Dataset (or DatasetDict) whose `ner_tags` is a sequence of ClassLabel
    (`features["ner_tags"].feature.names`); None when the tags are strings or the dataset has no `ner_tags`."""
    if hasattr(dataset, "values") and not hasattr(dataset, "features"):  # a DatasetDict: every split shares features
        dataset = next(iter(dataset.values()), None)
    feature = (getattr(dataset, "features", None) or {}).get("ner_tags")
    inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
    names = getattr(inner, "names", None)
    return list(names) if names else None


def read_conll(path) -> list[Record]:
    """A CoNLL text file: one token per line, token first and NER tag last (whitespace-separated columns, so
    CoNLL-2003's 4-column lines work), a blank line between sentences, lines starting with -DOCSTART- skipped.

    Each sentence becomes Record({"text", "entities", "tokens", "ner_tags"}, where=f"{path}:{first line}").
    Malformed lines (one column only, a bad tag) name f"{path}:{lineno}"; an empty file or one with no sentences,
    bytes that are not UTF-8 (named by line) and an unreadable file are InstructuneErrors too."""
    path = Path(path)
    try:
        raw_lines = path.read_bytes().splitlines(keepends=True)
    except OSError as e:
        raise InstructuneError(f"cannot read: {e.strerror or e}", str(path)) from None
    records: list[Record] = []
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    offset = 0

    def flush() -> None:
        if tokens:
            where = f"{path}:{first}"
            records.append(Record({"text": " ".join(tokens), "entities": bio_to_entities(tokens, tags, where),
                                   "tokens": list(tokens), "ner_tags": list(tags)}, where))
            tokens.clear()
            tags.clear()

    for lineno, raw in enumerate(raw_lines, 1):
        line = _decode_line(raw, path, lineno, offset)
        offset += len(raw)
        columns = line.split()
        if not columns or columns[0].startswith("-DOCSTART-"):
            flush()  # a document marker also ends a sentence that lacked its blank line
            continue
        where = f"{path}:{lineno}"
        if len(columns) < 2:
            raise InstructuneError(f"expected a token and an NER tag separated by whitespace, got {line.strip()!r}",
                                   where)
        if not tokens:
            first = lineno
        tokens.append(columns[0])
        tags.append(check_tag(columns[-1], where))
    flush()
    if not records:
        raise InstructuneError("no sentences found (empty file, or only blank and -DOCSTART- lines)", str(path))
    return records
