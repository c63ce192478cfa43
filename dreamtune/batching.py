"""From tokenized (prompt, response) pairs to training batches: truncation, Dream's per-batch cutoffs,
padding, and sequence packing. Pure functions; every random choice takes an explicit torch.Generator.

A row is `prompt_ids + response_ids` where response_ids already ends with eos. Without a cutoff each row
is right-padded with pad (= eos for Dream) to `max_length`, and the trailing pads are loss targets: that
is how Dream learns to end answers (it fills the unused canvas with eos). Prompt tokens are never masked.

Cutoffs (Dream's `data.perbatch_cutoff`, per micro-batch):
- `random`: pick one row's true length at random; cut or pad every row to it.
- `random_with_input_pad`: left-pad prompts to the batch's longest prompt (pads not attended), pick one
  row's response length at random, truncate longer responses to it and fill shorter ones with eos.
- `strip_padding`: strip the padding common to all rows (pad to the longest row only).
`resp_cutoff_ratio` (no per-batch cutoff): with that probability, drop a random number of trailing
positions, fewer than the shortest response.

Token budget (`data.micro_batch_tokens`): `group_by_tokens` groups the rows of a global batch, in order, into
micro-batches whose padded size (`padded_tokens`, the bound over the cutoff's random draws) stays within
the budget: many short rows in one forward pass, a long row alone.

Packing (`data.packing`): rows are packed greedily into sequences of `max_length`; each document keeps
its own positions and sees only itself (`doc_ids` drives the attention mask, built in
models.document_attention_mask for the attention implementation in use, the noise and CART). A
packed document is trained with its own eos only: there is no canvas of trailing pads to fill.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

Example = tuple[list[int], list[int]]  # (prompt_ids, response_ids ending in eos)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long
    maskable: torch.Tensor  # [B, L] bool: response tokens and trailing pads (the diffusion targets)
    doc_ids: torch.Tensor  # [B, L] long: which sequence a position belongs to (noise is drawn per sequence); -1 = none
    attention_mask: torch.Tensor | None = None  # [B, L] 0/1 (left pads) or None (attend to everything)
    position_ids: torch.Tensor | None = None  # [B, L] (left padding, packing) or None (0..L-1)
    packed: bool = False
    n_docs: int = 0  # sequences drawn a noise level each (rows, or packed documents); 0 = count doc_ids

    def to(self, device) -> "Batch":
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in kw.items()})

    @property
    def n_tokens(self) -> int:
        """Tokens that are real content or trained pads (what tokens/s counts)."""
        return int((self.doc_ids >= 0).sum())


def truncate(prompt: list[int], response: list[int], max_length: int, policy: str, row: int = -1) -> Example | None:
    """Fit one example into max_length. Returns None for a dropped row; raises ValueError for `error`."""
    n = len(prompt) + len(response)
    if n <= max_length:
        return prompt, response
    if policy == "error":
        raise ValueError(
            f"row {row} has {n} tokens, more than data.max_length={max_length}; raise data.max_length, or set "
            f"data.truncation=right|left|drop (run 'dreamtune data validate' to see how many rows are affected)"
        )
    if policy == "drop":
        return None
    if policy == "right":  # keep the start: prompt whole (if it fits), response cut at its end
        if len(prompt) >= max_length:
            return prompt[:max_length], []
        return prompt, response[: max_length - len(prompt)]
    assert policy == "left", policy
    # keep the end: cut from the start of the whole sequence (the prompt's start first)
    cut = n - max_length
    if cut < len(prompt):
        return prompt[cut:], response
    return [], response[cut - len(prompt):]


def collate(examples: list[Example], *, max_length: int, pad_id: int, cutoff_type: str | None = None,
            resp_cutoff_ratio: float = 0.0, generator: torch.Generator | None = None) -> Batch:
    """Pad (and optionally cut) a micro-batch of examples into a Batch. See the module docstring."""
    assert examples, "empty micro-batch"
    B = len(examples)
    g = generator
    p_lens = [len(p) for p, _ in examples]
    r_lens = [len(r) for _, r in examples]

    if cutoff_type == "random_with_input_pad":
        P = max(p_lens)
        k = int(torch.randint(B, (1,), generator=g))
        R = r_lens[k]
        ids = torch.full((B, P + R), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + R), dtype=torch.long)
        maskable = torch.zeros((B, P + R), dtype=torch.bool)
        for b, (p, r) in enumerate(examples):
            r = r[:R]
            ids[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            ids[b, P:P + len(r)] = torch.tensor(r, dtype=torch.long)  # shorter responses: eos-filled tail
            attn[b, P - len(p):] = 1  # left pads are not attended
            maskable[b, P:] = True
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        doc_ids = torch.where(attn.bool(), torch.arange(B)[:, None], torch.full_like(ids, -1))
        return Batch(ids, maskable, doc_ids, attention_mask=attn, position_ids=position_ids, n_docs=B)

    if cutoff_type == "random":
        k = int(torch.randint(B, (1,), generator=g))
        L = p_lens[k] + r_lens[k]
    elif cutoff_type == "strip_padding":
        L = max(p + r for p, r in zip(p_lens, r_lens))
    else:
        assert cutoff_type is None, f"unknown cutoff {cutoff_type}"
        L = max_length
    L = min(L, max_length)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    maskable = torch.zeros((B, L), dtype=torch.bool)
    for b, (p, r) in enumerate(examples):
        seq = (p + r)[:L]
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        maskable[b, min(len(p), L):] = True  # response + trailing pads (eos) are targets
    if cutoff_type is None and resp_cutoff_ratio > 0 and float(torch.rand((), generator=g)) < resp_cutoff_ratio:
        shortest = min(r_lens)
        if shortest > 1:
            drop = int(torch.randint(1, shortest, (1,), generator=g))
            ids, maskable = ids[:, : L - drop], maskable[:, : L - drop]
    doc_ids = torch.arange(B)[:, None].expand(ids.shape).clone()
    return Batch(ids, maskable, doc_ids, n_docs=B)


def first_fit(lengths: list[int], max_length: int) -> tuple[list[list[int]], list[int]]:
    """Pack lengths in order into rows of max_length, first fit: (indices per row, free room per row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        assert n <= max_length, "truncate examples before packing"
        for j, free in enumerate(room):
            if n <= free:
                rows[j].append(i)
                room[j] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows, room


def padded_tokens(examples: list[Example], *, max_length: int, cutoff_type: str | None = None, packing: bool = False) -> int:
    """The most positions (rows x length) the batch of these examples can have, whatever the random cutoff draws."""
    p_max = max(len(p) for p, _ in examples)
    total_max = max(len(p) + len(r) for p, r in examples)
    if packing:
        rows, room = first_fit([len(p) + len(r) for p, r in examples], max_length)
        return len(rows) * max(max_length - free for free in room)
    if cutoff_type is None:
        return len(examples) * max_length
    if cutoff_type == "random_with_input_pad":  # prompts left-padded to the longest, responses to one row's length
        return len(examples) * (p_max + max(len(r) for _, r in examples))
    return len(examples) * min(total_max, max_length)  # random, strip_padding


def group_by_tokens(examples: list[Example], budget: int, **layout) -> list[list[int]]:
    """Indices of `examples` in order, grouped greedily into micro-batches of at most `budget` positions
    (padded_tokens; a row longer than the budget alone is a micro-batch of its own)."""
    groups: list[list[int]] = []
    for i in range(len(examples)):
        if groups and padded_tokens([examples[j] for j in groups[-1] + [i]], **layout) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def pack(examples: list[Example], *, max_length: int, pad_id: int) -> Batch:
    """Pack examples in order into as few rows of max_length as first-fit allows.
    Documents never straddle rows; the tail of a row is padding that is neither attended nor trained."""
    rows, room = first_fit([len(p) + len(r) for p, r in examples], max_length)
    L = max(max_length - free for free in room)
    R = len(rows)
    ids = torch.full((R, L), pad_id, dtype=torch.long)
    maskable = torch.zeros((R, L), dtype=torch.bool)
    doc_ids = torch.full((R, L), -1, dtype=torch.long)
    pos = torch.zeros((R, L), dtype=torch.long)
    for j, members in enumerate(rows):
        s = 0
        for i in members:
            p, r = examples[i]
            n = len(p) + len(r)
            ids[j, s:s + n] = torch.tensor(p + r, dtype=torch.long)
            maskable[j, s + len(p):s + n] = True
            doc_ids[j, s:s + n] = i
            pos[j, s:s + n] = torch.arange(n)
            s += n
    return Batch(ids, maskable, doc_ids, attention_mask=None, position_ids=pos, packed=True, n_docs=len(examples))
