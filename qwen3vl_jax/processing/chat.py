"""Chat templates: load the checkpoint's jinja template (or the bundled Qwen3-VL Instruct one), render it as
transformers does, and find the assistant turns that SFT supervises."""

from __future__ import annotations

import functools
import json
import os
import re

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen3vl_jax.storage import read_json

_BUNDLED = os.path.join(os.path.dirname(__file__), "qwen3_vl_chat_template.jinja")
_ASSISTANT_TURN = re.compile(re.escape("<|im_start|>assistant\n") + r"(.*?" + re.escape("<|im_end|>") + ")", re.S)


def load_chat_template(path: str | None) -> str:
    """The template of a checkpoint dir (chat_template.jinja, chat_template.json or tokenizer_config.json), or
    the bundled Qwen3-VL Instruct template when `path` is None or has none."""
    if path:
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja_file):
            return _read(jinja_file)
        for name in ("chat_template.json", "tokenizer_config.json"):
            file = os.path.join(path, name)
            if os.path.exists(file):
                template = read_json(file).get("chat_template")
                if isinstance(template, str):
                    return template
    return _read(_BUNDLED)


def _read(file: str) -> str:
    with open(file) as f:
        return f.read()


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = False, **kwargs) -> str:
    """The prompt text with one `<|vision_start|><|image_pad|><|vision_end|>` (or `<|video_pad|>`) per image
    (video), as transformers' `apply_chat_template(tokenize=False)` renders it."""
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of every complete assistant reply: its content through the closing `<|im_end|>`."""
    return [m.span(1) for m in _ASSISTANT_TURN.finditer(text)]
