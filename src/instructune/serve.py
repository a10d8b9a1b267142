"""`instructune serve`: a fine-tuned run behind an OpenAI-compatible API, on transformers' serving engine (the one
`transformers serve` runs): the model in a process of its own, which generates with continuous batching (paged
attention, requests joining and leaving the running batch) or one request at a time, and transformers' handlers in
front of it (`serve_api.py`). What is ours: the run's model loaded as trained (`load_finetuned`: its chat template
and end-of-turn token), one model name for the run and one per task (`RUN/TASK`), the prompt each name reads, and
the bind rule: loopback unless an API key is set."""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.cli.serving.model_manager import EngineClient, ModelLoader
from transformers.cli.serving.utils import GenerationState

from .errors import InstructuneError
from .manifest import MANIFEST, Manifest
from .models import check_model_folder, hf_config, load_finetuned, load_tokenizer, trained_quantization
from .predict import record_from_text
from .runtime import say
from .serve_api import APIError, ChatHandler, TextHandler, build_app, message_text

CHAT_TOKENS = 256  # the answer budget of the run's own name (free chat) when a request sets none, as `chat`
CPU_BATCH_TOKENS = 512  # tokens per forward pass of continuous batching on a CPU


def check_bind(host: str, api_key: str | None) -> None:
    """Loopback needs nothing; any other address (the network, 0.0.0.0) needs --api-key."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise InstructuneError("expected an IP address (127.0.0.1, ::1, 0.0.0.0 ...) or localhost", "--host") from None
    if not loopback and not api_key:
        raise InstructuneError(f"serving on {host} lets other machines call the model: set --api-key (or "
                               "INSTRUCTUNE_API_KEY) so that only clients with the key are answered", "--host")
    if api_key is not None and len(api_key) < 8:
        raise InstructuneError("the API key is shorter than 8 characters", "--api-key")


def served_names(run: Path, manifest: Manifest, task: str | None) -> dict[str, str | None]:
    """Model name -> the task whose training prompt wraps its user message (None: the model's own chat template).
    The run's name is its folder's; `task` (--task) makes the run's name wrap messages in that task's prompt."""
    if task is not None:
        manifest.task_template(task)  # an unknown task is refused, naming --task
    run = Path(run).resolve()  # `serve .` names the run too
    name = run.parent.name if run.name == "model" and (run / MANIFEST).is_file() else run.name
    return {name: task, **{f"{name}/{t}": t for t in manifest.task_names()}}


class RunLoader(ModelLoader):
    """How transformers' engine loads the model: the run's fine-tuned model as `generate` loads it (the adapter
    merged, the saved tokenizer). It goes to the engine's process pickled: only the folder travels."""

    def __init__(self, model_dir: Path, tokenizer=None, config=None):  # ModelLoader's hub settings do not apply
        self.model_dir, self.tokenizer, self.config = str(model_dir), tokenizer, config

    def __getstate__(self) -> dict:
        return {"model_dir": self.model_dir, "tokenizer": None, "config": None}

    def load_model_and_processor(self, model_id: str, on_progress=None):
        from transformers.utils import logging as hf_logging

        # no "Loading weights" bar in the server's output (and no multiprocessing lock of tqdm's left behind when the
        # engine's process is stopped, which Python reports as a leak)
        hf_logging.disable_progress_bar()
        model, tokenizer, manifest = load_finetuned(Path(self.model_dir))
        # Continuous batching builds its samplers once, from the model's config, and only for settings that differ
        # from the neutral ones: with these, each request sets its own temperature, top-k and top-p, and a greedy
        # request (the default, see serve_api) is top-k 1. One request at a time, `generate` takes them per call.
        model.generation_config.update(do_sample=True, temperature=0.7, top_k=50, top_p=0.95,
                                       pad_token_id=tokenizer.pad_token_id)
        return model, tokenizer

    def load_config(self, model_id: str):
        return self.config, GenerationConfig()

    def load_processor(self, model_id: str):
        return self.tokenizer


class ServedModel(EngineClient):
    """One model name. All names share the run's model, loaded once in the engine's process, each through a
    connection of its own (as transformers' API servers share it), so that every answer carries the name asked."""

    def __init__(self, name: str, loader: RunLoader, state: GenerationState, connection: tuple, manifest: Manifest,
                 task: str | None):
        super().__init__(name, loader, state, connection=connection)
        self.template = manifest.task_template(task) if task else None
        separator = (self.template or manifest.task_template(manifest.task_names()[0])).separator
        self.fmt = manifest.prompt_format(loader.tokenizer, separator)
        self.generation_config = GenerationConfig(
            max_new_tokens=self.template.max_new_tokens if self.template else CHAT_TOKENS, do_sample=False,
            eos_token_id=sorted(self.fmt.end_ids()), pad_token_id=loader.tokenizer.pad_token_id)
        self.context = getattr(loader.config.get_text_config(), "max_position_embeddings", None)
        self.created = int(Path(loader.model_dir, MANIFEST).stat().st_mtime)

    def prompt_ids(self, body: dict, chat: bool, new_tokens: int) -> list[int]:
        """A task's name: the last user message (or the prompt) as the task's input, in its training prompt, cut as
        training cut it: the tokens `instructune generate` gives the model. The run's name, /v1/completions: the
        text as it is; chat with a run trained without a chat template: its plain prompt (`PromptFormat`). (Chat with
        a chat template: transformers' own rendering, `serve_api.Served.prepare`.)"""
        if self.template is not None:
            if chat and body["messages"][-1]["role"] != "user":
                raise APIError(400, "A task model answers the last message, which must be the user's.", "messages")
            text = message_text(body["messages"][-1]) if chat else body["prompt"]
            record = record_from_text(text, self.template, "messages[-1].content" if chat else "prompt")
            return self.fmt.prompt_ids(self.fmt.prompt_text(self.template.prompt_only(record)), new_tokens)
        if not chat:
            return self.fmt.tok(body["prompt"], add_special_tokens=True)["input_ids"]
        messages = [{"role": m["role"], "content": message_text(m)} for m in body["messages"]]
        return self.fmt.encode_prompt(self.fmt.prompt_text(messages))

    def fit(self, prompt: int, new_tokens: int, strict: bool, param: str) -> int:
        """The answer budget that fits the model's context with the prompt: asked for (or a task's), it must fit
        whole, as `generate` refuses; the run's own default shrinks to what is left."""
        if self.context is None or prompt + new_tokens <= self.context:
            return new_tokens
        if not strict and prompt < self.context:
            return self.context - prompt
        raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you requested "
                            f"{prompt + new_tokens} tokens ({prompt} in the {param}, {new_tokens} in the completion). "
                            f"Please reduce the length of the {param} or completion.", param, "context_length_exceeded")

    def inputs(self, ids: list[int]) -> dict:
        """As transformers' runners take a prompt: token lists for continuous batching, else a batch of one."""
        if self.use_cb:
            return {"input_ids": ids}
        tensor = torch.tensor([ids])
        return {"input_ids": tensor, "attention_mask": torch.ones_like(tensor)}

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict):
        text, prompt, ids = await super().generate_non_streaming(inputs, generation_kwargs)
        return self.fmt.clean_generation(text), prompt, ids  # as `generate` returns it


