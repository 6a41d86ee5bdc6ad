"""Attention masks for the decoder: the causal mask and SATIC's group (block) mask.

All masks are boolean, True = may attend. A group mask lets position i see every position of its own K-word
group and of the groups before it; K = 1 is the ordinary causal mask.
"""
import functools

import torch


@functools.lru_cache(maxsize=64)
def _group_mask(size, k, device):
    """Built once per (size, K, device): no host-to-device copy at each training step or decoding step."""
    i = torch.arange(size, device=device).unsqueeze(1)  # (T, 1) query positions
    j = torch.arange(size, device=device).unsqueeze(0)  # (1, T) key positions
    return (j < (i // k + 1) * k).unsqueeze(0)  # (1, T, T)


def group_mask(size, k, device=None):
    """(1, T, T) with m[i, j] = (j < (i // K + 1) * K): each group sees itself and all earlier groups."""
    return _group_mask(size, k, torch.device('cpu' if device is None else device))


def subsequent_mask(size, device=None):
    """(1, T, T) causal mask: position i sees positions 0..i (the group mask with K = 1)."""
    return group_mask(size, 1, device)


def target_mask(tokens, k):
    """Training mask for the shifted target tokens (S, T) -> (S, T, T).

    Key padding (token > 0; position 0 always visible, so no row is empty) AND the group mask.
    """
    # reference quirk: only position 0 of the K start zeros is visible as a key while training (the other K-1
    # are zeros, hence "padding"), whereas decoding sees all K; kept because the checkpoints were trained so.
    keys = tokens > 0
    keys[:, 0] = True
    return keys.unsqueeze(-2) & group_mask(tokens.size(1), k, tokens.device)  # (S, T, T)


class Packing:
    """The real positions of a zero-padded (B, N) batch, to run per-position layers on them only.

    Per-position work (layer norms, projections, FFN) runs on the M real rows, packed as (M, C); `pad` scatters
    them into the padded (B, N, C) layout for attention (zeros at padding), `unpad` gathers them back.
    attn_mask (B, 1, 1, N) boolean (True = a real region) or None when every position is real.

    groups (see `grouped`): when region counts vary a lot, attention runs per group of images of similar counts,
    each group padded to its own longest image only (a batch of 10-100 regions pads to about 2/3 of the area);
    each group is a Packing of its images with `rows` (its images' rows among the M) and `images` (their indices).
    """

    def __init__(self, valid=None, batch=None, length=None, index=None, attn_mask=None, count=None):
        """valid (B, N) boolean, with count its number of True when the caller knows it (then finding them needs
        no host read); or batch and length, with every position real or the given index and attn_mask (the parts
        of another Packing, e.g. inside a compiled function)."""
        if valid is None:
            self.batch, self.length = batch, length
            self.index, self.attn_mask = index, attn_mask
        else:
            self.batch, self.length = valid.shape
            flat = valid.reshape(-1)
            index = flat.nonzero() if count is None else flat.nonzero_static(size=count)
            self.index = index.squeeze(1)  # (M,) into the flattened (B*N)
            self.attn_mask = valid[:, None, None, :]  # (B, 1, 1, N)
        self.groups = None
        self.rows = self.images = None  # set on the groups of a grouped Packing
        self._query_rows = {}

    def grouped(self, max_groups=4, min_saving=0.15, min_batch=8):
        """Split the images into up to max_groups groups of similar extent (last real position + 1), contiguous
        in the order of extents, when that saves at least min_saving of the padded attention area; returns self.

        The attention of an image sees exactly its own real regions either way (same numbers, to rounding)."""
        if self.index is None or self.batch < min_batch:
            return self
        valid = self.attn_mask.view(self.batch, self.length)
        extent = (valid * torch.arange(1, self.length + 1, device=valid.device)).amax(1)  # (B,)
        order = torch.argsort(extent, descending=True, stable=True)
        ext = extent[order].tolist()
        best, best_area = None, self.batch * self.length * (1 - min_saving)
        for count in range(2, max_groups + 1):
            bounds = [round(i * self.batch / count) for i in range(count + 1)]
            area = sum((hi - lo) * ext[lo] for lo, hi in zip(bounds, bounds[1:])) * (1 + 0.02 * count)
            if area < best_area:
                best, best_area = bounds, area
        if best is None:
            return self
        counts = valid.sum(1)  # (B,) real regions per image
        starts = torch.cumsum(counts, 0) - counts  # (B,) first packed row of each image
        groups = []
        for lo, hi in zip(best, best[1:]):
            images = order[lo:hi].sort().values  # (b_g,) in batch order
            length = ext[lo]
            group = Packing(valid[images, :length])
            lens = counts[images]
            image_of_row = torch.repeat_interleave(torch.arange(len(images), device=valid.device), lens)
            offset = torch.arange(int(lens.sum()), device=valid.device) - (torch.cumsum(lens, 0) - lens)[image_of_row]
            group.rows = starts[images][image_of_row] + offset  # (M_g,) among the M packed rows
            group.images = images
            groups.append(group)
        self.groups = groups
        return self

    def query_rows(self, rows_per_image):
        """A group's rows among S = B * rows_per_image decoding rows (an image's rows one after the other); built
        once per rows_per_image value (decoding asks at every step and layer)."""
        if rows_per_image == 1:
            return self.images
        rows = self._query_rows.get(rows_per_image)
        if rows is None:
            offsets = torch.arange(rows_per_image, device=self.images.device)
            rows = (self.images.unsqueeze(1) * rows_per_image + offsets).reshape(-1)
            self._query_rows[rows_per_image] = rows
        return rows

    def pad(self, x):
        """(M, C) -> (B, N, C), zeros at padding."""
        if self.index is None:
            return x.view(self.batch, self.length, x.size(-1))
        out = x.new_zeros(self.batch * self.length, x.size(-1))  # in place into fresh zeros: no second copy
        return out.index_copy_(0, self.index, x).view(self.batch, self.length, x.size(-1))

    def unpad(self, x):
        """(B, N, ...) -> (M, prod(...)): the real positions' rows."""
        x = x.reshape(self.batch * self.length, -1)
        return x if self.index is None else x.index_select(0, self.index)

    @property
    def memory_mask(self):
        """(B, 1, N) boolean or None: the mask SATModel.encode returns."""
        return None if self.attn_mask is None else self.attn_mask.squeeze(1)
