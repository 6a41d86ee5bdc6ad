"""How to decode: one typed config for `SATModel.decode`, greedy/sampling and beam search.

`DecodeConfig.from_reference_opt(opt)` reads the reference's `opt` dict of `model(..., opt=opt, mode='sample')`
and refuses keys it does not know, so a misspelt or unsupported option is never silently ignored.

Each option is defined per token position (README, "Decoding options"); for K = 1 every definition is the
reference's. For K > 1 the K words of a group come from one forward pass but are chosen in order, so a position's
constraint sees the words already chosen before it, earlier positions of its own group included.
"""
import dataclasses

from models.beam_search import length_penalty_fn

# Keys of the reference's decoding opt dict that this project reads (README, "Decoding options").
# 'remove_bad_endings' is a post-processing of the decoded strings (misc.utils.decode_sequence), so the model
# accepts the key and leaves the tokens alone; 'seq_per_img' is ours (rows per image of att_feats).
REFERENCE_KEYS = ('sample_max', 'beam_size', 'temperature', 'max_length', 'use_cache', 'length_penalty',
                  'group_size', 'diversity_lambda', 'decoding_constraint', 'block_trigrams', 'remove_bad_endings',
                  'seq_per_img')


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """sample_max: argmax (True) or multinomial sampling at `temperature` (beam_size 1 only);
    beam_size > 1: beam search, split into `group_size` diverse groups of beam_size // group_size beams, a word
    chosen by an earlier group at the same position costing `diversity_lambda` per occurrence;
    decoding_constraint: a word may not repeat the word just before it (greedy, sampling and beams);
    block_trigrams: the reference's soft trigram penalty (greedy and sampling, as the reference);
    max_length: None for the model's own; use_cache: None for the model's own; length_penalty '', 'wu_a', 'avg_a'."""
    sample_max: bool = True
    beam_size: int = 1
    temperature: float = 1.0
    max_length: int = None
    use_cache: bool = None
    length_penalty: str = ''
    group_size: int = 1
    diversity_lambda: float = 0.5
    decoding_constraint: bool = False
    block_trigrams: bool = False

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f'beam_size must be >= 1 (got {self.beam_size})')
        if self.group_size < 1 or (self.beam_size > 1 and self.group_size > self.beam_size):
            raise ValueError(f'group_size must be between 1 and beam_size {self.beam_size} (got {self.group_size})')
        if not self.sample_max and self.temperature <= 0:
            raise ValueError(f'temperature must be > 0 for sampling (got {self.temperature})')
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f'max_length must be >= 1 (got {self.max_length})')
        length_penalty_fn(self.length_penalty)  # raises on a malformed spec

    @property
    def beams_per_group(self):
        return self.beam_size // self.group_size

    @classmethod
    def from_reference_opt(cls, opt):
        """The reference's opt dict -> (DecodeConfig, seq_per_img). Unknown keys raise ValueError."""
        opt = dict(opt or {})
        unknown = sorted(set(opt) - set(REFERENCE_KEYS))
        if unknown:
            raise ValueError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(REFERENCE_KEYS)}")
        config = cls(sample_max=bool(opt.get('sample_max', 1)), beam_size=int(opt.get('beam_size', 1)),
                     temperature=float(opt.get('temperature', 1.0)),
                     max_length=None if opt.get('max_length') is None else int(opt['max_length']),
                     use_cache=None if opt.get('use_cache') is None else bool(opt['use_cache']),
                     length_penalty=opt.get('length_penalty', '') or '',
                     group_size=int(opt.get('group_size', 1)),
                     diversity_lambda=float(opt.get('diversity_lambda', 0.5)),
                     decoding_constraint=bool(opt.get('decoding_constraint', 0)),
                     block_trigrams=bool(opt.get('block_trigrams', 0)))
        return config, int(opt.get('seq_per_img', 1))
