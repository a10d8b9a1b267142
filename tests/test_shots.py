"""k-shot selection: seeded and nested draws from the training split, the context-length fallback, k = 0."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from instructune.prompts import Pair, PromptFormat
from instructune.prompts.shots import kshot_prompts, shots_for

# Training message i repeats a phrase REPS[i] times, so by length the shortest three are 3 (0), 1 (1) and 5 (2).
REPS = [6, 1, 4, 0, 5, 2, 7, 3]
LABELS = ["billing", "delivery", "technical", "account"] * 2
TRAIN = [Pair(messages=[{"role": "user", "content": f"Message {i}: " + "the parcel is late " * r}],
              completion=LABELS[i]) for i, r in enumerate(REPS)]
TEST = [Pair(messages=[{"role": "user", "content": f"Test message {i}: the app crashes"}], completion="technical")
        for i in range(4)]
SHORTEST_3 = [3, 1, 5]


def _idx(shots):
    # identity, not equality: a shot must be the training pair itself
    return [next(j for j, t in enumerate(TRAIN) if t is s) for s in shots]


@pytest.fixture(scope="module")
def fmt(tiny_model):
    return PromptFormat(AutoTokenizer.from_pretrained(tiny_model), chat=True)


def _tokens(fmt, i, shots):
    return len(fmt.encode_prompt(fmt.prompt_text(TEST[i].messages, [TRAIN[j] for j in shots])))


def test_the_draw_is_seeded_by_seed_task_and_index():
    # Computed once with random.Random("seed/task/index").sample; Python keeps that stream stable across versions.
    draws = [_idx(shots_for(TRAIN, i, 3, 0, "tickets")) for i in range(4)]
    assert draws == [[3, 7, 1], [6, 2, 4], [4, 2, 0], [0, 6, 7]]
    assert _idx(shots_for(TRAIN, 0, 3, 1, "tickets")) == [5, 4, 6]  # another seed
    assert _idx(shots_for(TRAIN, 0, 3, 0, "other")) == [0, 4, 6]  # another task
    # the same (seed, task, index) gives the same draw however often and in whatever order it is asked
    again = [_idx(shots_for(TRAIN, i, 3, 0, "tickets")) for i in reversed(range(4))]
    assert again[::-1] == [_idx(shots_for(TRAIN, i, 3, 0, "tickets")) for i in range(4)]


def test_shots_are_distinct_training_pairs():
    for seed in range(5):
        for i in range(4):
            shots = shots_for(TRAIN, i, 5, seed, "tickets")
            idx = _idx(shots)  # raises StopIteration if a shot is not one of the training pairs
            assert len(idx) == 5 and len(set(idx)) == 5
            assert not any(s is t for s in shots for t in TEST)


def test_the_one_shot_example_is_the_first_of_every_k_shot_draw():
    for seed in range(3):
        for i in range(10):
            one = _idx(shots_for(TRAIN, i, 1, seed, "tickets"))
            for k in range(2, 9):
                assert _idx(shots_for(TRAIN, i, k, seed, "tickets"))[:1] == one, (seed, i, k)
    # the prompts nest the same way: the 1-shot prompt's example opens the 2-shot prompt
    assert [_idx(shots_for(TRAIN, 0, k, 0, "tickets")) for k in (1, 2, 3)] == [[3], [3, 7], [3, 7, 1]]


def test_kshot_prompts_show_the_drawn_shots_when_they_fit(fmt):
    prompts = kshot_prompts(fmt, TEST, TRAIN, 2, 0, "tickets", room=4096)
    draws = [[3, 7], [6, 2], [4, 2], [0, 6]]
    assert prompts == [fmt.prompt_text(TEST[i].messages, [TRAIN[j] for j in d]) for i, d in enumerate(draws)]
    assert prompts[0].index("Message 3:") < prompts[0].index("Message 7:") < prompts[0].index("Test message 0:")
    assert prompts[0].count("<|im_start|>assistant\naccount<|im_end|>") == 2  # both shots' answers (3 and 7)


def test_a_prompt_that_does_not_fit_falls_back_to_the_k_shortest_training_examples(fmt):
    drawn = [[3, 7, 1], [6, 2, 4], [4, 2, 0], [0, 6, 7]]
    sizes = [_tokens(fmt, i, d) for i, d in enumerate(drawn)]
    assert sizes == [149, 259, 249, 258] and _tokens(fmt, 0, SHORTEST_3) == 140
    # room 200: test prompt 0 (149 tokens) keeps its draw; the other three show examples 3, 1, 5, shortest first
    prompts = kshot_prompts(fmt, TEST, TRAIN, 3, 0, "tickets", room=200)
    expected = [drawn[0], SHORTEST_3, SHORTEST_3, SHORTEST_3]
    assert prompts == [fmt.prompt_text(TEST[i].messages, [TRAIN[j] for j in e]) for i, e in enumerate(expected)]
    # the limit is inclusive: exactly `room` tokens fit, one more does not
    assert kshot_prompts(fmt, TEST[:1], TRAIN, 3, 0, "tickets", room=149) == prompts[:1]
    assert kshot_prompts(fmt, TEST[:1], TRAIN, 3, 0, "tickets", room=148) == \
        [fmt.prompt_text(TEST[0].messages, [TRAIN[j] for j in SHORTEST_3])]


def test_zero_shots_is_the_bare_prompt_even_without_room(fmt):
    prompts = kshot_prompts(fmt, TEST, TRAIN, 0, 0, "tickets", room=1)
    assert prompts == [f"<|im_start|>user\nTest message {i}: the app crashes<|im_end|>\n<|im_start|>assistant\n"
                       for i in range(4)]
    assert shots_for(TRAIN, 0, 0, 0, "tickets") == []
