"""The next-edit contract: Inception's `POST /v1/edit/completions`, typed, both ways.

Request: `{model, messages: [{role: "user", content}], max_tokens?, temperature?, top_p?,
presence_penalty?, stop?, stream?}` with exactly one user message and no streaming. `content`
holds Inception's documented sections, in this order (Inception's edit example, and the
clients of Zed and Continue):

    <|recently_viewed_code_snippets|>
    <|recently_viewed_code_snippet|>
    code_snippet_file_path: other.py
    ...about 20 lines...
    <|/recently_viewed_code_snippet|>
    <|/recently_viewed_code_snippets|>
    <|current_file_content|>
    current_file_path: main.py
    ...lines above...
    <|code_to_edit|>
    ...the editable region, with <|cursor|> at the cursor...
    <|/code_to_edit|>
    ...lines below...
    <|/current_file_content|>
    <|edit_diff_history|>
    --- main.py
    +++ main.py
    @@ -1,2 +1,2 @@ ... (unified diffs, oldest first: the most recent edit is last)
    <|/edit_diff_history|>

Answer: a chat completion whose `choices[0].message.content` is the editable region rewritten,
inside a fenced block (```` ``` ````); the text `None` means "no edit". `render` and `parse`
are exact inverses, so our service reads the same prompt Mercury reads; `region_of_answer`
reads the answer of either.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

import msgspec
from msgspec import UNSET, UnsetType

from diffusion_contract.wire import MAX_TOKENS_LIMIT, Usage, WireError

EDIT_PATH = "/v1/edit/completions"
MERCURY_EDIT_MODEL = "mercury-edit-2"

SNIPPETS_OPEN = "<|recently_viewed_code_snippets|>"
SNIPPETS_CLOSE = "<|/recently_viewed_code_snippets|>"
SNIPPET_OPEN = "<|recently_viewed_code_snippet|>"
SNIPPET_CLOSE = "<|/recently_viewed_code_snippet|>"
FILE_OPEN, FILE_CLOSE = "<|current_file_content|>", "<|/current_file_content|>"
REGION_OPEN, REGION_CLOSE = "<|code_to_edit|>", "<|/code_to_edit|>"
HISTORY_OPEN, HISTORY_CLOSE = "<|edit_diff_history|>", "<|/edit_diff_history|>"
CURSOR = "<|cursor|>"
SNIPPET_PATH = "code_snippet_file_path: "
FILE_PATH = "current_file_path: "
NO_EDIT = "None"  # Zed's client reads this answer as "no prediction"
TAGS = (SNIPPETS_OPEN, SNIPPETS_CLOSE, SNIPPET_OPEN, SNIPPET_CLOSE, FILE_OPEN, FILE_CLOSE,
        REGION_OPEN, REGION_CLOSE, HISTORY_OPEN, HISTORY_CLOSE, CURSOR)
FENCE = re.compile(r"^\s*```[^\n]*\n(.*?)\n?```\s*$", re.S)


@dataclass(frozen=True)
class EditPrompt:
    """Everything a next edit is predicted from. The file is `above + region + below`; the
    region is whole lines without its last line end (`below` starts with that "\\n", or is
    empty at the end of the file); `cursor` is an offset into `region`."""

    path: str
    above: str
    region: str
    cursor: int
    below: str
    history: tuple[str, ...] = ()  # unified diffs, oldest first
    snippets: tuple[tuple[str, str], ...] = ()  # (path, text), oldest first

    @property
    def text(self) -> str:
        return self.above + self.region + self.below


def render(prompt: EditPrompt) -> str:
    """The user message's content, as Inception documents it."""
    snippets = "".join(f"{SNIPPET_OPEN}\n{SNIPPET_PATH}{path}\n{text}\n{SNIPPET_CLOSE}\n"
                       for path, text in prompt.snippets)
    region = prompt.region[:prompt.cursor] + CURSOR + prompt.region[prompt.cursor:]
    history = "".join(diff if diff.endswith("\n") else diff + "\n" for diff in prompt.history)
    return (f"{SNIPPETS_OPEN}\n{snippets}{SNIPPETS_CLOSE}\n"
            f"{FILE_OPEN}\n{FILE_PATH}{prompt.path}\n{prompt.above}{REGION_OPEN}\n{region}\n"
            f"{REGION_CLOSE}{prompt.below}\n{FILE_CLOSE}\n"
            f"{HISTORY_OPEN}\n{history}{HISTORY_CLOSE}")


def _between(text: str, start: str, end: str, what: str) -> tuple[str, str]:
    """The text between the first `start` and the next `end`, and what follows `end`."""
    head = text.find(start)
    if head < 0:
        raise WireError(f"content: no {start} section ({what})")
    tail = text.find(end, head + len(start))
    if tail < 0:
        raise WireError(f"content: {start} is not closed by {end}")
    return text[head + len(start):tail], text[tail + len(end):]


def _strip_newline(text: str) -> str:
    return text[1:] if text.startswith("\n") else text


