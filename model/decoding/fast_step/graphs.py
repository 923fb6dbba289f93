"""Fixed-shape passes: a hole's step (its window against its cached context, the context
padded to a bucket of CONTEXT_BUCKET rows), with DIFFUSION_LSP_PACKED_GRAPHS several holes'
hole-only steps as one bucketed batch (`HoleSteps.run_packed`), and with
DIFFUSION_LSP_GRAPH_PASSES full and partial passes, each captured once per shape as a CUDA
graph that later steps replay (`HoleSteps`, kept per model: `hole_steps`), and `rows_pass`,
the full or partial pass that runs captured where it may and through the layer loop elsewhere.

A packed batch's bucket (`packed_bucket`): its holes rounded up to a power of two, its widest
window up to a multiple of WINDOW_BUCKET rows, its longest context up to CONTEXT_BUCKET's. Each
hole is one row of a (holes, window) batch against its own (holes, kv_heads, context + window,
D) keys and values: its window padded with masked rows (their outputs dropped), its context
with masked keys, a spare hole's rows seeing only themselves. So a batch's shape changes only
when it crosses a bucket, not at every join and leave, and one graph serves the bucket; a
hole's context is copied into the buffers once, when it takes a seat there, and stays while it
runs (`_seat`). Graphs and buffers are bounded together with the single hole's (MAX_GRAPHS,
MAX_BUFFER_BYTES); a bucket whose buffers alone are over MAX_PACKED_BYTES is not captured (its
batch runs as the uncaptured packed pass, `model.decoding.packed_step`)."""

from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch

from model.decoding.fast_step.layer import (
    additive_mask,
    kv_buffers,
    layers_of,
    window_forward,
)
from model.decoding.fast_step.switchboard import switches
from model.decoding.pinned import to_device, upload
from model.decoding.scoring import Head, greedy_scores
from model.network.loader import LoadedModel

CONTEXT_BUCKET = 256  # context rows are padded up to a multiple of this: few graphs to capture
QUERY_BUCKET = 64  # a captured pass's queries are padded up to a multiple of this ...
MAX_PASS_ROWS = 1024  # ... and it is captured only when queries and context fit in this
MAX_GRAPHS = 16  # captured shapes kept per model (least recently used dropped) ...
MAX_BUFFER_BYTES = 2 << 30  # ... and at most this much in their keys/values buffers
MAX_PACKED_BYTES = MAX_BUFFER_BYTES // 2  # one packed bucket's buffers, at most
WINDOW_BUCKET = 16  # a packed batch's window rows are padded up to a multiple of this
WARM_UP_RUNS = 2  # eager runs on a side stream before a capture (cuBLAS picks its kernels)
T = TypeVar("T")
log = logging.getLogger(__name__)


