"""What a hole looks like while it denoises: its text with every still-masked token drawn as
one placeholder character, and how many steps the whole fill is expected to take.

A diffusion answer exists as a whole from the first step and sharpens (Inception's Mercury
streams these states with `"diffusing": true`). These pure functions turn a hole's tokens into
that picture; the engine's per-step callback and the multi-hole sampler call them, and the
language server sends the result as `diffusion/preview` notifications.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from model.network.loader import LoadedModel

# One still-masked token. U+2591 LIGHT SHADE: visibly "noise", one column wide, and not a
# character code completions contain (docs/editor-features.md documents it for clients).
PLACEHOLDER = "\u2591"


def hole_preview(model: LoadedModel, tokens: Sequence[int], masked: Sequence[bool],
                 placeholder: str = PLACEHOLDER) -> str:
    """The hole as it stands: committed runs decoded, each masked position one `placeholder`;
    the text ends at the first committed end-of-hole token (the hole is closed there)."""
    ends = model.ids.ends
    parts: list[str] = []
    run: list[int] = []
    for token, is_masked in zip(tokens, masked, strict=True):
        if not is_masked and token in ends:
            break
        if is_masked:
            if run:
                parts.append(model.tokenizer.decode(run, skip_special_tokens=False))
                run = []
            parts.append(placeholder)
        else:
            run.append(token)
    if run:
        parts.append(model.tokenizer.decode(run, skip_special_tokens=False))
    return "".join(parts)


def expected_steps(steps: int, committed: int, masked: int, tokens_per_step: int | None = None,
                   budget: int | None = None) -> int:
    """The whole fill's expected number of steps after `steps` steps that committed
    `committed` tokens in all, with `masked` positions left. A step budget (`budget`) is exact;
    a fixed count per step divides the rest; under the threshold sampler the rate so far is
    assumed to hold (an estimate: the hole may close early, or grow)."""
    if budget is not None:
        return max(budget, steps)
    if masked <= 0:
        return steps
    rate = tokens_per_step or max(1.0, committed / max(1, steps))
    return steps + max(1, math.ceil(masked / rate))


def state_preview(model: LoadedModel, state) -> tuple[int, int, str]:
    """(step, expected steps, text) of a `model.decoding.hole.HoleState` after a step."""
    committed = sum(len(step.committed) for step in state.trace)
    masked = int(state.masked.sum())
    text = hole_preview(model, state.hole.tolist(), state.masked.tolist())
    return state.steps, expected_steps(state.steps, committed, masked,
                                       state.options.tokens_per_step, state.options.steps), text