def parse(content: str) -> EditPrompt:
    """The inverse of `render`; raises WireError naming the section that is wrong."""
    snippets: list[tuple[str, str]] = []
    if SNIPPETS_OPEN in content:
        block, _ = _between(content, SNIPPETS_OPEN, SNIPPETS_CLOSE, "recently viewed")
        rest = block
        while SNIPPET_OPEN in rest:
            one, rest = _between(rest, SNIPPET_OPEN, SNIPPET_CLOSE, "snippet")
            one = _strip_newline(one).removesuffix("\n")
            first, _, body = one.partition("\n")
            path = first[len(SNIPPET_PATH):] if first.startswith(SNIPPET_PATH) else ""
            snippets.append((path, body if path else one))
    current, _ = _between(content, FILE_OPEN, FILE_CLOSE, "the current file")
    current = _strip_newline(current)
    path = ""
    if current.startswith(FILE_PATH):
        line, _, current = current.partition("\n")
        path = line[len(FILE_PATH):]
    if current.count(REGION_OPEN) != 1 or current.count(REGION_CLOSE) != 1:
        raise WireError(f"content: the current file needs one {REGION_OPEN} … {REGION_CLOSE}")
    above, _, rest = current.partition(REGION_OPEN)
    region, _, below = rest.partition(REGION_CLOSE)
    region = _strip_newline(region).removesuffix("\n")
    below = below.removesuffix("\n")
    if region.count(CURSOR) != 1:
        raise WireError(f"content: the region to edit needs exactly one {CURSOR}")
    cursor = region.index(CURSOR)
    region = region.replace(CURSOR, "")
    history: tuple[str, ...] = ()
    if HISTORY_OPEN in content:
        block, _ = _between(content, HISTORY_OPEN, HISTORY_CLOSE, "edit history")
        history = tuple(split_diffs(_strip_newline(block)))
    return EditPrompt(path, above.replace(CURSOR, ""), region, cursor,
                      below.replace(CURSOR, ""), history, tuple(snippets))


def split_diffs(block: str) -> list[str]:
    """The unified diffs of a history block, one per `--- ` header."""
    diffs: list[str] = []
    for line in block.splitlines(keepends=True):
        if line.startswith("--- ") or not diffs:
            diffs.append(line)
        else:
            diffs[-1] += line
    return [diff for diff in diffs if diff.strip()]


def region_of_answer(content: str | None) -> str | None:
    """The rewritten region in an answer (the fenced block, or the whole text); None when the
    answer says there is no edit."""
    if content is None:
        return None
    match = FENCE.match(content)
    text = match.group(1) if match else content.strip("\n")
    if text.strip() == NO_EDIT:
        return None
    lines = [line for line in text.replace(CURSOR, "").split("\n")
             if line.strip() not in (REGION_OPEN, REGION_CLOSE)]  # an echoed marker line
    return "\n".join(lines)


def fenced(region: str) -> str:
    return f"```\n{region}\n```"


# -- the HTTP bodies -----------------------------------------------------------------------------


class ChatMessage(msgspec.Struct):
    role: str
    content: str | None = None


class EditRequest(msgspec.Struct, kw_only=True):
    model: str = ""
    messages: list[ChatMessage]
    max_tokens: int | UnsetType = UNSET
    max_completion_tokens: int | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    presence_penalty: float | UnsetType = UNSET
    stop: str | list[str] | None | UnsetType = UNSET
    stream: bool | UnsetType = UNSET


def edit_request(model: str, prompt: EditPrompt, max_tokens: int | None = None) -> EditRequest:
    """The body a client sends: one user message, no streaming, no stop words (the region may
    hold blank lines and closing brackets)."""
    return EditRequest(model=model, messages=[ChatMessage("user", render(prompt))],
                       max_tokens=max_tokens if max_tokens is not None else UNSET,
                       stream=False)


def decode_edit(body: bytes) -> tuple[EditRequest, EditPrompt]:
    """The request and its prompt; raises WireError with what the client must change."""
    try:
        request = msgspec.json.decode(body, type=EditRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        raise WireError(f"bad request body: {error}") from error
    if request.stream is True:
        raise WireError("stream: streaming is not supported on the edit endpoint")
    if len(request.messages) != 1 or request.messages[0].role != "user":
        raise WireError("messages: send exactly one message, with role \"user\"")
    limit = request.max_tokens if request.max_tokens is not UNSET else request.max_completion_tokens
    if limit is not UNSET and not 1 <= limit <= MAX_TOKENS_LIMIT:
        raise WireError(f"max_tokens must lie in [1, {MAX_TOKENS_LIMIT}]")
    temperature = request.temperature
    if temperature is not UNSET and not 0.0 <= temperature <= 2.0:
        raise WireError("temperature must lie in [0, 2]")
    return request, parse(request.messages[0].content or "")


class EditChoice(msgspec.Struct):
    index: int = 0
    message: ChatMessage = msgspec.field(default_factory=lambda: ChatMessage("assistant"))
    finish_reason: str | None = "stop"


class EditResponse(msgspec.Struct):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[EditChoice] = msgspec.field(default_factory=list)
    usage: Usage = msgspec.field(default_factory=Usage)


def edit_response(model: str, region: str | None, prompt_tokens: int = 0,
                  completion_tokens: int = 0) -> EditResponse:
    content = NO_EDIT if region is None else fenced(region)
    return EditResponse(
        id=f"edit-{uuid.uuid4().hex[:24]}", created=int(time.time()), model=model,
        choices=[EditChoice(0, ChatMessage("assistant", content), "stop")],
        usage=Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens))


def decode_edit_response(body: bytes) -> str | None:
    """The rewritten region in an answer from Mercury or our service (None: no edit); raises
    msgspec errors for an answer that is not one."""
    response = msgspec.json.decode(body, type=EditResponse)
    if not response.choices:
        raise msgspec.ValidationError("the answer has no choices")
    return region_of_answer(response.choices[0].message.content)
