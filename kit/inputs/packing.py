"""Packing: a training batch's samples concatenated into rows of up to max_length tokens, with no attention
across samples and the same loss per token as the padded batch.

What a step is does not change: the trainer's sampler still draws per_device_train_batch_size samples per
micro-batch (seeded, shuffled), and the collator packs those samples into as few rows as fit, greedy first-fit
by length. So max_steps, num_train_epochs, warmup, checkpoints and the loss of each optimizer step
mean what they meant without packing; what goes is the padding of every sample up to the longest one.
Within a micro-batch the order of samples changes nothing (its loss is one sum over all of them), so rows are
filled first-fit decreasing (longest sample first: fewer, fuller rows), and each row keeps its samples in the
sampler's order; the order across steps stays the sampler's random one.

A packed row holds whole samples only (never part of an image or of an answer). Each sample keeps its own
positions: the model's own rope-index function gives its 3-D (temporal, height, width) positions from 0, and a
fourth, text-only row restarting at 0 for each sample is put in front, as transformers' packed `position_ids`
(4 x rows x length for the Qwen VL models). Without an attention mask, transformers reads the restarts as
sample boundaries: a block-diagonal causal mask through sdpa/eager, varlen kernels for flash attention (which
take one flat row, so for them every sample goes into a single row).

A micro-batch whose rows, padded to the longest, would compute as many positions as padding its samples
(samples too long to share a row) is left padded: the same loss either way. The tail of a row shorter than
the batch's longest is padding: its own sequence (text positions from 0), label
-100, and 3-D positions of -1, the mark `real_tokens` counts by. A sample's first label is -100 too: in a packed
row the token before it is the previous sample's last, which must not learn to predict it.
"""

import torch

from kit.errors import UserError

IGNORE = -100
PAD_POSITION = -1  # the 3-D rope position of row padding: never attended by a real token, never in the loss
# What the processor puts beside each image / video, in the order of their tokens: (token type in
# mm_token_type_ids, pixels key, grid key, per-item keys that follow the grid's order)
MODALITIES = ((1, "pixel_values", "image_grid_thw", ()),
              (2, "pixel_values_videos", "video_grid_thw", ("second_per_grid_ts",)))
