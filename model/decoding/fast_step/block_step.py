"""A block-diffusion forward on the fast step's layer loop, and its denoising step as a CUDA graph.

A block-diffusion family (`model.decoding.block`) runs a block's rows against the exact keys
and values of everything before it, under the block-causal mask: a denoising forward (nothing
kept) a few times a block, then one that writes the finished block. Through transformers each
is an eager forward with a DynamicCache and a mask built anew (some 1,200 kernel launches on an
8B network). `block_rows` runs it through `window_forward` instead: the cache's rows copied
into keys/values buffers of a bucketed size (CONTEXT_BUCKET), the block's rows written right
after them, an additive mask hiding the padding and keeping the block-causal rule inside the
block's rows. It computes what `model.decoding.block.run_rows` computes through transformers
(tests/test_block_step.py, both block families) and returns the same things: the rows' hidden
states and every layer's keys/values over 0..end-1 (views of fresh buffers, never written
again, so a caller may keep them as its cache).

`BlockSteps` runs the same forward on static shapes, one per (rows, bucketed context, fused),
captured on CUDA as a graph that later steps replay (DIFFUSION_LSP_BLOCK_GRAPHS, off by
default: `switchboard.block_graphs`). A shape's buffers remember which caches' leading rows
they hold, so a block's denoising steps and its write, each starting where the cache ends, copy
in only the rows the shape lacks; the kept keys/values come out as copies.
"""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from model.decoding.fast_step import graphs
from model.decoding.fast_step.graphs import QUERY_BUCKET, bucket, capture
from model.decoding.fast_step.layer import additive_mask, kv_buffers, layers_of, window_forward
from model.decoding.fast_step.switchboard import block_graphs, switches
from model.decoding.pinned import to_device, upload
from model.network.loader import LoadedModel

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, rows, head_dim)
MAX_GRAPH_ROWS = QUERY_BUCKET  # a block forward of more rows (a prompt's write) runs uncaptured
log = logging.getLogger(__name__)


