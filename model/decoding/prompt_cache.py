"""Each open document's context, kept across completions: a keystroke costs its new tokens.

While the user types, the text around the cursor barely changes between two completions. For
every document the engine keeps the keys and values its network computed for the context
(every position outside the hole's window) at the first pass of the document's last
completion. The next completion of that document reuses the rows whose tokens did not change,
the longest common token prefix of the prefix and the longest common token prefix of the
suffix (the text right after the cursor; its keys are rotated to the suffix's new positions,
since RoPE rotations compose), and runs one *partial pass*: the changed context tokens and the
hole's window as queries against the reused rows. That pass gives the first step's logits and
the hole's context cache; later steps run as they would without it (`model.decoding.sampler`). So a
keystroke costs the tokens it changed plus the hole's steps, as llama.cpp's prompt cache makes
it cost for a causal model.

The approximation. In a causal model a prefix row depends only on the tokens before it, so
reusing it is exact. Under bidirectional attention every row depends on the whole sequence: a
reused row was computed seeing the document as it was then (the text the user has typed since,
an edit above the cursor, the hole at its old length and position). It is exact when the
document did not change (same text, same hole); otherwise the rows far from the edit barely
move and the ones next to it are recomputed. `max_reuses` bounds the drift: after that many
partial passes a document's context is computed from scratch again. `diffusion-lsp bench typing`
(benchmarks/typing_latency.py) measures what it changes in the output.

Block diffusion (`model.decoding.block`) has no approximation to bound: a row depends only on its
own block and the blocks before it, so a document's prompt rows are reused as long as their tokens
are unchanged, whole chunks of `model.decoding.block.WRITE_CHUNK` tokens at a time, and a
keystroke's completion is the one computed from scratch (`BlockContext`).

Memory: the cache is an LRU over documents, bounded by `max_documents` and `max_bytes`; a
document's entry is its context's keys and values (2 x layers x kv_heads x head_dim x tokens).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import rotate_half  # RoPE's, as the network's

from model.decoding import fast_step
from model.decoding.block import WRITE_CHUNK, BlockCache, truncated
from model.decoding.hole import ContextCache, HoleState
from model.decoding.passes import logit_positions, window
from model.decoding.pinned import to_device
from model.network.loader import LoadedModel

DEFAULT_MAX_DOCUMENTS = 20
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB
DEFAULT_MAX_REUSES = 32  # partial passes before a document's context is computed afresh


@dataclass
class DocumentContext:
    """One document's context rows as the network computed them: the prefix's (positions
    0..len(prefix_ids)-1) then the suffix's (positions suffix_start...)."""

    prefix_ids: list[int]  # the prefix outside the hole's window
    suffix_ids: list[int]
    suffix_start: int  # sequence position of suffix_ids[0]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, P + S, head_dim)
    reuses: int = 0  # partial passes since these rows were last computed from scratch

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in self.layers)


@dataclass
class BlockContext:
    """A block-diffusion document's prompt rows (`model.decoding.block`): exact, since under the
    block-causal mask a row depends only on the tokens of its block and the blocks before."""

    ids: list[int]  # the prompt tokens they were computed from
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (1, kv_heads, len(ids), head_dim)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in self.layers)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def move_keys(model: LoadedModel, keys: torch.Tensor, delta: int) -> torch.Tensor:
    """Keys computed at positions p, as they would be at p + delta: RoPE rotates each pair of
    dimensions by an angle proportional to the position, and rotations compose (Su et al.,
    2021). keys: (1, kv_heads, n, head_dim)."""
    if delta == 0 or keys.shape[-2] == 0:
        return keys
    rotary = model.network.model.rotary_emb
    position = torch.tensor([[delta]], device=keys.device)
    cos, sin = rotary(keys.float(), position)  # (1, 1, head_dim) each, times the scaling
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    cos, sin = cos[:, None] / scale, sin[:, None] / scale  # (1, 1, 1, head_dim)
    moved = keys.float() * cos + rotate_half(keys.float()) * sin
    return moved.to(keys.dtype)


