"""`instructune chat`: talk to a fine-tuned model in the terminal, its chat template (or one task's training
prompt) around every message, tokens printed as they are generated."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from .models import load_finetuned
from .predict import record_from_text

HELP = "Type a message. /reset starts a new conversation, /exit (or Ctrl-D) quits; Ctrl-C stops a reply."


def chat(model_dir: Path, task: str | None = None, max_new_tokens: int = 256, read=input, write=print) -> None:
    model, tokenizer, manifest = load_finetuned(model_dir)
    template = manifest.task_template(task) if task else None
    fmt = manifest.prompt_format(tokenizer, (template or manifest.task_template(manifest.task_names()[0])).separator)
    write(HELP)
    history: list[dict] = []
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("")
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            write("")
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            write("(new conversation)")
            continue
        if not text:
            continue
        if template is not None:  # every message through the task's training prompt, no memory across turns
            prompt = fmt.prompt_text(template.prompt_only(record_from_text(text, template, "message")))
        else:
            history.append({"role": "user", "content": text})
            prompt = _conversation(fmt, history)
        reply = _stream(model, fmt, prompt, max_new_tokens, write)
        if template is None:
            history.append({"role": "assistant", "content": reply})


def _conversation(fmt, history: list[dict]) -> str:
    if fmt.chat:
        return fmt.tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    return fmt.prompt_text(history)  # plain models: earlier turns labelled with their role


def _stream(model, fmt, prompt: str, max_new_tokens: int, write) -> str:
    """Generate greedily in a thread, printing text as it comes; Ctrl-C stops this reply only."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    stop = threading.Event()

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set()

    ids = torch.tensor([fmt.prompt_ids(prompt, max_new_tokens)], device=next(model.parameters()).device)  # as trained
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:  # the reply fits the context; a long conversation keeps its newest part
        max_new_tokens = max(1, min(max_new_tokens, limit // 2))
        ids = ids[:, -(limit - max_new_tokens):]
    streamer = TextIteratorStreamer(fmt.tok, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                  eos_token_id=sorted(fmt.end_ids()), pad_token_id=fmt.tok.pad_token_id, streamer=streamer,
                  stopping_criteria=StoppingCriteriaList([Stop()]), temperature=None, top_p=None, top_k=None)
    failed: list[BaseException] = []

    def run():
        try:
            model.generate(**kwargs)
        except Exception as e:  # shown in the chat, not as a thread's traceback
            failed.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    pieces: list[str] = []
    write("model> ", end="", flush=True)
    try:
        for piece in streamer:
            pieces.append(piece)
            write(piece, end="", flush=True)
    except KeyboardInterrupt:
        stop.set()
        write(" [stopped]", end="")
    worker.join()
    write("")
    if failed:
        write(f"(the model failed to answer: {type(failed[0]).__name__}: {failed[0]})")
    return fmt.clean_generation("".join(pieces))
