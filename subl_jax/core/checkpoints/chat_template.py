"""Chat templates rendered the way transformers' `apply_chat_template(..., tokenize=False)` renders them.

The environment mirrors `transformers/utils/chat_template_utils.py` (5.x): an immutable sandbox with
`trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, a `{% generation %}` block tag, a `tojson` filter that
does not HTML-escape, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`. The template sees
`messages`, `tools`, `documents`, `add_generation_prompt` and the named special tokens (`bos_token`, `eos_token`, ...).
Messages are normalised as transformers does: keys whose value is None are dropped, values are copied to plain
JSON-like data, and reasoning given under any of `reasoning_content`/`thinking`/`reasoning` is copied to both
`reasoning_content` and `thinking`.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning is passed under; the first is the one chat templates read (as in transformers).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
  """A chat could not be rendered: no template, an empty or malformed conversation, or the template raised."""


class _GenerationBlock(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}`: marks assistant text for masks in transformers; here it just renders.

  Templates that use the tag (for assistant-token masks) would not even parse without it.
  """

  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller: Any) -> str:
    return caller()


class _TemplateDict:
  """`dict(...)` for templates, without exposing the real type's attributes to the sandbox."""

  def __call__(self, *args: Any, **kwargs: Any) -> dict:
    return dict(*args, **kwargs)

  def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """`namespace(...)` that refuses underscore-prefixed attributes, so templates cannot reach CPython internals."""

  def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name: str, value: Any) -> None:
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"chat templates cannot store attribute {name!r} on a namespace")


def _raise_exception(message: str) -> None:
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
  # jinja's own tojson HTML-escapes `<`, `>`, `&` and `'`, which would corrupt tool schemas in prompts.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
  """Compiles a chat template in the transformers-compatible sandbox (cached per template text)."""
  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
  """A fresh copy of `value` made of plain JSON-like types, so templates never touch (or mutate) caller objects."""
  if value is None or type(value) in (str, int, float, bool):
    return value
  if isinstance(value, str):
    return str.__str__(value)
  if isinstance(value, int):
    return int.__int__(value)
  if isinstance(value, float):
    return float.__float__(value)
  if isinstance(value, Mapping):
    return {_plain(k): _plain(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_plain(v) for v in value]
  if isinstance(value, tuple):
    return tuple(_plain(v) for v in value)
  if isinstance(value, np.generic):  # e.g. np.bool_(False) must not become a truthy placeholder string
    return _plain(value.item())
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  # transformers swaps other objects for an inert placeholder naming the type.
  return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Messages as transformers hands them to a template: None-valued keys dropped, reasoning fields aliased."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ChatTemplateError("cannot render an empty conversation; give at least one message")
  out = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise ChatTemplateError(f"chat messages must be dicts, got {message!r}")
    message = _plain({k: v for k, v in message.items() if v is not None})
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def render_chat_template(template: str | None, messages: Sequence[Mapping[str, Any]], *,
                         add_generation_prompt: bool, special_tokens: Mapping[str, str],
                         tools: list[dict] | None = None, documents: list[dict] | None = None,
                         **template_kwargs: Any) -> str:
  """Renders `messages` with `template`; `special_tokens` maps `bos_token` etc. to their text.

  `template_kwargs` override special tokens of the same name, as in transformers.
  """
  if not template:
    raise ChatTemplateError("this tokenizer has no chat template; cannot render a chat")
  compiled = compile_template(template)
  variables = {**{k: v for k, v in special_tokens.items() if v is not None}, **_plain(template_kwargs)}
  try:
    return compiled.render(messages=normalize_messages(messages), tools=_plain(tools), documents=_plain(documents),
                           add_generation_prompt=add_generation_prompt, **variables)
  except jinja2.exceptions.TemplateError as e:
    raise ChatTemplateError(f"chat template failed: {e}") from e
