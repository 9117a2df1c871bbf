"""Token log-probabilities of a batch of sequences (``TokenLogprobs``), by a padded or a packed forward pass.

Packing: pack variable-length sequences into a few rows (only row tails pad), padding-free.

A training step scores two sets of sequences with the same model: the reference responses (SFT)
and the sampled ones (policy gradient). Padded to one width they waste most of the compute when
lengths vary (one 64-token sample pads 63 concise ones). Packing lays the sequences end to end in
rows of the longest sequence's width, with ``position_ids`` restarting at 0 for each; with no 2-D
attention mask, Hugging Face models build a block-causal mask from those position ids, so every
token attends only to its own sequence (``transformers.masking_utils.find_packed_sequence_indices``;
flash-attention models use the same ids for variable-length kernels).

Models that ignore ``position_ids`` would silently attend across sequences, so
``packing_matches_padding`` checks a batch both ways once before packing is trusted.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from l3m_lightning.constants import IGNORE_INDEX

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # right-padded input_ids, attention_mask, labels


@dataclass
class Packed:
    """Sequences laid end to end in ``[R, W]`` rows; ``segment`` says which sequence each token is."""

    input_ids: torch.Tensor  # [R, W]
    position_ids: torch.Tensor  # [R, W], restarting at 0 for every sequence (and for each row's tail)
    targets: torch.Tensor  # [R, W] the next token of the same sequence to score, IGNORE_INDEX elsewhere
    segment: torch.Tensor  # [R, W] sequence index, -1 for the tail of a row
    num_sequences: int


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Bins (lists of sequence indices) of total length ≤ ``width``, longest sequences placed first."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        b = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if b is None:
            bins.append([])
            room.append(width)
            b = len(bins) - 1
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def pack(parts: list[Batch], pad_token_id: int) -> Packed:
    """Pack the sequences of several right-padded batches (in order: part 0's rows, then part 1's, ...)."""
    ids = [row[: int(m.sum())] for input_ids, mask, _ in parts for row, m in zip(input_ids, mask)]
    labels = [row[: int(m.sum())] for _, mask, lab in parts for row, m in zip(lab, mask)]
    lengths = [len(s) for s in ids]
    width = max(lengths)
    bins = first_fit_decreasing(lengths, width)
    device = parts[0][0].device
    input_ids = torch.full((len(bins), width), pad_token_id, dtype=torch.long, device=device)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long, device=device)
    targets = torch.full((len(bins), width), IGNORE_INDEX, dtype=torch.long, device=device)
    segment = torch.full((len(bins), width), -1, dtype=torch.long, device=device)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            n = lengths[i]
            input_ids[r, start : start + n] = ids[i]
            position_ids[r, start : start + n] = torch.arange(n, device=device)
            targets[r, start : start + n - 1] = labels[i][1:]  # token t scores token t+1 of its own sequence
            segment[r, start : start + n] = i
            start += n
        position_ids[r, start:] = torch.arange(width - start, device=device)  # the tail: its own dummy sequence
    return Packed(input_ids, position_ids, targets, segment, len(ids))


@dataclass
class TokenLogprobs:
    """The scored tokens of N sequences, flat: log π of each, its sequence, optionally its hidden state."""

    logp: torch.Tensor  # [M] log π(token | its prefix), with gradient
    sequence: torch.Tensor  # [M] index of the sequence the token belongs to (its tokens are contiguous, in order)
    num_sequences: int
    hidden: torch.Tensor | None = None  # [M, H] last hidden state the token was predicted from

    def sums(self) -> torch.Tensor:
        """Per sequence, the summed log π: log π(y|x) for a response."""
        return self.logp.new_zeros(self.num_sequences).index_add(0, self.sequence, self.logp)

    def counts(self) -> torch.Tensor:
        return torch.zeros(self.num_sequences, dtype=torch.long, device=self.logp.device).index_add(0, self.sequence, torch.ones_like(self.sequence))

    def first_token(self) -> torch.Tensor:
        """Per sequence, the flat index of its first scored token ([N]; M for a sequence with none)."""
        index = torch.arange(len(self.sequence), device=self.sequence.device)
        start = torch.full((self.num_sequences,), len(self.sequence), dtype=torch.long, device=index.device)
        return start.scatter_reduce(0, self.sequence, index, reduce="amin")

    def positions(self) -> torch.Tensor:
        """[M] each token's index within its own response (0 for the first response token)."""
        return torch.arange(len(self.sequence), device=self.sequence.device) - self.first_token()[self.sequence]

    def split(self, n: int) -> tuple["TokenLogprobs", "TokenLogprobs"]:
        """Sequences [0, n) and [n, N), renumbered from 0."""
        head = self.sequence < n
        parts = []
        for keep, offset, count in ((head, 0, n), (~head, n, self.num_sequences - n)):
            hidden = None if self.hidden is None else self.hidden[keep]
            parts.append(TokenLogprobs(self.logp[keep], self.sequence[keep] - offset, count, hidden))
        return parts[0], parts[1]