def round_up(rows: int, multiple: int) -> int:
    """`rows` rounded up to a multiple of `multiple`, at least one multiple."""
    return max(multiple, -(-rows // multiple) * multiple)


def bucket(rows: int) -> int:
    """Context rows rounded up to the next multiple of CONTEXT_BUCKET (at least one bucket)."""
    return round_up(rows, CONTEXT_BUCKET)


def packed_bucket(holes: int, width: int, rows: int) -> tuple[int, int, int]:
    """(holes, window rows, context rows) of the bucket a packed batch of `holes` hole-only
    steps runs in, its widest window `width` rows, its longest context `rows` (see the
    module's docstring)."""
    return 1 << max(holes - 1, 1).bit_length(), round_up(width, WINDOW_BUCKET), bucket(rows)


def pass_shape(queries: int, reused: int) -> tuple[int, int] | None:
    """(padded queries, context rows) of a captured pass of `queries` new tokens against
    `reused` rows (0: a full pass); None when that is over MAX_PASS_ROWS (it runs uncaptured)."""
    padded = round_up(queries, QUERY_BUCKET)
    context = bucket(reused) if reused else 0
    return (padded, context) if padded + context <= MAX_PASS_ROWS else None


@torch.inference_mode()
def rows_pass(model: LoadedModel, ids: torch.Tensor, positions: torch.Tensor,
              past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
              ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One pass of tokens `ids` (Q,) at sequence `positions` (Q,) against `past` rows (per
    layer (1, kv_heads, R, D); None: none), every row seeing every row: the sampler's full
    pass (no past) and the document cache's partial pass (model.decoding.prompt_cache), without
    transformers' per-call masks and caches. Returns hidden states (Q, H) and every layer's
    keys and values, the past's R rows then the Q new ones. With DIFFUSION_LSP_GRAPH_PASSES
    these are views of a captured pass's buffers (`HoleSteps.pass_rows`), valid until its next
    run: callers copy what they keep."""
    count = ids.numel()
    device = model.device
    reused = 0 if past is None else past[0][0].shape[-2]
    on = switches(model)
    if on.graph_passes and pass_shape(count, reused) is not None:
        return hole_steps(model).pass_rows(ids, positions, past, on.fused_projections)
    if past is None:
        keys, values = kv_buffers(model, 1, count)
    else:

        def grown(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([rows, rows.new_empty((*rows.shape[:-2], count, rows.shape[-1]))],
                             dim=-2)

        keys, values = [grown(k) for k, _ in past], [grown(v) for _, v in past]
    slots = torch.arange(reused, reused + count, device=device)
    hidden = window_forward(model.network, to_device(ids[None], device),
                            to_device(positions[None], device), keys, values, slots, None,
                            on.fused_projections)
    return hidden[0], list(zip(keys, values, strict=True))


class _Key(NamedTuple):
    """What a captured graph is specific to."""

    kind: str  # "hole": a hole-only step; "pass": a full or partial pass
    width: int  # window rows (a pass: padded queries)
    rows: int  # context rows before the window (bucketed)
    fused: bool  # through the fused projections
    head: Head | None = None  # a hole step's graph head
    holes: int = 1  # "packed": the batch's holes (each a row of the buffers)


class PackedWindow(NamedTuple):
    """One hole of a packed batch (`HoleSteps.run_packed`): its window's ids (W,) at sequence
    positions start.., against its context's keys and values (per layer (1, kv_heads, C, D))
    owned by `context`, whose identity says when a seat's buffers must be refilled."""

    ids: torch.Tensor
    start: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    context: object


@dataclass
class _Shape:
    """The static buffers of one `_Key` and, on CUDA, its captured graph. Rows [0, rows) hold
    the context (padding after it masked out), [rows, rows + W) the window; a pass writes its
    queries right after its real context rows instead (`slots`), the rest masked."""

    key: _Key
    inputs: torch.Tensor  # (2, W): the window's ids, then their positions; packed (2, B, W)
    keys: list[torch.Tensor]  # per layer (1, kv_heads, rows + W, D); packed (B, ...)
    values: list[torch.Tensor]
    slots: torch.Tensor  # (W,): where the window's keys and values go
    mask: torch.Tensor  # (1, 1, W, rows + W); packed (B, 1, 1, rows + W)
    bans: torch.Tensor | None = None  # (n, C) bool: the graph head's per-row bans
    never: torch.Tensor | None = None  # (k,) the never-sampled ids, on the device
    columns: torch.Tensor | None = None  # (C,) the head's columns, on the device
    context: object | None = None  # the ContextCache whose rows the buffers hold
    seats: list[weakref.ref | None] | None = None  # packed: each seat's ContextCache
    output: torch.Tensor | None = None  # (1, W, H) hidden states, or the head's (2, n)
    graph: torch.cuda.CUDAGraph | None = None
    uncaptured: bool = False  # its capture failed: this shape runs eagerly


class HoleSteps:
    """Hole-only passes of one hole at a time through fixed-shape buffers (a CUDA graph each
    on CUDA; eager elsewhere, which tests use), with DIFFUSION_LSP_PACKED_GRAPHS several holes'
    as one bucketed batch (`run_packed`), and with DIFFUSION_LSP_GRAPH_PASSES full and
    partial passes too (`pass_rows`). Used from the engine's one thread."""

    def __init__(self, model: LoadedModel, graphs: bool | None = None) -> None:
        self.model = model
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self._shapes: OrderedDict[_Key, _Shape] = OrderedDict()
        self._generation = 0  # of the network's weights the kept graphs read
        self.captures = 0
        self.replays = 0
        self.capture_failures = 0

    @torch.inference_mode()
    def run(self, context_layers: list[tuple[torch.Tensor, torch.Tensor]], context: object,
            window_ids: torch.Tensor, start: int, fused: bool = False, head: Head | None = None,
            bans: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (W, H) of the window `window_ids` (W,) at sequence positions start..,
        against `context_layers` (per layer (1, kv_heads, C, D)); `context` is their owner,
        whose identity says when the buffers must be refilled. With a `head` (and its `bans`,
        `model.decoding.scoring.step_head`), the graph head's scores instead: (2, n) tokens and raw
        confidences of the hole's n positions (`model.decoding.scoring.greedy_scores`). On the
        device, rewritten by the shape's next run."""
        width = window_ids.numel()
        rows = context_layers[0][0].shape[-2]
        self._follow_weights(fused)
        shape = self._shape(_Key("hole", width, bucket(rows), fused, head))
        if shape.context is not context:
            self._load_context(shape, context_layers, rows)
            shape.context = context
        upload(shape.inputs, torch.stack([window_ids, torch.arange(start, start + width)]))
        if head is not None:
            upload(shape.bans, bans)
        self._replay(shape)
        return shape.output if head is not None else shape.output[0]

    @torch.inference_mode()
    def pass_rows(self, ids: torch.Tensor, positions: torch.Tensor,
                  past: list[tuple[torch.Tensor, torch.Tensor]] | None, fused: bool = False
                  ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """`rows_pass` on a static shape (`pass_shape`: the queries padded, the past's rows
        bucketed): the past copied in, the queries' rows written right after it, padding
        masked. Returns views of the shape's buffers (valid until its next run)."""
        count = ids.numel()
        reused = 0 if past is None else past[0][0].shape[-2]
        padded, rows = pass_shape(count, reused)
        self._follow_weights(fused)
        shape = self._shape(_Key("pass", padded, rows, fused))
        for index, (keys, values) in enumerate(past or ()):
            shape.keys[index][..., :reused, :].copy_(keys)
            shape.values[index][..., :reused, :].copy_(values)
        torch.arange(reused, reused + padded, out=shape.slots)
        columns = torch.arange(shape.mask.shape[-1], device=shape.mask.device)
        shape.mask.copy_(additive_mask(columns < reused + count, shape.mask.dtype)
                         .expand_as(shape.mask))
        inputs = torch.zeros((2, padded), dtype=torch.long)  # padding: id 0 at position 0
        inputs[0, :count], inputs[1, :count] = ids, positions
        upload(shape.inputs, inputs)
        self._replay(shape)
        end = reused + count
        layers = [(keys[..., :end, :], values[..., :end, :])
                  for keys, values in zip(shape.keys, shape.values, strict=True)]
        return shape.output[0, :count], layers

    @torch.inference_mode()
    def run_packed(self, windows: Sequence[PackedWindow], fused: bool = False
                   ) -> list[torch.Tensor] | None:
        """Hidden states (W_i, H) of several holes' windows, each against its own context, as
        one batch of their bucket (`packed_bucket`, the module's docstring): what
        `model.decoding.packed_step.packed_pass` computes for their window segments. On the
        device, rewritten by the bucket's next run. None, and nothing run, when the bucket's
        buffers would be over MAX_PACKED_BYTES."""
        holes, width, rows = packed_bucket(len(windows),
                                           max(window.ids.numel() for window in windows),
                                           max(window.layers[0][0].shape[-2]
                                               for window in windows))
        if holes * self._row_bytes * (rows + width) > MAX_PACKED_BYTES:
            return None
        self._follow_weights(fused)
        shape = self._shape(_Key("packed", width, rows, fused, None, holes))
        seats = self._seat(shape, windows)
        inputs = torch.zeros((2, holes, width), dtype=torch.long)  # padding: id 0 at 0
        visible = torch.zeros((holes, rows + width), dtype=torch.bool)
        visible[:, rows:] = True  # a spare seat's rows see themselves
        for seat, window in zip(seats, windows, strict=True):
            count, context = window.ids.numel(), window.layers[0][0].shape[-2]
            inputs[0, seat, :count] = window.ids
            inputs[1, seat, :count] = torch.arange(window.start, window.start + count)
            visible[seat] = False
            visible[seat, :context] = True
            visible[seat, rows:rows + count] = True
        upload(shape.inputs, inputs)
        upload(shape.mask, additive_mask(visible, shape.mask.dtype)[:, None, None])
        self._replay(shape)
        return [shape.output[seat, :window.ids.numel()]
                for seat, window in zip(seats, windows, strict=True)]

    def _seat(self, shape: _Shape, windows: Sequence[PackedWindow]) -> list[int]:
        """The batch row (seat) of each window: the one already holding its context, else a
        seat no window of this batch holds, its context copied in."""
        held = {id(context): seat for seat, ref in enumerate(shape.seats)
                if ref is not None and (context := ref()) is not None}
        seats = {id(window.context): held[id(window.context)]
                 for window in windows if id(window.context) in held}
        free = [seat for seat in range(len(shape.seats)) if seat not in seats.values()]
        for window in windows:
            if id(window.context) in seats:
                continue
            seat = seats[id(window.context)] = free.pop(0)
            rows = window.layers[0][0].shape[-2]
            for index, (keys, values) in enumerate(window.layers):
                shape.keys[index][seat:seat + 1, :, :rows].copy_(keys)
                shape.values[index][seat:seat + 1, :, :rows].copy_(values)
            shape.seats[seat] = weakref.ref(window.context)
        return [seats[id(window.context)] for window in windows]

    @property
    def _row_bytes(self) -> int:
        """Bytes of one row of keys and values, over every layer."""
        config = self.model.network.config
        dim = self.model.network.model.layers[0].self_attn.head_dim
        element = torch.empty((), dtype=self.model.dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * dim * element

    @property
    def buffer_bytes(self) -> int:
        """Bytes in the kept shapes' keys and values buffers."""
        return sum(t.numel() * t.element_size() for shape in self._shapes.values()
                   for t in (*shape.keys, *shape.values))

    def _follow_weights(self, fused: bool) -> None:
        """Fuse the projections when asked; once the weights moved, drop every kept graph
        (a replay would read the old weights' freed memory)."""
        layers = layers_of(self.model.network)
        if fused:
            layers.fuse()
        if layers.generation != self._generation:
            self._shapes.clear()
            self._generation = layers.generation

    def _shape(self, key: _Key) -> _Shape:
        shape = self._shapes.get(key)
        if shape is None:
            device, width, rows = self.model.device, key.width, key.rows
            keys, values = kv_buffers(self.model, key.holes, rows + width)
            packed = key.kind == "packed"
            shape = _Shape(
                key=key, inputs=torch.zeros((2, key.holes, width) if packed else (2, width),
                                            dtype=torch.long, device=device),
                keys=keys, values=values,
                slots=torch.arange(rows, rows + width, device=device),
                mask=torch.zeros((key.holes, 1, 1, rows + width) if packed
                                 else (1, 1, width, rows + width), dtype=self.model.dtype,
                                 device=device),
                seats=[None] * key.holes if packed else None)
            if key.head is not None:
                shape.bans = torch.zeros((key.head.rows, len(key.head.columns)),
                                         dtype=torch.bool, device=device)
                shape.never = self.model.never_sample_ids.to(device)
                shape.columns = torch.tensor(key.head.columns, dtype=torch.long, device=device)
            self._shapes[key] = shape
            while len(self._shapes) > 1 and (len(self._shapes) > MAX_GRAPHS
                                             or self.buffer_bytes > MAX_BUFFER_BYTES):
                self._shapes.popitem(last=False)
        self._shapes.move_to_end(key)
        return shape

    def _load_context(self, shape: _Shape, layers: list[tuple[torch.Tensor, torch.Tensor]],
                      rows: int) -> None:
        for index, (keys, values) in enumerate(layers):
            shape.keys[index][..., :rows, :].copy_(keys)
            shape.values[index][..., :rows, :].copy_(values)
        columns = torch.arange(shape.mask.shape[-1], device=shape.mask.device)
        visible = (columns < rows) | (columns >= shape.slots[0])  # the context, the window
        shape.mask.copy_(additive_mask(visible, shape.mask.dtype).expand_as(shape.mask))

    def _forward(self, shape: _Shape) -> torch.Tensor:
        ids, positions = shape.inputs.view(2, -1, shape.key.width)  # (B, W) each
        hidden = window_forward(self.model.network, ids, positions, shape.keys, shape.values,
                                shape.slots, shape.mask, shape.key.fused)
        head = shape.key.head
        if head is None:
            return hidden
        logits = self.model.network.lm_head(hidden[0, :head.rows]).float()  # (n, V)
        return greedy_scores(logits, head, shape.never, shape.columns, shape.bans)

    def _replay(self, shape: _Shape) -> None:
        """Run the shape's step: eagerly without graphs, else its graph (captured first). A
        shape whose capture fails runs eagerly from then on; the others keep their graphs."""
        if not self.graphs or shape.uncaptured:
            shape.output = self._forward(shape)
        elif shape.graph is None:
            try:
                self._capture(shape)
            except Exception as error:  # noqa: BLE001 - the step still runs, uncaptured
                key = shape.key
                log.warning("CUDA graph capture of a %s step (%d rows over %d, fused %s, graph "
                            "head %s) failed; that shape runs uncaptured: %s", key.kind,
                            key.width, key.rows, key.fused, key.head is not None,
                            str(error).splitlines()[0] if str(error) else type(error).__name__)
                shape.uncaptured = True
                self.capture_failures += 1
                shape.output = self._forward(shape)
        else:
            shape.graph.replay()
            self.replays += 1

    def _capture(self, shape: _Shape) -> None:
        shape.graph, shape.output = capture(lambda: self._forward(shape), self.model.device)
        self.captures += 1


def capture(run: Callable[[], T], device: torch.device) -> tuple[torch.cuda.CUDAGraph, T]:
    """`run` captured as a CUDA graph, and its output (static: every replay rewrites it).
    Warmed up on a side stream first (cuBLAS picks its kernels, lazy state is made); the
    graph is replayed once, since a capture records kernels without running them."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(WARM_UP_RUNS):
            run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: a CUDA call from another thread (the server's) cannot break the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        output = run()
    graph.replay()
    return graph, output


def hole_steps(model: LoadedModel) -> HoleSteps:
    """The model's HoleSteps, made on first use and kept with its network's `_Layers` (the one
    thing the fast step keeps: copies of a LoadedModel share their network's graphs)."""
    layers = layers_of(model.network)
    if layers.steps is None:
        layers.steps = HoleSteps(model)
    return layers.steps
