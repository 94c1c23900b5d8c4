"""What a model with activation compression stores, per residual block, for the memory planner.

The uncompressed profile's meta-device forwards (``profile.py``, one per probe batch) also record
(``records.py``), for every tensor saved for backward (parameters and their copies left out, as the meter leaves
them out), what decides how :class:`~resnet_scale.memory.compression.CompressSaved` stores it: its
identity and version (a tensor saved twice is stored once), storage, elements, dtype, whether it is a
ReLU output (1-bit mask), whether it is quantized (floating, dense) and the integer dtype it narrows
to (max-pool indices). From these records, at any micro-batch and for any mode and checkpointing
policy, with no further forward:

* saved = the stored size of each distinct tensor the compressed forward keeps -- with
  checkpointing the stem and head's and each segment's input (the checkpoint saves its input
  through the same hooks) plus the 1-bit decision mask of every ReLU call inside a segment
  (``memory/relu_decisions.py``; one the compression stores with a mask anyway is shared), without,
  every block's too: quantized ones
  (:func:`~resnet_scale.memory.compression.packed_nbytes`), narrowed ones, and the others as they
  are (by storage, as the meter counts them). Elements scale linearly between the two probes;
  the ``min_numel`` threshold and the group padding are applied at the micro-batch itself, so
  the figure is exact at every batch size, not only linear ones.
* restore transient = what the backward pass holds while restoring the two largest of those
  tensors (:func:`~resnet_scale.memory.compression.restore_peak_bytes`: the tensor at full size
  plus the temporaries of one restore chunk; a narrowed one: its original size). One backward node
  restores at most two saved activations (max-pool: its input and its indices; convolution,
  BatchNorm, ReLU, pooling: one), and frees them when it finishes. With checkpointing the
  restored segment input stays alive while its segment is recomputed (the recompute peak, which
  is uncompressed: a recomputation saves plainly): it is one of the tensors counted here.
* quantized elements = what the time model charges for quantizing and restoring.

Equal, to the byte, to ``measure_saved_activation_bytes`` of the compressed model with that policy
(tests/test_planner_compression.py).
"""

from __future__ import annotations

import functools

from resnet_scale.memory.compression import (
    COMPRESSION_MODES,
    MIN_COMPRESS_NUMEL,
    packed_nbytes,
    restore_peak_bytes,
)
from resnet_scale.memory.relu_decisions import mask_nbytes
from resnet_scale.planner.profile import (
    ModelKey,
    _policy_bytes,
    _profiles,
    _segments,
    activation_bytes,
    probe_line,
)
from resnet_scale.planner.records import SavedRecord

__all__ = ["compressed_activation_bytes"]


def _evaluate(pairs, bits: int, b: int, recompute: dict[int, int],
              masks: dict[int, int] | None = None) -> tuple[int, int, int]:
    """(stored bytes, restore transient, quantized elements) at micro-batch ``b`` of the distinct
    tensors in ``pairs`` (each (record at probe 1, record at probe 2)).

    The transient is found by walking the backward pass: it visits the saved tensors in reverse
    forward order; a tensor's stored form is freed once the first layer (in forward order) that
    saved it is done, so at tensor j what is alive is everything first saved at or before j, plus
    the restored forms of j and of the tensor saved just before it in the forward, if that is in
    the set (one layer's two: max-pool's input and indices), plus ``recompute[j]`` (the recompute peak of the segment whose input j is).
    ``masks[j]``: the ReLU decision masks of the segment whose input j is, stored from j's save on.
    The transient is the largest such sum less the stored bytes (never negative)."""
    masks = dict(masks or {})
    stored: dict[tuple, int] = {}
    events = []  # (seq, key, stored bytes, restore bytes)
    elements: dict[tuple, int] = {}
    for r1, r2 in pairs:
        n = probe_line(r1.numel, r2.numel, b)
        if r1.quantized and n >= MIN_COMPRESS_NUMEL:
            key, size, restore = ("pack", r1.pack), packed_nbytes(n, bits, r1.mask), restore_peak_bytes(n, r1.dtype)
            elements[key] = n
        elif r1.narrow_itemsize and n >= MIN_COMPRESS_NUMEL:
            key, size, restore = ("pack", r1.pack), n * r1.narrow_itemsize, n * r1.itemsize
        else:
            key, size, restore = ("storage", r1.storage), probe_line(r1.nbytes, r2.nbytes, b), 0
        stored[key] = size
        events.append((r1.seq, key, size, restore + recompute.get(r1.seq, 0)))
    total, alive, seen, peak, previous = sum(stored.values()) + sum(masks.values()), 0, set(), 0, (-2, 0)
    for seq, key, size, restore in sorted(events, key=lambda e: e[0]):
        if key not in seen:
            seen.add(key)
            alive += size
        alive += masks.pop(seq, 0)
        peak = max(peak, alive + restore + (previous[1] if previous[0] == seq - 1 else 0))
        previous = (seq, restore)
    return total, max(0, peak - total), sum(elements.values())


