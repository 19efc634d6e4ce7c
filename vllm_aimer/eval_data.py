"""Documents for `vllm-aimer eval`: read and checked before any engine starts.

A `.txt` file holds one document per non-empty line. A `.jsonl` file holds one JSON
object per line: `{"text": ...}`, or an OpenAI request body, whose prompt text is taken:
a completion request's `prompt` (a string, or a list of strings: one document each) or a
chat request's `messages` (their contents joined by newlines).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vllm_aimer.errors import AimerError

__all__ = ["FORMATS", "load_documents"]

FORMATS = "a .txt file (one document per line) or a .jsonl file with a \"text\" field (or " \
          "OpenAI completion/chat request bodies)"


def _message_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return "\n".join(p for p in parts if isinstance(p, str)) or None
    return None


def _texts_of(obj: Any) -> list[str] | None:
    """The document text(s) of one JSONL record, or None if it has none."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("text"), str):
        return [obj["text"]]
    prompt = obj.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    messages = obj.get("messages")
    if isinstance(messages, list) and messages:
        texts = [_message_text(m.get("content")) for m in messages if isinstance(m, dict)]
        if texts and all(t is not None for t in texts):
            return ["\n".join(t for t in texts if t is not None)]
    return None


def load_documents(path: str | Path, limit: int | None = None) -> list[str]:
    """The non-empty documents of `path` (the first `limit` of them).

    Args:
        path: a .txt or .jsonl file (the suffix decides the format; see above).
        limit: keep only the first `limit` documents; None for all.

    Returns:
        The documents, in file order.

    Raises:
        AimerError: the file is missing, a directory, not .txt/.jsonl or not UTF-8
            text; a .jsonl line is not JSON or has no text; or no document is left.
    """
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise AimerError(f"data file {str(path)!r} {what}.", f"pass {FORMATS}.")
    if p.suffix not in (".txt", ".jsonl"):
        raise AimerError(f"data file {str(path)!r} has suffix {p.suffix or '(none)'!r}; "
                         "the format is taken from it.", f"pass {FORMATS}.")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise AimerError(f"data file {str(path)!r} cannot be read as UTF-8 text ({e}).",
                         f"pass {FORMATS}.") from None
    docs: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if p.suffix == ".txt":
            docs.append(line)
            continue
        try:
            texts = _texts_of(json.loads(line))
        except ValueError as e:
            raise AimerError(f"{p.name} line {number} is not valid JSON ({e}).",
                             "write one JSON object per line.") from None
        if texts is None:
            raise AimerError(f"{p.name} line {number} has no \"text\" string, completion "
                             "\"prompt\" or chat \"messages\".",
                             'write e.g. {"text": "..."} on every line.')
        docs += [t for t in texts if t.strip()]
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise AimerError(f"data file {str(path)!r} holds no documents (only empty lines).",
                         f"pass {FORMATS} with at least one non-empty document.")
    return docs
