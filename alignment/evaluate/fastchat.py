"""FastChat's judge prompts (``fastchat/llm_judge/data/judge_prompts.jsonl``), read from the file the user names.

The prompt texts are never retyped here: ``judge.prompts`` points at FastChat's own file, one JSON object a line
with ``name``, ``type``, ``system_prompt``, ``prompt_template``, ``description``, ``category`` and
``output_format`` (Zheng et al. 2023, "Judging LLM-as-a-judge with MT-Bench and Chatbot Arena").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError


class JudgePromptError(InputError, ValueError):
    """A judge prompts file that cannot be used, naming the file, the line and the field, or the missing prompt."""


@dataclass(frozen=True)
class JudgePrompt:
    """One line of FastChat's judge_prompts.jsonl."""

    name: str
    type: str
    system_prompt: str
    prompt_template: str
    description: str
    category: str
    output_format: str


FIELDS = tuple(f.name for f in fields(JudgePrompt))


def json_objects(text: str, path: str | Path, error: type[Exception]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for every non-blank line of FastChat's JSON lines ``text`` (read from ``path``): ``where``
    names the file and the line (from 1) for the caller's own errors; a line that is not JSON, or not a JSON
    object, is an ``error`` naming them."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: a JSON object was expected, not {type(row).__name__}")
        yield where, row


def load_judge_prompts(path: str | Path) -> dict[str, JudgePrompt]:
    """Every prompt of FastChat's judge prompts file by name; a bad line is an error naming file, line and field.

    Every field must be present and a string: a missing template or system prompt would otherwise send the
    judge a different prompt than the protocol's, which no later check could tell.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise JudgePromptError(f"judge prompts file {path} does not exist (judge.prompts)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JudgePromptError(f"judge prompts file {path} cannot be read: {e}") from None
    prompts: dict[str, JudgePrompt] = {}
    for where, row in json_objects(text, path, JudgePromptError):
        for name in FIELDS:
            if name not in row:
                raise JudgePromptError(f"{where}: field {name!r} is missing")
            if not isinstance(row[name], str):
                raise JudgePromptError(f"{where}: field {name!r} must be a string, not {type(row[name]).__name__}")
        if row["name"] in prompts:
            raise JudgePromptError(f"{where}: field 'name': prompt {row['name']!r} appears twice")
        prompts[row["name"]] = JudgePrompt(**{name: row[name] for name in FIELDS})
    if not prompts:
        raise JudgePromptError(f"judge prompts file {path} holds no prompts")
    return prompts


def judge_prompt(prompts: dict[str, JudgePrompt], name: str, path: str | Path) -> JudgePrompt:
    """The prompt ``name`` a protocol needs, or an error naming it and the file that lacks it."""
    if name not in prompts:
        raise JudgePromptError(
            f"judge prompts file {path} has no prompt {name!r} (it has: {', '.join(sorted(prompts))})"
        )
    return prompts[name]