def _segment_masks(p1, p2, segment: list[int], micro_batch: int, masked: set[int]) -> int:
    """Bytes of the ReLU decision masks a checkpointed ``segment`` records in a compressed forward
    (``memory/relu_decisions.py``): one per ReLU call in its blocks, i.e. per distinct ReLU output
    saved there, except its own input (an earlier ReLU's output) and those the compression stores
    with a mask anyway (``masked``: the segment's output, saved by the next segment or the head),
    whose mask is shared."""
    skip = masked | {p1.records_inputs[segment[0]].pack}
    sizes: dict[int, int] = {}
    for i in segment:
        for r1, r2 in zip(p1.records_blocks[i], p2.records_blocks[i]):
            if r1.mask and r1.pack not in skip:
                sizes[r1.pack] = mask_nbytes(probe_line(r1.numel, r2.numel, micro_batch))
    return sum(sizes.values())


@functools.lru_cache(maxsize=4096)
def compressed_activation_bytes(key: ModelKey, image_size: int, precision: str, channels_last: bool,
                                policy: str, micro_batch: int, compression: str) -> tuple[int, int, int, int]:
    """(saved, recompute peak, restore transient, quantized elements) of one micro-batch of the model
    ``key`` under activation ``compression`` and checkpointing ``policy`` (module docstring). The
    recompute peak is the uncompressed one (``profile.activation_bytes``)."""
    bits = COMPRESSION_MODES[compression]
    _, peak = activation_bytes(key, image_size, precision, channels_last, policy, micro_batch)
    p1, p2 = _profiles(key, image_size, precision, channels_last)
    segs = _segments(key, policy)
    per_segment = _policy_bytes(key, image_size, precision, channels_last, policy)[1]
    # the recompute peak of each segment, at its input's record; the estimate adds the largest
    # (``peak``) on top of everything, so only what exceeds it counts here
    recompute = {p1.records_inputs[s[0]].seq: probe_line(*k, micro_batch) - peak
                 for s, k in zip(segs, per_segment)}

    def chosen(p) -> list[SavedRecord]:
        out = list(p.records_outside)
        if segs:
            out += [p.records_inputs[s[0]] for s in segs]
        else:
            for block in p.records_blocks:
                out += block
        return out

    pairs = list(zip(chosen(p1), chosen(p2)))
    masked = {r1.pack for r1, r2 in pairs
              if r1.quantized and r1.mask and probe_line(r1.numel, r2.numel, micro_batch) >= MIN_COMPRESS_NUMEL}
    masks = {p1.records_inputs[s[0]].seq: _segment_masks(p1, p2, s, micro_batch, masked) for s in segs}
    saved, restore, elements = _evaluate(pairs, bits, micro_batch, recompute, masks)
    return saved, peak, restore, elements