PER_TOKEN = ("input_ids", "labels", "mm_token_type_ids")
KNOWN = {"attention_mask", "use_cache", *PER_TOKEN, *(k for _, p, g, extra in MODALITIES for k in (p, g, *extra))}


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity`: each item, in order, goes into the first row with room
    (a new row when none has). Items keep their relative order within a row. An item longer than capacity gets
    a row of its own (the collator refuses such samples before this)."""
    rows, room = [], []
    for index, length in enumerate(lengths):
        for row, free in enumerate(room):
            if length <= free:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(capacity - length)
    return rows


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most `capacity` tokens: first-fit decreasing (the longest first, each into
    the first row with room), then each row in index order and the rows by their first index."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows = [sorted(order[j] for j in row) for row in first_fit([lengths[i] for i in order], capacity)]
    return sorted(rows)


def rope_module(model):
    """The module of `model` (a bare model, a PeftModel, an Unsloth one) that computes its rope positions."""
    found = next((m for m in model.modules() if callable(getattr(m, "get_rope_index", None))), None)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no get_rope_index: packing needs the model's own 3-D "
                         "positions (a Qwen VL model); set packing=false")
    return found


def for_model(model, recipe: dict, pad_token_id: int):
    """The Packer for this model when the recipe packs, else None."""
    if not recipe["packing"]:
        return None
    from kit import families

    family = families.of_model_type(model.config.model_type)
    if not family.packs:
        raise UserError(f"packing=true: {family.name} carries state across a packed row's samples (its linear "
                        "attention), so packed samples would see each other; set packing=false for this model")
    module = rope_module(model)
    attention = str(getattr(model.config, "_attn_implementation", "") or "")
    return Packer(module.get_rope_index, module.config.vision_config.spatial_merge_size, recipe["max_length"],
                  pad_token_id, one_row="flash" in attention)


class Packer:
    """A padded training batch (the VisionCollator's, right-padded, labels masked) -> the same samples packed.

    `rope_index` is the model's get_rope_index (the family's own 3-D positions); `merge_size` its vision
    merge (patches per token side), to tell which images belong to which sample."""

    def __init__(self, rope_index, merge_size: int, max_length: int, pad_token_id: int, one_row: bool = False):
        self.rope_index, self.merge_size, self.max_length = rope_index, merge_size, max_length
        self.pad_token_id, self.one_row = pad_token_id, one_row

    def __call__(self, batch) -> dict:
        unknown = set(batch) - KNOWN
        if unknown:  # a key we do not know how to reorder would silently pair images with the wrong samples
            raise ValueError(f"cannot pack a batch with {', '.join(sorted(unknown))}; set packing=false")
        mask = batch["attention_mask"].bool()
        lengths = mask.sum(dim=1).tolist()
        extra = {k: batch[k] for _, _, g, more in MODALITIES for k in (g, *more) if k in batch}
        positions, _ = self.rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                       attention_mask=batch["attention_mask"], **extra)
        rows = [list(range(len(lengths)))] if self.one_row else pack_rows(lengths, self.max_length)
        width = max(sum(lengths[i] for i in row) for row in rows)
        if len(rows) * width >= mask.numel() and not self.one_row:
            # rows padded to the longest would compute as many positions as the padded batch (samples too long
            # to share a row): it is the same loss, so it goes as it is
            return batch
        out = {key: torch.full((len(rows), width), fill, dtype=batch[key].dtype)
               for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE), ("mm_token_type_ids", 0))}
        position_ids = torch.full((4, len(rows), width), PAD_POSITION, dtype=positions.dtype)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = lengths[i]
                for key in PER_TOKEN:
                    out[key][r, at:at + n] = batch[key][i, mask[i]]
                out["labels"][r, at] = IGNORE  # predicted by the previous sample's last token otherwise
                position_ids[0, r, at:at + n] = torch.arange(n)
                position_ids[1:, r, at:at + n] = positions[:, i, mask[i]]
                at += n
            position_ids[0, r, at:] = torch.arange(width - at)  # padding: a sequence of its own
        out["position_ids"] = position_ids
        # A cache makes transformers skip reading sample boundaries from position_ids (it would attend across
        # samples); training never uses one, but the model's config defaults to it
        out["use_cache"] = False
        order = [i for row in rows for i in row]
        for token_type, pixels, grid, more in MODALITIES:
            if grid in batch:
                out.update(self.reorder(batch, order, token_type, pixels, grid, more))
        return out

    def reorder(self, batch, order: list[int], token_type: int, pixels: str, grid: str, more) -> dict:
        """The pixels and grids of one modality in the order of the packed samples (the order their tokens
        now come in, which is how the model pairs features with placeholders)."""
        grids = batch[grid]
        patches = grids.prod(dim=1)
        tokens = (patches // self.merge_size**2).tolist()
        starts = [0, *torch.cumsum(patches, 0).tolist()]
        counts = (batch["mm_token_type_ids"] == token_type).sum(dim=1).tolist()
        items, next_item = [], 0  # items[i]: the grid rows of sample i
        for count in counts:
            first = next_item
            while count > 0:
                count -= tokens[next_item]
                next_item += 1
            items.append(range(first, next_item))
        picked = [item for i in order for item in items[i]]
        out = {pixels: torch.cat([batch[pixels][starts[j]:starts[j + 1]] for j in picked]) if picked
               else batch[pixels][:0], grid: grids[picked]}
        for key in more:
            if key in batch:
                out[key] = batch[key][picked]
        return out


def real_tokens(batch) -> int:
    """Tokens that are not padding, in a padded batch (attention_mask) or a packed one (position mark)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["position_ids"][1] != PAD_POSITION).sum())


def padding_fraction(lengths: list[int], batch_size: int, max_length: int, packed: bool, seed: int = 0) -> float:
    """The share of positions a run computes on padding, with samples drawn in a seeded random order into
    micro-batches of `batch_size`: padded to the longest sample, or packed into rows (padded to the longest)."""
    import random

    order = list(lengths)
    random.Random(seed).shuffle(order)
    computed = 0
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        padded = len(chunk) * max(chunk)
        rows = pack_rows(chunk, max_length) if packed else [[i] for i in range(len(chunk))]
        computed += min(padded, len(rows) * max(sum(chunk[i] for i in row) for row in rows))
    return 1 - sum(order) / computed if computed else 0.0


def worst_rows(batch_size: int, max_tokens: int, max_length: int) -> tuple[int, int]:
    """(rows, row length) of the largest packed micro-batch: `batch_size` samples as long as the longest."""
    rows = first_fit([max_tokens] * batch_size, max_length)
    width = max(len(row) for row in rows) * max_tokens
    # a packing that would compute more than the padded batch is not used (see Packer)
    return (len(rows), width) if len(rows) * width < batch_size * max_tokens else (batch_size, max_tokens)
