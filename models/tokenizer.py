"""A checkpoint's tokenizer and chat template: text in, text out.

:class:`Tokenizer` reads a Hugging Face checkpoint directory's ``tokenizer.json`` with the
``tokenizers`` package (the library under transformers' fast tokenizers; an optional dependency,
``pip install -e '.[text]'``) and its ``tokenizer_config.json``: the special tokens and the chat
template. It encodes and decodes as transformers' ``PreTrainedTokenizerFast`` does:

* ``encode(text)`` runs the tokenizer's own post-processor (the BOS a Llama tokenizer adds);
* ``apply_chat_template(messages)`` renders the template with jinja2 as transformers does (a
  sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension,
  ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII, the special tokens as
  variables, the ``{% generation %}`` tag) and ``encode_chat`` encodes the result without adding
  special tokens again (the template writes them);
* ``decode(ids)`` skips special tokens and applies ``clean_up_tokenization_spaces`` when the
  config asks.

The chat template comes from ``chat_template.jinja``, else ``chat_template.json``, else
``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: ``default``).
A chat template is code from the checkpoint: it runs in jinja2's sandbox, never as Python.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from models.checkpoint_files import CheckpointDir

__all__ = ["Tokenizer", "generation_eos_token_ids"]

_INSTALL = "pip install -e '.[text]'"
_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# transformers' clean_up_tokenization: spaces before punctuation and English contractions
_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _json(files: CheckpointDir, name: str) -> dict[str, Any]:
    try:
        data = json.loads(files.read_text(name, what=name))
    except json.JSONDecodeError as e:
        raise ValueError(f"{files.op}: {name} in {files.path} is not JSON: {e}.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{files.op}: {name} in {files.path}: expected a JSON object, got {type(data).__name__}.")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def generation_eos_token_ids(path: str | os.PathLike) -> tuple[int, ...]:
    """The ``eos_token_id`` (one or several) of the checkpoint's ``generation_config.json``; ``()`` without one.

    transformers' ``generate`` stops on these (chat models list their end-of-turn token here).

    Raises:
      ValueError: the file is not a regular file inside the directory, not JSON, or its ids are not ints.
    """
    files = CheckpointDir(path, op="generation_config.json")
    if not files.exists("generation_config.json"):
        return ()
    eos = _json(files, "generation_config.json").get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"generation_config.json in {path}: expected eos_token_id to be token ids, got {eos!r}.")
    return tuple(ids)


class Tokenizer:
    """A checkpoint directory's ``tokenizer.json`` and chat template.

    Build it with :meth:`from_pretrained`.

    Attributes:
      special_tokens: ``bos_token``, ``eos_token``, ... as ``tokenizer_config.json`` names them.
      chat_template: the jinja2 source, or ``None``.
      clean_up_tokenization_spaces: whether :meth:`decode` removes spaces before punctuation.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        clean_up_tokenization_spaces: bool = False,
    ):
        self._tokenizer = tokenizer
        self.special_tokens = dict(special_tokens or {})
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._template: Any = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """The tokenizer of checkpoint directory ``path``.

        Raises:
          FileNotFoundError: ``path`` has no ``tokenizer.json``.
          ImportError: the ``tokenizers`` package is not installed (with the command that installs it).
          ValueError: a file is not a regular file inside the directory, is not JSON, or is not a
            tokenizer the ``tokenizers`` package reads.
        """
        files = CheckpointDir(path, op="Tokenizer.from_pretrained")
        if not files.exists("tokenizer.json"):
            raise FileNotFoundError(f"Tokenizer.from_pretrained: no tokenizer.json in {files.path}.")
        try:
            import tokenizers
        except ImportError:
            raise ImportError(f"Tokenizer.from_pretrained needs the tokenizers package: {_INSTALL}") from None
        text = files.read_text("tokenizer.json", what="tokenizer.json", max_bytes=256 << 20)
        try:
            tokenizer = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust library's own error type
            raise ValueError(f"Tokenizer.from_pretrained: cannot read tokenizer.json in {files.path}: {e}") from None
        config = _json(files, "tokenizer_config.json") if files.exists("tokenizer_config.json") else {}
        special = {k: t for k in _SPECIAL if (t := _token_text(config.get(k))) is not None}
        return cls(
            tokenizer,
            special_tokens=special,
            chat_template=_chat_template(files, config),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        )

    @property
    def vocab_size(self) -> int:
        """The ids this tokenizer can produce: ``0 .. vocab_size - 1`` (added tokens included)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with the tokenizer's BOS / template when ``add_special_tokens``)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected a str, got {type(text).__name__}.")
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of token ids (special tokens dropped by default)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat rendered as the model was trained to read it (``[{"role": ..., "content": ...}, ...]``).

        Raises:
          ValueError: the checkpoint has no chat template, or the template raised (``raise_exception``).
          ImportError: jinja2 is not installed.
        """
        if self.chat_template is None:
            raise ValueError(
                "Tokenizer.apply_chat_template: the checkpoint has no chat template (no chat_template.jinja and "
                "no chat_template in tokenizer_config.json); pass the prompt as plain text instead."
            )
        if self._template is None:
            self._template = _compile(self.chat_template)
        import jinja2

        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"Tokenizer.apply_chat_template: the chat template failed: {e}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (no special tokens added: the template writes them)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _chat_template(files: CheckpointDir, config: Mapping[str, Any]) -> str | None:
    if files.exists("chat_template.jinja"):
        return files.read_text("chat_template.jinja", what="chat_template.jinja")
    template = _json(files, "chat_template.json").get("chat_template") if files.exists("chat_template.json") else None
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{files.op}: the chat template in {files.path} is not a string: {template!r:.80}")
    return template


def _compile(source: str) -> Any:
    """The template compiled in jinja2's sandbox, with the environment transformers gives chat templates."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError(f"chat templates need jinja2: {_INSTALL}") from None
    from datetime import datetime

    class _Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's part for training): renders its body."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"Tokenizer.apply_chat_template: the chat template does not parse: {e}") from None