def block_visible(start: int, count: int, rows: int, block_length: int,
                  device: torch.device) -> torch.Tensor:
    """(count, rows) bool: query start + i sees key j when j is a real row (j < start + count)
    and its block is not after the query's (Stable-DiffCoder's block-causal mask)."""
    queries = torch.arange(start, start + count, device=device) // block_length
    keys = torch.arange(rows, device=device)
    return (keys[None, :] < start + count) & (keys[None, :] // block_length <= queries[:, None])


def load_rows(keys: list[torch.Tensor], values: list[torch.Tensor], layers: Layers, begin: int,
              end: int) -> None:
    """Rows begin..end-1 of every layer's cached keys/values into the buffers' same rows."""
    if begin >= end:
        return
    for target_keys, target_values, (source_keys, source_values) in zip(keys, values, layers,
                                                                        strict=True):
        target_keys[..., begin:end, :].copy_(source_keys[..., begin:end, :])
        target_values[..., begin:end, :].copy_(source_values[..., begin:end, :])


@torch.inference_mode()
def block_rows(model: LoadedModel, layers: Layers, length: int, ids: torch.Tensor,
               block_length: int) -> tuple[torch.Tensor, Layers]:
    """`model.decoding.block.run_rows` on the layer loop: the tokens `ids` (Q,) at positions
    length.. against `layers` (the cache's rows 0..length-1; [] when empty), block-causal.
    Returns hidden states (Q, H) and every layer's keys/values over 0..end-1. Captured as a
    CUDA graph with DIFFUSION_LSP_BLOCK_GRAPHS, where the rows fit (MAX_GRAPH_ROWS)."""
    count = ids.numel()
    fused = switches(model).fused_projections
    if block_graphs(model) and count <= MAX_GRAPH_ROWS:
        return block_steps(model).run(layers, length, ids, block_length, fused)
    device, end = model.device, length + count
    keys, values = kv_buffers(model, 1, bucket(end))
    load_rows(keys, values, layers, 0, length)
    mask = additive_mask(block_visible(length, count, keys[0].shape[-2], block_length, device),
                         model.dtype)[None, None]  # (1, 1, Q, rows)
    hidden = window_forward(model.network, to_device(ids[None], device),
                            torch.arange(length, end, device=device)[None], keys, values,
                            torch.arange(length, end, device=device), mask, fused)
    return hidden[0], [(k[..., :end, :], v[..., :end, :]) for k, v in zip(keys, values,
                                                                          strict=True)]


class _Key(NamedTuple):
    width: int  # the block's rows
    rows: int  # buffer rows: the context and the block's rows, bucketed
    fused: bool


@dataclass
class _Shape:
    """The static buffers of one `_Key` and, on CUDA, its graph: rows [0, length) hold a
    cache, [length, length + W) the block's rows (`slots`), the rest padding (masked)."""

    key: _Key
    inputs: torch.Tensor  # (2, W): ids, then positions
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    slots: torch.Tensor  # (W,)
    mask: torch.Tensor  # (1, 1, W, rows)
    # caches whose leading rows the buffers hold: (their first layer's keys, weakly; rows)
    held: list[tuple[weakref.ref, int]] = field(default_factory=list)
    output: torch.Tensor | None = None  # (1, W, H)
    graph: torch.cuda.CUDAGraph | None = None
    uncaptured: bool = False  # its capture failed: it runs eagerly

    def rows_of(self, layers: Layers) -> int:
        """How many leading rows of `layers` the buffers hold (0: none known). A cache is
        known by its first layer's keys: cached keys and values are never written in place."""
        if not layers:
            return 0
        return max((rows for ref, rows in self.held if ref() is layers[0][0]), default=0)

    def wrote(self, start: int, given: Layers, length: int, made: Layers) -> None:
        """Rows from `start` on were just rewritten (`given`'s rows start..length-1 loaded,
        then the block's): what the buffers hold of other caches ends there; of `given`,
        rows up to `length`; of `made`, all of it."""
        first = given[0][0] if given else None
        held = [(ref, min(rows, start)) for ref, rows in self.held
                if ref() is not None and ref() is not first]
        if first is not None:
            held.append((weakref.ref(first), length))
        self.held = [*held, (weakref.ref(made[0][0]), made[0][0].shape[-2])]


class BlockSteps:
    """Block forwards through static shapes (`_Shape`), a CUDA graph each on CUDA, eager
    elsewhere (which tests use). Kept per model (`block_steps`); used from one thread."""

    def __init__(self, model: LoadedModel, graphs_on: bool | None = None) -> None:
        self.model = model
        self.graphs = model.device.type == "cuda" if graphs_on is None else graphs_on
        self._shapes: OrderedDict[_Key, _Shape] = OrderedDict()
        self._generation = 0
        self.captures = 0
        self.replays = 0
        self.loaded_rows = 0  # cache rows copied into shapes' buffers (what `held` saves)

    @torch.inference_mode()
    def run(self, layers: Layers, length: int, ids: torch.Tensor, block_length: int,
            fused: bool = False) -> tuple[torch.Tensor, Layers]:
        """`block_rows` on a static shape. Returns hidden states (Q, H) and the keys/values
        over 0..end-1, both copies (the buffers are the next run's)."""
        count = ids.numel()
        end = length + count
        layers_now = layers_of(self.model.network)
        if fused:
            layers_now.fuse()
        if layers_now.generation != self._generation:  # the weights moved: old graphs read
            self._shapes.clear()  # freed memory (as `graphs.HoleSteps`)
            self._generation = layers_now.generation
        shape = self._shape(_Key(count, bucket(end), fused))
        held = min(shape.rows_of(layers), length)
        load_rows(shape.keys, shape.values, layers, held, length)
        self.loaded_rows += length - held
        torch.arange(length, end, out=shape.slots)
        visible = block_visible(length, count, shape.key.rows, block_length, torch.device("cpu"))
        upload(shape.mask, additive_mask(visible, shape.mask.dtype)[None, None])
        upload(shape.inputs, torch.stack([ids, torch.arange(length, end)]))
        self._replay(shape)
        made = [(k[..., :end, :].clone(), v[..., :end, :].clone())
                for k, v in zip(shape.keys, shape.values, strict=True)]
        shape.wrote(held, layers, length, made)
        return shape.output[0].clone(), made

    @property
    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for shape in self._shapes.values()
                   for t in (*shape.keys, *shape.values))

    def _shape(self, key: _Key) -> _Shape:
        shape = self._shapes.get(key)
        if shape is None:
            device = self.model.device
            keys, values = kv_buffers(self.model, 1, key.rows)
            shape = _Shape(key, torch.zeros((2, key.width), dtype=torch.long, device=device),
                           keys, values, torch.zeros(key.width, dtype=torch.long, device=device),
                           torch.zeros((1, 1, key.width, key.rows), dtype=self.model.dtype,
                                       device=device))
            self._shapes[key] = shape
            while len(self._shapes) > 1 and (len(self._shapes) > graphs.MAX_GRAPHS
                                             or self.buffer_bytes > graphs.MAX_BUFFER_BYTES):
                self._shapes.popitem(last=False)
        self._shapes.move_to_end(key)
        return shape

    def _forward(self, shape: _Shape) -> torch.Tensor:
        return window_forward(self.model.network, shape.inputs[0:1], shape.inputs[1:2],
                              shape.keys, shape.values, shape.slots, shape.mask, shape.key.fused)

    def _replay(self, shape: _Shape) -> None:
        """The shape's graph replayed; captured on its first run (which runs it too); eager
        without graphs or once its capture failed."""
        if shape.graph is not None:
            shape.graph.replay()
            self.replays += 1
        elif not (self.graphs and not shape.uncaptured and self._capture(shape)):
            shape.output = self._forward(shape)

    def _capture(self, shape: _Shape) -> bool:
        """Capture the shape's forward (and run it); False, said once, where that fails."""
        try:
            shape.graph, shape.output = capture(lambda: self._forward(shape), self.model.device)
        except Exception as error:  # noqa: BLE001 - the step still runs, uncaptured
            log.warning("CUDA graph capture of a block step (%d rows over %d) failed; that "
                        "shape runs uncaptured: %s", shape.key.width, shape.key.rows,
                        str(error).splitlines()[0] if str(error) else type(error).__name__)
            shape.uncaptured = True
            return False
        self.captures += 1
        return True


def block_steps(model: LoadedModel) -> BlockSteps:
    """The model's BlockSteps, made on first use and kept on its network (copies of a
    LoadedModel share it, as they share `graphs.hole_steps`)."""
    network = model.network
    steps = getattr(network, "_diffusion_lsp_block_steps", None)
    if steps is None:
        steps = BlockSteps(model)
        network._diffusion_lsp_block_steps = steps
    return steps