def scored_positions(scored: torch.Tensor) -> torch.Tensor:
    """Flat indices of the ``True`` entries of ``scored``, in order: rows to ``pick`` from a ``[..., D]`` tensor of its shape."""
    return scored.reshape(-1).nonzero().squeeze(1)


def pick(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``values[scored]`` for ``[..., D]`` values and ``positions = scored_positions(scored)``: the same rows, their gradient added back row by row.

    Boolean indexing gives the same values and gradient (bit for bit: every row is picked once), but
    its backward is an accumulating ``index_put`` that sorts the indices: 3.9x slower than
    ``index_select``'s on the embedded step's sampled logits, 1.4x on SmolLM2's (``bench/decode_kernels.py``).
    """
    return values.reshape(-1, values.shape[-1]).index_select(0, positions)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-softmax of ``logits`` ``[M, V]`` (in float32 at least) at ``targets`` ``[M]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def output_layer(model: torch.nn.Module) -> torch.nn.Module | None:
    """The layer that maps the last hidden states to logits (``get_output_embeddings``), if the model names one."""
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, torch.nn.Module) else None


def scoring_forward(model: torch.nn.Module, head: torch.nn.Module | None, with_hidden: bool, **inputs) -> Any:
    """The model's output. With ``head``: every hidden state and no logits (``logits_to_keep`` selects no position);
    the caller applies ``head`` to the scored tokens' hidden states alone, as TRL keeps only a completion's logits.
    No logits are then computed, copied or back-propagated for prompts, padding or the last token of a row.
    """
    if head is None:
        return model(**inputs, output_hidden_states=with_hidden)
    return model(**inputs, output_hidden_states=True, logits_to_keep=no_positions(inputs["input_ids"].device))


def no_positions(device: torch.device) -> torch.Tensor:
    """``logits_to_keep`` for a forward whose logits are not needed: an empty index along the sequence."""
    return torch.zeros(0, dtype=torch.long, device=device)


def _scored(model: torch.nn.Module, targets: torch.Tensor, segment: torch.Tensor, num_sequences: int, with_hidden: bool,
            head: torch.nn.Module | None, **inputs) -> TokenLogprobs:
    out = scoring_forward(model, head, with_hidden, use_cache=False, **inputs)
    # log-softmax only where a token is scored (prompts, padding and row tails are skipped)
    positions = scored_positions(targets != IGNORE_INDEX)
    hidden = pick(out.hidden_states[-1], positions) if with_hidden or head is not None else None
    logits = pick(out.logits, positions) if head is None else head(hidden)
    logp = target_logprobs(logits, targets.reshape(-1)[positions])
    return TokenLogprobs(logp, segment.reshape(-1)[positions], num_sequences, hidden if with_hidden else None)


def packed_token_logprobs(model: torch.nn.Module, packed: Packed, with_hidden: bool = False, head: torch.nn.Module | None = None) -> TokenLogprobs:
    """One padding-free forward pass over every packed sequence (``head``: see ``scoring_forward``)."""
    return _scored(model, packed.targets, packed.segment, packed.num_sequences, with_hidden, head,
                   input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=None)


def padded_token_logprobs(model: torch.nn.Module, batch: Batch, with_hidden: bool = False, head: torch.nn.Module | None = None) -> TokenLogprobs:
    """The same from an ordinary right-padded batch (one sequence per row)."""
    input_ids, attention_mask, labels = batch
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # position t scores token t+1
    rows = torch.arange(len(input_ids), device=input_ids.device).unsqueeze(1).expand_as(input_ids)
    return _scored(model, targets, rows, len(input_ids), with_hidden, head, input_ids=input_ids, attention_mask=attention_mask)


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout draws) for a check's forward passes, then back to the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


#: How far a check lets a pass drift from the padded passes when the model computes in a half-precision dtype: this
#: many nats times the square root of a response's scored tokens (rounding errors add up along it, mostly at random).
#: ``python bench/check_drift.py`` (CPU, 2026-11-29: SmolLM2-135M-Instruct, ShareGPT rows cut to varied lengths and
#: packed): bfloat16 rounding moved a response's log-probability by up to 0.16 x sqrt(tokens) (bfloat16 weights; 0.13
#: under autocast), far beyond float32's 1e-3, while attending across the packed sequences moved it by up to
#: 31 x sqrt(tokens). The float16 bound is an eighth (its precision is 8x finer). A small random-init model's
#: cross-sequence attention is weaker and can hide under this bound: only float32 checks tell it apart there
#: (tests/test_logprobs.py, tests/test_smollm2_real.py).
HALF_PRECISION_NATS = {torch.bfloat16: 0.5, torch.float16: 0.0625}


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the model's matmuls run in: autocast's where it is on for the parameters' device, else the dtype
    FSDP1 casts its units' parameters to (its ``mixed_precision.param_dtype``), else the parameters'."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.float32
    if torch.is_autocast_enabled(param.device.type):
        return torch.get_autocast_dtype(param.device.type)
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in model.modules():
        cast = getattr(getattr(module, "mixed_precision", None), "param_dtype", None) if isinstance(module, FullyShardedDataParallel) else None
        if cast is not None:
            return cast
    return param.dtype


@dataclass
class Agreement:
    """A check's verdict (truthy when the passes agree) and how far apart they were, to report when they do not."""

    worst: float  # the largest per-sequence (or per-token) difference, nats
    allowed: float  # the same tolerance, as a bound on ``worst`` where it has one (half precision), else float32's
    dtype: torch.dtype
    ok: bool

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return f"computed in {str(self.dtype).removeprefix('torch.')}, the passes differ by up to {self.worst:.3g} nats (allowed {self.allowed:.3g})"


def agreement(got: torch.Tensor, expected: torch.Tensor, tokens: torch.Tensor, dtype: torch.dtype, atol: float = 1e-3) -> Agreement:
    """Do ``got`` and ``expected`` (log-probs of sequences of ``tokens`` scored tokens each) agree to ``dtype``'s rounding?

    float32: within ``atol`` (plus 1e-4 relative). Half precision: within
    ``HALF_PRECISION_NATS`` times the square root of a sequence's scored tokens.
    """
    if got.shape != expected.shape:
        return Agreement(float("inf"), atol, dtype, False)
    difference = (got.float() - expected.float()).abs()
    worst = float(difference.max()) if difference.numel() else 0.0
    nats = HALF_PRECISION_NATS.get(dtype)
    if nats is None:
        return Agreement(worst, atol, dtype, bool(torch.allclose(got, expected, atol=atol, rtol=1e-4)))
    bound = nats * tokens.clamp(min=1).to(difference).sqrt()
    return Agreement(worst, float(bound.max()) if bound.numel() else nats, dtype, bool((difference <= bound).all()))


def agrees_with_padding(model: torch.nn.Module, got: torch.Tensor, parts: list[Batch], atol: float = 1e-3) -> Agreement:
    """``agreement`` of ``got`` (each sequence's log-probability, ``parts`` in order) with padded passes over ``parts``."""
    padded = [padded_token_logprobs(model, part) for part in parts]
    expected, tokens = torch.cat([p.sums() for p in padded]), torch.cat([p.counts() for p in padded])
    return agreement(got, expected, tokens, compute_dtype(model), atol)


@torch.no_grad()
def packing_matches_padding(model: torch.nn.Module, parts: list[Batch], pad_token_id: int, atol: float = 1e-3) -> Agreement:
    """Truthy when packed and padded passes agree, i.e. the model restarts attention at each position-0."""
    with evaluating(model):
        return agrees_with_padding(model, packed_token_logprobs(model, pack(parts, pad_token_id)).sums(), parts, atol)


@torch.no_grad()
def head_matches_logits(model: torch.nn.Module, head: torch.nn.Module, batch: Batch, atol: float = 1e-3) -> bool:
    """True when ``head`` on the last hidden states scores ``batch`` as the model's own logits do.

    Not so for a model that transforms its logits after the output layer (Gemma 2's soft-capping,
    Cohere's logit scale) or whose last hidden state is not the layer's input; a forward that takes no
    ``logits_to_keep`` fails the check too.
    """
    with evaluating(model):
        expected = padded_token_logprobs(model, batch).logp
        try:
            got = padded_token_logprobs(model, batch, head=head).logp
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            return False
    # float32's tolerance in any dtype: both sides are the same output layer on the same hidden states (a half-precision
    # bound would let a mild transformation such as soft-capping through)
    return got.shape == expected.shape and bool(torch.allclose(got, expected, atol=atol, rtol=1e-4))


# --- one forward per prompt, shared by its reference and its K samples -------------------------------------------------
@dataclass
class Responses:
    """One part's responses (the labelled tokens of each row), right-padded, and the prompt each answers."""

    ids: torch.Tensor  # [M, R]
    mask: torch.Tensor  # [M, R]
    prompt_index: torch.Tensor  # [M]


@dataclass
class SharedPrompt:
    """Responses laid out after their prompts' cache: one prompt forward for all the responses to a prompt.

    A training step scores every prompt K + 1 times (its reference and K samples): packed or padded,
    each copy of the prompt goes through the model. Here the B prompts go through once, their
    keys/values are indexed out to every response, and each part's responses go through one more
    forward on top of that cache (or, for a part of one response per prompt, follow their prompts in
    the prompt forward itself); gradients flow back through the cache into the prompt pass, so the
    log-probabilities and their gradients are the full rows' (to rounding).
    """

    prompt_input_ids: torch.Tensor  # [B, P] left-padded
    prompt_attention_mask: torch.Tensor  # [B, P]
    parts: list[Responses]
    #: part 0 is one response per prompt, in the prompts' order (the references): it rides in the prompts' forward,
    #: one forward call fewer (on a small model a call's fixed cost is much of its time)
    first_part_with_prompts: bool = False

    def tokens(self) -> int:
        """Positions the forward passes compute (what the module weighs against packing)."""
        return self.prompt_input_ids.numel() + sum(part.ids.numel() for part in self.parts)


def share_prompts(prompt_input_ids: torch.Tensor, prompt_attention_mask: torch.Tensor, parts: list[tuple[Batch, torch.Tensor]],
                  pad_token_id: int) -> SharedPrompt | None:
    """Lay out ``parts`` (each a right-padded batch and its rows' prompt indices) after their prompts, or ``None``.

    ``None`` when a row is not its prompt followed directly by its labelled response (then only the
    packed or padded passes are exact). Vectorised, with one device-to-host copy: it runs every step.
    """
    prompt_len = prompt_attention_mask.sum(dim=1)
    checks, longest, gathered = [], [], []
    for (input_ids, attention_mask, labels), prompt_of_row in parts:
        width = input_ids.shape[1]
        positions = torch.arange(width, device=input_ids.device)
        n = prompt_len[prompt_of_row].unsqueeze(1)  # [M, 1] each row's prompt length
        labelled = (labels != IGNORE_INDEX) & attention_mask.bool()
        count = labelled.sum(dim=1)
        first = torch.where(labelled, positions, width).amin(dim=1)
        last = torch.where(labelled, positions, -1).amax(dim=1)
        # the row's first n tokens are its prompt's n real tokens (the prompt is left-padded)
        source = (prompt_input_ids.shape[1] - n + positions).clamp(0, prompt_input_ids.shape[1] - 1)
        same_prompt = (input_ids == prompt_input_ids[prompt_of_row].gather(1, source)) | (positions >= n)
        checks.append(((count > 0) & (first == n.squeeze(1)) & (last - first + 1 == count) & same_prompt.all(dim=1)).all())
        longest.append(count.max())
        gathered.append((input_ids, n, count, prompt_of_row))
    first_rows = parts[0][1]  # part 0 one row per prompt, in order? then it can ride in the prompts' forward
    in_order = (first_rows == torch.arange(len(first_rows), device=first_rows.device)).all() if len(first_rows) == len(prompt_len) \
        else first_rows.new_zeros(())
    ok, first_in_order, *widths = torch.stack([torch.stack(checks).all().long(), in_order.long(), *longest]).tolist()
    if not ok:
        return None
    laid_out = []
    for (input_ids, n, count, prompt_of_row), r in zip(gathered, widths):
        offsets = torch.arange(r, device=input_ids.device)
        mask = (offsets < count.unsqueeze(1)).long()
        ids = input_ids.gather(1, (n + offsets).clamp(max=input_ids.shape[1] - 1)).masked_fill(mask == 0, pad_token_id)
        laid_out.append(Responses(ids, mask, prompt_of_row.to(prompt_input_ids.device)))
    return SharedPrompt(prompt_input_ids, prompt_attention_mask, laid_out, first_part_with_prompts=bool(first_in_order))


def _cache_rows(cache, rows: torch.Tensor, length: int):
    """A cache holding ``rows`` of ``cache``'s batch, its first ``length`` positions (indexing keeps the gradient; ``cache`` itself is left as it is)."""
    import copy

    selected = copy.copy(cache)
    selected.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in selected.layers:
        layer.keys, layer.values = layer.keys[rows, :, :length], layer.values[rows, :, :length]
    return selected


def shared_prompt_token_logprobs(model: torch.nn.Module, shared: SharedPrompt, with_hidden: bool = False,
                                 head: torch.nn.Module | None = None) -> TokenLogprobs:
    """One forward over the prompts (their cache kept, with gradient), then one per part over its responses on that cache.

    With ``shared.first_part_with_prompts`` part 0 follows its prompts in their forward (the prompts' keys and
    values do not see it: attention is causal), and the other parts read the cache's prompt positions only.
    ``head``: logits of the scored tokens only, from their hidden states (see ``scoring_forward``).
    """
    from transformers import DynamicCache

    from l3m_lightning.decoding import cache_argument

    cache_name = cache_argument(model) or "past_key_values"
    mask = shared.prompt_attention_mask.long()
    width = mask.shape[1]
    prompt_len = mask.sum(dim=1)
    cache = DynamicCache(config=model.config)
    hidden_needed = with_hidden or head is not None
    lead = shared.parts[0] if shared.first_part_with_prompts else None
    ids, attention, position_ids = shared.prompt_input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)
    keep: int | torch.Tensor = 1  # logits of the prompt's last position (it predicts every part's first response token)
    if lead is not None:
        ids, attention = torch.cat([ids, lead.ids], dim=1), torch.cat([mask, lead.mask], dim=1)
        position_ids = torch.cat([position_ids, prompt_len.unsqueeze(1) + torch.arange(lead.ids.shape[1], device=mask.device)], dim=1)
        keep = torch.arange(width - 1, ids.shape[1], device=mask.device)  # and of the lead's positions
    prompt_out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                       logits_to_keep=keep if head is None else no_positions(mask.device),
                       output_hidden_states=hidden_needed, **{cache_name: cache})
    prompt_hidden = prompt_out.hidden_states[-1][:, width - 1 : width] if hidden_needed else None
    prompt_logits = prompt_out.logits[:, :1] if head is None else None
    logps, sequences, hiddens, offset = [], [], [], 0
    for part in shared.parts:
        rows, r = part.prompt_index, part.ids.shape[1]
        if part is lead:  # its positions follow the prompts' in their forward
            response_hidden = prompt_out.hidden_states[-1][:, width:] if hidden_needed else None
            response_logits = prompt_out.logits[:, 1:] if head is None else None
        else:
            out = scoring_forward(model, head, with_hidden, input_ids=part.ids, attention_mask=torch.cat([mask[rows], part.mask], dim=1),
                                  position_ids=prompt_len[rows].unsqueeze(1) + torch.arange(r, device=mask.device),
                                  use_cache=True, **{cache_name: _cache_rows(cache, rows, width)})
            response_hidden = out.hidden_states[-1] if hidden_needed else None
            response_logits = out.logits if head is None else None
        positions = scored_positions(part.mask.bool())

        def predicting(from_prompt: torch.Tensor, from_responses: torch.Tensor) -> torch.Tensor:
            """Per scored token, what predicts it: its prompt's last position (token 0), else the response position before it."""
            return pick(torch.cat([from_prompt[rows], from_responses[:, :-1]], dim=1), positions)

        hidden = predicting(prompt_hidden, response_hidden) if hidden_needed else None
        logits = predicting(prompt_logits, response_logits) if head is None else head(hidden)
        logps.append(target_logprobs(logits, part.ids.reshape(-1)[positions]))
        sequences.append(torch.div(positions, r, rounding_mode="floor") + offset)  # row of each scored position
        if with_hidden:
            hiddens.append(hidden)
        offset += len(rows)
    return TokenLogprobs(torch.cat(logps), torch.cat(sequences), offset, torch.cat(hiddens) if with_hidden else None)


@torch.no_grad()
def sharing_matches_padding(model: torch.nn.Module, shared: SharedPrompt, parts: list[Batch], atol: float = 1e-3) -> Agreement | bool:
    """Truthy when the shared-prompt pass agrees with padded passes (the model honours a cache and position ids in training).

    A model the pass cannot run on at all (its forward takes no cache, or keeps none) fails the check too.
    """
    with evaluating(model):
        try:
            got = shared_prompt_token_logprobs(model, shared).sums()
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            return False
        return agrees_with_padding(model, got, parts, atol)