@dataclass
class Reuse:
    """What a new completion takes from its document's cached context; `run` is the partial
    pass `model.decoding.passes.forward_holes` calls for the hole's first step."""

    entry: DocumentContext
    prefix_rows: int  # leading prefix tokens unchanged since the entry was computed
    suffix_rows: int  # leading suffix tokens unchanged

    @property
    def tokens(self) -> int:
        return self.prefix_rows + self.suffix_rows

    def queries(self, model: LoadedModel, state: HoleState
                ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The partial pass's inputs: the changed prefix, the window and the changed suffix
        (ids (Q,) at their sequence positions (Q,), in sequence order) and the reused rows
        they attend to besides themselves (per layer (1, kv_heads, R, D))."""
        _, end = window(state, model.family.shifted_logits)
        sequence = state.sequence()  # (L,)
        positions = torch.cat([torch.arange(self.prefix_rows, end),
                               torch.arange(end + self.suffix_rows, len(sequence))])  # (Q,)
        return sequence[positions], positions, self._rows(model, end - self.entry.suffix_start)

    def finish(self, model: LoadedModel, state: HoleState, hidden: torch.Tensor,
               rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Take the partial pass's output: its hidden states (Q, H) and every layer's keys and
        values (the reused rows, then the queries'). Sets the state's context cache; returns
        the hidden states at its masked positions (m, H)."""
        shifted = model.family.shifted_logits
        start, end = window(state, shifted)
        kept_prefix, kept_suffix = self.prefix_rows, self.suffix_rows
        kept = kept_prefix + kept_suffix
        new_prefix = start - kept_prefix
        after_window = kept + new_prefix + (end - start)

        def context_order(rows: torch.Tensor) -> torch.Tensor:
            """Cache rows [kept prefix, kept suffix, queries] -> [prefix, suffix], no window."""
            return torch.cat([rows[..., :kept_prefix, :], rows[..., kept:kept + new_prefix, :],
                              rows[..., kept_prefix:kept, :], rows[..., after_window:, :]],
                             dim=-2)

        state.context = ContextCache(
            [(context_order(keys), context_order(values)) for keys, values in rows],
            hole_len=state.hole.numel(),
        )
        state.reused_tokens = kept
        return hidden[(logit_positions(state, shifted) - kept_prefix).to(hidden.device)]

    @torch.inference_mode()
    def run(self, model: LoadedModel, state: HoleState) -> torch.Tensor:
        """One pass over the changed context and the window against the reused rows
        (`queries`, then `finish`). Sets the state's context cache; returns hidden states at
        its masked positions (m, H). Several holes' partial passes can share a packed pass
        instead (`model.decoding.passes._packed_pass`)."""
        ids, positions, past = self.queries(model, state)
        if fast_step.enabled(model):
            hidden, rows = fast_step.rows_pass(model, ids, positions, past)
        else:
            cache = DynamicCache(ddp_cache_data=past)
            hidden = model.network.model(
                input_ids=to_device(ids[None], model.device),
                position_ids=to_device(positions[None], model.device),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state[0]  # (Q, H)
            rows = [(layer.keys, layer.values) for layer in cache.layers]
        return self.finish(model, state, hidden, rows)

    def _rows(self, model: LoadedModel, delta: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The reused rows of every layer, suffix keys moved `delta` positions."""
        prefix_len = len(self.entry.prefix_ids)
        suffix = slice(prefix_len, prefix_len + self.suffix_rows)
        rows = []
        for keys, values in self.entry.layers:
            rows.append((
                torch.cat([keys[..., :self.prefix_rows, :],
                           move_keys(model, keys[..., suffix, :], delta)], dim=-2),
                torch.cat([values[..., :self.prefix_rows, :], values[..., suffix, :]], dim=-2),
            ))
        return rows


class PromptCache:
    """Context rows per document, least recently used first out. Used from one thread (the
    engine's worker)."""

    def __init__(self, max_documents: int = DEFAULT_MAX_DOCUMENTS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_reuses: int = DEFAULT_MAX_REUSES) -> None:
        self.max_documents = max_documents
        self.max_bytes = max_bytes
        self.max_reuses = max_reuses
        self._entries: OrderedDict[str, DocumentContext | BlockContext] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, document: str) -> bool:
        return document in self._entries

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self._entries.values())

    def lookup(self, model: LoadedModel, document: str, state: HoleState) -> Reuse | None:
        """What `state` (a new hole in `document`) can reuse; None: run a full pass."""
        entry = self._entries.get(document)
        if (not isinstance(entry, DocumentContext) or not state.options.caches_context
                or state.blockwise):
            return None
        self._entries.move_to_end(document)
        if entry.reuses >= self.max_reuses:
            return None
        start, _ = window(state, model.family.shifted_logits)
        reuse = Reuse(entry, common_prefix(entry.prefix_ids, state.prefix_ids[:start]),
                      common_prefix(entry.suffix_ids, state.suffix_ids))
        return reuse if reuse.tokens else None

    def attach(self, model: LoadedModel, document: str | None, state: HoleState) -> None:
        """Give a new hole of `document` what it can reuse (its first pass runs it)."""
        if document is None:
            return
        if state.blockwise:
            self._attach_rows(document, state)
        else:
            state.reuse = self.lookup(model, document, state)

    def _attach_rows(self, document: str, state: HoleState) -> None:
        """A block-diffusion hole (`model.decoding.block`) starts from the document's exact prompt
        rows that still hold: those of the chunks its prompt shares whole with the last one."""
        entry = self._entries.get(document)
        if not isinstance(entry, BlockContext) or not state.options.caches_context:
            return
        self._entries.move_to_end(document)
        # never the chunk of the prompt's last token: with shifted logits the forward that
        # writes it predicts the hole's first token (`model.decoding.block.block_pass`)
        shared = (min(common_prefix(entry.ids, state.prefix_ids), state.hole_start - 1)
                  // WRITE_CHUNK * WRITE_CHUNK)
        if shared:
            state.committed = truncated(BlockCache(entry.layers), shared)
            state.reused_tokens = shared

    def store(self, model: LoadedModel, document: str, state: HoleState) -> None:
        """Keep the context rows of `state`'s first pass as `document`'s; evict down to the
        bounds (least recently used first)."""
        if state.blockwise:
            self._store_rows(document, state)
            return
        if state.context is None:
            return
        start, end = window(state, model.family.shifted_logits)
        reuse = state.reuse
        reuses = reuse.entry.reuses + 1 if isinstance(reuse, Reuse) else 0
        self._entries[document] = DocumentContext(
            state.prefix_ids[:start], list(state.suffix_ids), end, state.context.layers, reuses)
        self._keep(document)

    def _store_rows(self, document: str, state: HoleState) -> None:
        """Keep a block-diffusion hole's exact rows of its prompt's whole chunks."""
        rows = state.committed
        length = min(rows.length, state.hole_start) // WRITE_CHUNK * WRITE_CHUNK if rows else 0
        if not length or not state.options.caches_context:
            return
        self._entries[document] = BlockContext(  # copies: a view would keep the whole
            state.prefix_ids[:length],           # source (and its padding) alive, uncounted
            [(k[..., :length, :].clone(), v[..., :length, :].clone()) for k, v in rows.layers])
        self._keep(document)

    def _keep(self, document: str) -> None:
        self._entries.move_to_end(document)
        while self._entries and (len(self._entries) > self.max_documents
                                 or self.nbytes > self.max_bytes):
            self._entries.popitem(last=False)

    def drop(self, document: str) -> None:
        self._entries.pop(document, None)

    def clear(self) -> None:
        """Forget every document's context."""
        self._entries.clear()
