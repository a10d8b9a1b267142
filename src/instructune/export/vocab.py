"""A tokenizer as llama.cpp reads it from GGUF: byte-level BPE (`gpt2`) or SentencePiece-style BPE (`llama`), the
pre-tokenizer name, token types, merges or scores, special ids and whether BOS/EOS are added."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import gguf

from ..errors import InstructuneError

# llama.cpp's pre-tokenizer names for the splits Hugging Face tokenizers spell out in tokenizer.json (the names are
# the ones llama.cpp's converter writes after recognising the tokenizer by hashing its output).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")  # Qwen 2/2.5/3: single digits
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")  # Mistral's tekken (Nemo, Small 3)
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", TEKKEN_SPLIT: "tekken"}
SPIECE = "\u2581"


@dataclass
class GGUFVocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, eot, pad, unk -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None

    def add_to(self, writer: "gguf.GGUFWriter") -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.scores:
            writer.add_token_scores(self.scores)
        for kind, token_id in self.special.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def _steps(part: dict | None) -> list[dict]:
    if not part:
        return []
    if part.get("type") == "Sequence":
        return part.get("pretokenizers") or part.get("normalizers") or part.get("decoders") or []
    return [part]


def byte_level_pre(tj: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or None when it is none of the
    splits llama.cpp and transformers both implement."""
    steps = _steps(tj.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (LLAMA_VOCAB_PRE_TYPE_GPT2); "gpt2" is the tokenizer model's
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLITS.get(steps[0].get("pattern", {}).get("Regex"))
    return None


def is_sentencepiece_like(tj: dict) -> bool:
    """SentencePiece BPE as Hugging Face writes it (Gemma, Llama 2): spaces become '▁', bytes fall back to <0xXX>."""
    model = tj.get("model", {})
    spaces = any(s.get("type") == "Replace" and s.get("content") == SPIECE for s in _steps(tj.get("normalizer"))) or \
        any(s.get("type") == "Metaspace" for s in _steps(tj.get("pre_tokenizer")))
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and spaces


def _merges(tj: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in tj["model"].get("merges", [])]


def build_vocab(tokenizer, n_rows: int, end_of_turn: int | None) -> GGUFVocab:
    """The GGUF vocabulary of a fast tokenizer, padded with unused tokens up to the embedding's `n_rows`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise InstructuneError("GGUF export needs a fast tokenizer (a tokenizer.json); this one is a slow tokenizer")
    tj = json.loads(backend.to_str())
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise InstructuneError(f"the tokenizer has ids up to {max(vocab.values())} but the model only {n_rows} rows")
    added = tokenizer.added_tokens_decoder
    by_id = {i: t for t, i in vocab.items()}
    if tj.get("model", {}).get("type") == "BPE" and any(s.get("type") == "ByteLevel" for s in _steps(tj.get("decoder"))):
        pre = byte_level_pre(tj)
        if pre is None:
            raise InstructuneError("this byte-level tokenizer splits text in a way GGUF export does not know "
                                   f"(pre_tokenizer {json.dumps(tj.get('pre_tokenizer'))[:200]}); supported: GPT-2, "
                                   "SmolLM (digits), Llama 3, Qwen 2 and Mistral tekken splits")
        out = GGUFVocab("gpt2", pre, [], [])
        out.merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                      for pair in _merges(tj)]  # a space inside a merge part is escaped as llama.cpp's converter does
    elif is_sentencepiece_like(tj):
        out = GGUFVocab("llama", "default", [], [])
        pre = [s for s in _steps(tj.get("pre_tokenizer")) if s.get("type") == "Metaspace"]
        prepend = any(s.get("type") == "Prepend" for s in _steps(tj.get("normalizer")))
        out.add_space_prefix = prepend or bool(pre and pre[0].get("prepend_scheme", "always") != "never")
        # SentencePiece in llama.cpp merges the adjacent pair whose result scores highest: score = -(merge rank)
        rank = {}
        for r, (a, b) in enumerate(_merges(tj)):
            rank.setdefault(a + b, r)
        out.scores = [-float(rank.get(by_id.get(i, ""), len(rank) + i)) for i in range(n_rows)]
    else:
        raise InstructuneError(f"GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers; this one "
                               f"is {tj.get('model', {}).get('type')!r} with decoder {json.dumps(tj.get('decoder'))[:120]}")
    for i in range(n_rows):
        token = by_id.get(i)
        if token is None:
            out.tokens.append(f"[PAD{i}]")
            out.types.append(gguf.TokenType.UNUSED)
        elif i in added:
            out.tokens.append(token if added[i].special or out.model == "gpt2" else token.replace(SPIECE, " "))
            out.types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif out.model == "llama" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.tokens.append(token)
            out.types.append(gguf.TokenType.BYTE)
        else:
            out.tokens.append(token)
            out.types.append(gguf.TokenType.NORMAL)
    for kind in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            out.special[kind] = token_id
    if end_of_turn is not None and end_of_turn != tokenizer.eos_token_id:
        out.special["eot"] = end_of_turn
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    out.add_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    out.add_eos = tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id
    return out
