"""From pairs to the model's text and tokens: the chat template (or plain separator), k-shot prompts, completion masks."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InstructuneError
from .conversation import conversation_features, segments
from .template import Pair

SHOT_DELIMITER = "\n\n"
IGNORE = -100  # the label of a position that carries no loss (PyTorch's cross-entropy ignore_index)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken (the prompt); the completion and its end token are trained
    where: str = ""
    seq2seq: bool = False  # encoder-decoder (T5): input_ids is the encoder's prompt, labels the decoder's target
    cut: int = 0  # tokens dropped to fit max_length (the lint reports them)
    cut_end: int = 0  # of those, the completion's last tokens but its end token (the rest: the prompt's oldest)

    @property
    def n_supervised(self) -> int:
        """Tokens that carry a loss. In a causal LM nothing predicts the first token; a decoder target has no such gap."""
        return sum(label != IGNORE for label in (self.labels if self.seq2seq else self.labels[1:]))


def prompt_room(max_length: int, answer_tokens: int, seq2seq: bool = False) -> int:
    """The most prompt tokens training keeps, and so inference: `max_length` less the answer's room (the task's
    max_new_tokens, at most half of max_length). It does not depend on the completion, which inference lacks. An
    encoder reads the prompt alone: all of max_length."""
    return max_length if seq2seq else max_length - min(answer_tokens, max_length // 2)


def fit_prompt(ids: list[int], keep: int) -> list[int]:
    """At most `keep` tokens of a prompt: the first (BOS or the chat template's start) and the end, which holds the
    question and the answer cue; the oldest tokens after the first go."""
    return ids if len(ids) <= keep else ids[:1] + ids[len(ids) - max(keep, 1) + 1:]


class PromptFormat:
    """Renders pairs for one tokenizer. `chat=True` uses the tokenizer's chat template, shots as earlier turns."""

    def __init__(self, tokenizer, chat: bool, separator: str = "\n", seq2seq: bool = False, max_length: int | None = None,
                 context: int | None = None):
        self.tok = tokenizer
        self.chat = chat
        self.separator = separator
        self.seq2seq = seq2seq
        self.max_length = max_length  # training's train.max_length: inference cuts prompts as training did
        self.context = context  # the model's context length: a longer OpenAI conversation is refused, as OpenAI does

    # -- text ---------------------------------------------------------------------------------------------------
    def prompt_text(self, messages: list[dict], shots: list[Pair] = (), tools: list[dict] | None = None) -> str:
        """The prompt of `messages` (with k-shot examples); `tools`: an OpenAI record's, for its chat template."""
        if self.chat:
            convo = [m for m in messages[:-1]]  # system prompt and earlier turns come first, then the shots
            for shot in shots:
                convo += [shot.messages[-1], {"role": "assistant", "content": shot.completion}]
            convo.append(messages[-1])
            return self.tok.apply_chat_template(convo, tools=tools, add_generation_prompt=True, tokenize=False)
        parts = [self._plain(s.messages) + self.separator + s.completion for s in shots]
        # The prompt stops before the separator's trailing space, which the completion carries (" billing"), so the
        # answer is tokenized as it is in the shots and in ordinary text.
        return SHOT_DELIMITER.join(parts + [self._plain(messages) + self.separator.rstrip(" ")])

    def pair_prompt(self, pair: Pair) -> str:
        """The prompt of one pair as evaluation, `predict` and `chat` render it: its messages and its tools."""
        return self.prompt_text(pair.messages, tools=pair.tools)

    def completion_text(self, pair: Pair) -> str:
        """The completion as trained: in chat form up to and including the end-of-turn token."""
        if self.seq2seq:
            return pair.completion  # the decoder starts afresh: no separator to carry
        if not self.chat:
            return " " * (len(self.separator) - len(self.separator.rstrip(" "))) + pair.completion
        prompt = self.prompt_text(pair.messages)
        full = self.tok.apply_chat_template(pair.messages + [{"role": "assistant", "content": pair.completion}],
                                            tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite history (e.g. strip reasoning) are rendered per turn
            return pair.completion
        return full[len(prompt):].rstrip("\n ")

    @staticmethod
    def _plain(messages: list[dict]) -> str:
        # A system prompt and the final user turn read as plain text; earlier turns are labelled with their role.
        last = len(messages) - 1
        return "\n\n".join(m["content"] if m["role"] == "system" or i == last else f"{m['role']}: {m['content']}"
                           for i, m in enumerate(messages))

    # -- tokens -------------------------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        # Chat templates write their own BOS; plain prompts get the tokenizer's special tokens (e.g. Gemma's <bos>).
        return self.tok(text, add_special_tokens=not self.chat)["input_ids"]

    def encode(self, pair: Pair, max_length: int, answer_tokens: int) -> Encoded:
        """Prompt and completion tokenized apart (so generation sees exactly the training prompt), EOS appended.

        Past `max_length` the prompt is cut by `prompt_room` (the rule inference uses too, without the completion
        at hand), and the completion keeps what room is left, ending with its end token. An OpenAI conversation
        (`Pair.conversation`) is the same prompt and completion, with its earlier trained turns labelled in the
        prompt (and no label on a final turn of weight 0); longer than the model's context it is refused."""
        if pair.conversation:  # an OpenAI record training several turns, or with tools: turn by turn
            prompt_ids, prompt_labels, completion_ids = self._conversation_tokens(pair)
        else:
            prompt_ids = self.encode_prompt(self.prompt_text(pair.messages))
            prompt_labels = [IGNORE] * len(prompt_ids)
            completion_ids = self.tok(self.completion_text(pair), add_special_tokens=False)["input_ids"]
        end = self.end_ids()
        if pair.answer_weight and (not completion_ids or completion_ids[-1] not in end):
            completion_ids = completion_ids + [self.tok.eos_token_id]
        full = len(prompt_ids) + len(completion_ids)
        if self.context and full > self.context and "messages" in pair.record:  # OpenAI's own limit, and error
            raise InstructuneError(f"too many tokens: the conversation is {full:,} tokens, over the model's context "
                                   f"of {self.context:,}; split or shorten it", pair.where)
        keep = prompt_room(max_length, answer_tokens, self.seq2seq)
        prompt_ids, prompt_labels = fit_prompt(prompt_ids, keep), fit_prompt(prompt_labels, keep)  # the same cut
        # a decoder holds prompt and completion in one row; an encoder-decoder's target has a row of its own
        room = max_length if self.seq2seq else max_length - len(prompt_ids)
        cut_end = max(len(completion_ids) - room, 0)
        if cut_end:
            completion_ids = completion_ids[: max(room - 1, 0)] + completion_ids[-1:]
        cut = full - len(prompt_ids) - len(completion_ids)
        if self.seq2seq:  # the encoder reads the prompt, the decoder learns the whole completion
            return Encoded(prompt_ids, completion_ids, pair.where, seq2seq=True, cut=cut, cut_end=cut_end)
        answer = completion_ids if pair.answer_weight else [IGNORE] * len(completion_ids)
        return Encoded(prompt_ids + completion_ids, prompt_labels + answer, pair.where, cut=cut, cut_end=cut_end)

    def _conversation_tokens(self, pair: Pair) -> tuple[list[int], list[int], list[int]]:
        """The tokens before the final assistant turn with their labels (earlier trained turns are their own
        targets), and the final turn's tokens; each piece tokenized apart, as a prompt and its completion are."""
        features = conversation_features(pair)
        if not self.chat or self.seq2seq:
            raise InstructuneError(f"this record has {features}, which needs the model's chat template; "
                                   f"{'an encoder-decoder model' if self.seq2seq else 'the model has none'} trains one "
                                   "answer per record (give earlier assistant turns \"weight\": 0 and drop tools)",
                                   pair.where)
        pieces, answer = segments(self.tok, pair)
        ids, labels = [], []
        for i, (text, trained) in enumerate(pieces):
            piece = self.encode_prompt(text) if i == 0 else self.tok(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return ids, labels, self.tok(answer, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, text: str, answer_tokens: int) -> list[int]:
        """A prompt's tokens at inference, cut exactly as training cut it (`max_length` of the training this format
        renders for, None: the base model, nothing cut here)."""
        ids = self.encode_prompt(text)
        return ids if self.max_length is None else fit_prompt(ids, prompt_room(self.max_length, answer_tokens, self.seq2seq))

    def prompts_cut(self, prompts: list[str], answer_tokens: int) -> int:
        """How many of `prompts` inference cuts to fit training's `max_length` (for the report)."""
        if self.max_length is None:
            return 0
        room = prompt_room(self.max_length, answer_tokens, self.seq2seq)
        return sum(len(self.encode_prompt(p)) > room for p in prompts)

    def end_ids(self) -> set[int]:
        """Token ids that end a completion: EOS, and the chat template's end-of-turn token."""
        ids = {self.tok.eos_token_id}
        if self.chat:
            marker = self.tok.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                                                  tokenize=False)
            tail = marker[marker.rfind("y") + 1:].strip()
            if tail:
                tail_ids = self.tok(tail, add_special_tokens=False)["input_ids"]
                if tail_ids:
                    ids.add(tail_ids[0])
        return {i for i in ids if i is not None}

    def clean_generation(self, text: str) -> str:
        """Generated text up to where the answer ends (plain models run on into a next example)."""
        if not self.chat:
            text = text.split(SHOT_DELIMITER)[0]
        return text.strip()
