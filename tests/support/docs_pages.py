"""The code blocks of a documentation page, and how their shown output is compared.

A page (``README.md`` or ``docs/*.rst``) states for every block whether it runs:

- a block captioned with a file name (``.. code-block:: python`` with ``:caption:
  my_models.py``) is part of that file: the page's blocks with that caption, in order, make it
  up, and it is written before any block runs;
- ``python`` blocks run in order, in one namespace per page;
- ``bash`` blocks run in ``bash -e`` in the page's folder, one after the other;
- a ``text`` block that follows a runnable block with no prose between them is that block's
  output, compared with what it printed (stdout; for bash, stderr too); whitespace and line
  breaks are not compared, ``...`` (a word of its own) stands for any text, and numbers must
  be equal unless a comment before the output block states a tolerance,
  ``.. doctest: tolerance 0.05`` (absolute) or ``tolerance 2%`` (relative); in Markdown,
  ``<!-- doctest: tolerance 0.05 -->``;
- every other block is shown only: ``text`` elsewhere (synopses, messages), ``shell`` for
  commands a test does not run (installs, downloads, GPUs, hours of training), ``math``;
- a bare ``::`` literal block, or a code block without a language, is refused: its page must
  say whether it runs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

RUNNABLE = ("python", "bash")
OUTPUT = "text"

_NUMBER = r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w.])|[-+]?inf\b|nan\b"
_NUMBER_TOKEN = re.compile(r"(?<![\w.])(?:" + _NUMBER + r")", re.ASCII)
_CODE_DIRECTIVE = re.compile(r"^(\s*)\.\. (?:code-block|code|sourcecode)::\s*(\S*)\s*$")
_OTHER_DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w:-]+::")
_COMMENT = re.compile(r"^\s*(?:\.\. |<!--\s*)doctest:\s*(.*?)\s*(?:-->)?\s*$")
_FILE_NAME = re.compile(r"[\w.-]+(?:/[\w.-]+)*\.\w+")
_FENCE = re.compile(r"^```\s*(\S*)\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the block's first line of code
    language: str
    code: str
    caption: str | None = None
    options: dict = field(default_factory=dict)  # from a ``doctest:`` comment before it
    output_of: int | None = None  # index of the block this one is the output of


class PageError(ValueError):
    """A page that does not say whether one of its blocks runs."""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _dedent(lines: list[str]) -> str:
    body = [line for line in lines if line.strip()]
    cut = min((_indent(line) for line in body), default=0)
    return "\n".join(line[cut:] for line in lines).strip("\n") + "\n"


def _parse_options(text: str) -> dict:
    match = re.fullmatch(r"tolerance\s+([0-9.eE+-]+)(%?)", text)
    if not match:
        raise PageError(
            f"unknown doctest comment {text!r}: expected 'tolerance X' or 'tolerance X%'"
        )
    value = float(match.group(1))
    return {"rtol": value / 100} if match.group(2) else {"atol": value}


def _link_outputs(blocks: list[Block], prose_before: list[bool]) -> list[Block]:
    for index, block in enumerate(blocks):
        if (
            block.language == OUTPUT
            and index > 0
            and not prose_before[index]
            and blocks[index - 1].language in RUNNABLE
            and blocks[index - 1].caption is None
        ):
            block.output_of = index - 1
        elif block.options:
            raise PageError(
                f"line {block.line}: a doctest comment belongs before an output "
                "block (a text block right after a python or bash block)"
            )
    return blocks


def parse_rst(text: str) -> list[Block]:
    lines = text.split("\n")
    blocks: list[Block] = []
    prose_before: list[bool] = []
    prose, options, i = False, {}, 0
    while i < len(lines):
        line = lines[i]
        comment = _COMMENT.match(line)
        directive = _CODE_DIRECTIVE.match(line)
        literal = line.rstrip().endswith("::") and not _OTHER_DIRECTIVE.match(line)
        if comment:
            options = _parse_options(comment.group(1))
            i += 1
            continue
        if not (directive or literal):
            prose = prose or bool(line.strip())
            i += 1
            continue
        if literal:
            raise PageError(
                f"line {i + 1}: a bare '::' literal block; use '.. code-block:: "
                "LANGUAGE' (python or bash to run it, text or shell to show it)"
            )
        base, language = _indent(line), directive.group(2)
        if not language:
            raise PageError(f"line {i + 1}: a code block without a language")
        i += 1
        caption = None
        while i < len(lines) and lines[i].strip().startswith(":") and _indent(lines[i]) > base:
            name, _, value = lines[i].strip()[1:].partition(":")
            if name == "caption" and _FILE_NAME.fullmatch(value.strip()):
                caption = value.strip()
            i += 1
        start, body = i, []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
            body.append(lines[i])
            i += 1
        first = start + next((k for k, b in enumerate(body) if b.strip()), 0)
        blocks.append(Block(first + 1, language, _dedent(body), caption, options))
        prose_before.append(prose)
        prose, options = False, {}
    return _link_outputs(blocks, prose_before)


def parse_markdown(text: str) -> list[Block]:
    lines = text.split("\n")
    blocks: list[Block] = []
    prose_before: list[bool] = []
    prose, options, i = False, {}, 0
    while i < len(lines):
        comment, fence = _COMMENT.match(lines[i]), _FENCE.match(lines[i])
        if comment:
            options = _parse_options(comment.group(1))
        elif fence:
            if not fence.group(1):
                raise PageError(f"line {i + 1}: a code block without a language")
            start = i + 1
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                i += 1
            blocks.append(Block(start + 1, fence.group(1), _dedent(lines[start:i]), None, options))
            prose_before.append(prose)
            prose, options = False, {}
        else:
            prose = prose or bool(lines[i].strip())
        i += 1
    return _link_outputs(blocks, prose_before)


def parse_page(path) -> list[Block]:
    text = Path(path).read_text(encoding="utf-8")
    return parse_markdown(text) if str(path).endswith(".md") else parse_rst(text)


def _pattern(expected: str) -> tuple[re.Pattern, list[str]]:
    """A regular expression for ``expected`` with a group per number, and those numbers."""
    parts, numbers, position = [], [], 0
    words = " ".join(expected.split())
    for match in _NUMBER_TOKEN.finditer(words):
        parts.append(re.escape(words[position : match.start()]))
        parts.append("(" + _NUMBER + ")")
        numbers.append(match.group())
        position = match.end()
    parts.append(re.escape(words[position:]))
    source = "".join(parts)
    source = re.sub(r"(?:^|(?<=\\ ))\\\.\\\.\\\.(?=\\ |$)", ".*?", source)  # `...` words
    return re.compile(source, re.ASCII | re.S), numbers


def _close(got: str, shown: str, atol: float, rtol: float) -> bool:
    a, b = float(got), float(shown)
    if math.isinf(a) or math.isinf(b) or math.isnan(a) or math.isnan(b):
        return got.lstrip("+") == shown.lstrip("+")
    return abs(a - b) <= atol + rtol * abs(b)


def compare_output(printed: str, shown: str, atol: float = 0.0, rtol: float = 0.0) -> str | None:
    """None when ``printed`` matches the ``shown`` output, else what differs."""
    pattern, numbers = _pattern(shown)
    words = " ".join(printed.split())
    match = pattern.fullmatch(words)
    if match is None:
        return "the text differs"
    for got, want in zip(match.groups(), numbers):
        if not _close(got, want, atol, rtol):
            return f"{got} where the page shows {want} (tolerance: atol {atol}, rtol {rtol})"
    return None
