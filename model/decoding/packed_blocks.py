"""Several block-diffusion holes' denoising forwards as one packed pass.

An engine batch of block-diffusion holes (`model.decoding.block`) would otherwise run one
`block_pass` per hole: each a few rows (a block: 4 for Stable-DiffCoder) against its own exact
cache, so each one reads every weight for a handful of rows. Here the holes' block rows are
packed into one (1, N) sequence through `model.decoding.packed_step.packed_pass`: the dense
parts run once on all rows, attention per hole over its own cache and its own block. A block's
rows lie in one aligned block, where the block-causal mask lets every row see every row and
the whole cache: exactly the packed step's attention (its rows see their context and each
other). The rows a step reads are `block_pass`'s (`block.step_rows`: shifted for Fast-dLLM v2);
a step that writes the rows before its block (a shifted family's block's first token) runs
alone, as `block_pass`. Writes of finished blocks stay per hole (`block.write`: rows of several
blocks, under the block-causal mask), as in `block_pass`.

It computes what `block_pass` computes for each hole alone (tests/test_packed_blocks.py: the
same rows; greedy completions identical alone and in any batch).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.decoding import fast_step, packed_step
from model.decoding.block import block_pass, denoising_rows, step_rows, write, writes_first
from model.decoding.hole import HoleState
from model.decoding.pinned import to_device
from model.network.loader import LoadedModel


def packable(state: HoleState) -> bool:
    """Whether the state's step is a denoising forward (not the write that gives a shifted
    family's block its first token); its rows (`denoising_rows`) lie in one aligned block by
    construction, where every row sees every row."""
    begin, end = denoising_rows(state)
    return not writes_first(state) and end > begin


@torch.inference_mode()
def packed_block_pass(model: LoadedModel, states: Sequence[HoleState]) -> list[torch.Tensor]:
    """`block_pass` of every state, the packable ones in one packed pass. Returns the hidden
    states at each state's step positions (m_i, H)."""
    packed = [state for state in states if packable(state)]
    begins, segments = {}, []
    for state in packed:
        begin, end = denoising_rows(state)
        begins[id(state)] = begin
        write(model, state, begin)
        committed = state.committed
        segments.append(packed_step.Segment(
            state.sequence()[begin:end], torch.arange(begin, end),
            committed.layers if committed is not None and committed.layers else None))
    passed, _ = (packed_step.packed_pass(model, segments,
                                         fast_step.switches(model).fused_projections)
                 if segments else ([], []))
    hidden = dict(zip(map(id, packed), passed, strict=True))
    rows = []
    for state in states:
        if id(state) not in hidden:
            rows.append(block_pass(model, state))
            continue
        state.forwards += 1
        own = hidden[id(state)]
        rows.append(own[to_device(step_rows(state, begins[id(state)]), own.device)])
    return rows