def batching(config, on_gpu: bool) -> ContinuousBatchingConfig:
    """transformers' defaults on a GPU (the KV cache sized from free memory); on a CPU they would take 60 % of the
    machine's memory and minutes of warm-up: a cache for 32 requests of up to 2048 tokens instead."""
    if on_gpu:
        return ContinuousBatchingConfig()
    page = ContinuousBatchingConfig().page_size
    longest = min(getattr(config.get_text_config(), "max_position_embeddings", None) or 2048, 2048)
    return ContinuousBatchingConfig(num_blocks=32 * -(-longest // page), max_batch_tokens=CPU_BATCH_TOKENS)


def read_run(run: Path):
    """The run's model folder, manifest, tokenizer and config, checked before anything starts."""
    run = Path(run)
    model_dir = run / "model" if (run / "model" / MANIFEST).is_file() else run
    if not (model_dir / MANIFEST).is_file():
        raise InstructuneError(f"no {MANIFEST} here: expected a run folder or its model/ folder written by "
                               "`instructune train`", str(run))
    manifest = Manifest.read(model_dir)
    if manifest.encoder_decoder:
        raise InstructuneError("serve runs decoder-only models; this run's model is an encoder-decoder (T5): use "
                               "`instructune predict` or `generate`", str(run))
    check_model_folder(model_dir)
    source = str(model_dir) if (model_dir / "config.json").is_file() else manifest.base_model
    return model_dir, manifest, load_tokenizer(str(model_dir), manifest.model_cfg()), \
        hf_config(source or str(model_dir), manifest.model_cfg())


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads: a port in use is refused at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InstructuneError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port",
                               "--port") from None
    return sock


def serve(run: Path, task: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          continuous_batching: bool = True, log_level: str = "info") -> None:
    """Serve the run until Ctrl-C or SIGTERM; the engine's process stops with the server."""
    check_bind(host, api_key)
    model_dir, manifest, tokenizer, config = read_run(run)
    names = served_names(Path(run), manifest, task)
    continuous_batching = continuous_batching and trained_quantization(str(model_dir)) is None  # 4-bit: one at a time
    state = GenerationState(continuous_batching=continuous_batching,
                            cb_config=batching(config, torch.cuda.is_available()) if continuous_batching else None)
    loader = RunLoader(model_dir, tokenizer, config)
    sock = bind(host, port)
    say(f"loading {model_dir} ...")
    try:
        process, requests, results = EngineClient.start_process(next(iter(names)), loader, state, api_servers=len(names))
    except RuntimeError as e:
        sock.close()
        raise InstructuneError(f"the model could not be loaded: {e}", str(model_dir)) from None
    try:
        served = {name: ServedModel(name, loader, state, (requests, results[i], i), manifest, t)
                  for i, (name, t) in enumerate(names.items())}
        app = build_app(served, ChatHandler(served, state), TextHandler(served, state), api_key)
        _run(app, sock, process, host, port, names, continuous_batching, log_level)
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
        sock.close()


def _run(app, sock, process, host, port, names, continuous_batching, log_level) -> None:
    import uvicorn

    async def stop_if_the_engine_died() -> None:
        if not process.is_alive():
            server.should_exit = True

    # on Ctrl-C, answers under way get 5 s to finish (one whose engine died would never end)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, callback_notify=stop_if_the_engine_died,
                                           timeout_notify=2, timeout_graceful_shutdown=5))
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    how = "continuous batching" if continuous_batching else "one request at a time"
    say(f"serving {', '.join(names)} at {url} ({how}); Ctrl-C stops")
    started = time.monotonic()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stopped on the signal, then raised it again for us: a normal stop
        pass
    if not process.is_alive() and process.exitcode not in (0, None, -15):
        raise RuntimeError(f"the model's process stopped (exit code {process.exitcode}) after "
                           f"{time.monotonic() - started:.0f} s; see the messages above")
    say("stopped")
