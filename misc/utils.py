"""Small pure helpers shared by training and evaluation."""

import torch

from misc.errors import SaticError


# --remove_bad_endings: words a caption should not end with (the reference's list).
BAD_ENDINGS = ('with', 'in', 'on', 'of', 'a', 'at', 'to', 'for', 'an', 'this', 'his', 'her', 'that', 'the')


def decode_sequence(ix_to_word, seq, remove_bad_endings=False):
    """Token ids -> captions. seq: (B, T) ids; a caption stops at its first 0. Returns a list of B strings.

    remove_bad_endings: drop the trailing words of BAD_ENDINGS (a caption made only of them is kept whole).
    """
    captions = []
    for row in seq.tolist() if torch.is_tensor(seq) else seq:
        words = []
        for ix in row:
            ix = int(ix)
            if ix == 0:
                break
            words.append(ix_to_word[str(ix)])
        if remove_bad_endings:
            keep = len(words)
            while keep > 0 and words[keep - 1] in BAD_ENDINGS:
                keep -= 1
            words = words[:keep] or words
        captions.append(' '.join(words))
    return captions


def resolve_device(name=''):
    """'' or 'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if not name or name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SaticError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def synchronize(device):
    """Wait for queued GPU work so that wall-clock timings cover it."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def to_device(batch, device):
    """Move the tensors of a loader batch to device; other entries are returned as they are. The copies are
    asynchronous (non_blocking) when the loader pinned the tensors (DataLoader(pin_memory=True), for CUDA)."""
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast(device_type, bf16=False, fp16=False):
    """torch.autocast for --bf16 / --fp16 (a no-op context without either)."""
    return torch.autocast(device_type, dtype=torch.float16 if fp16 else torch.bfloat16, enabled=bool(bf16 or fp16))


def format_duration(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
