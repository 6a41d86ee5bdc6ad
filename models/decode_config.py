"""How to decode: one typed config for `SATModel.decode` (models.decoding.generate), every search, and its one
validation (`__post_init__`, and `check_vocabulary` against a model's vocabulary).

Its fields are the decoding options; each says how a value from outside is read (`convert` in its metadata), so
`DecodeConfig.from_values` builds it from resolved command-line options (opts.decode_config) and
`DecodeConfig.from_reference_opt(opt)` from the reference's `opt` dict of `model(..., opt=opt, mode='sample')`,
refusing keys it does not know, so a misspelt or unsupported option is never silently ignored.

Each option is defined per token position (docs/reproducibility.md, "Decoding options and the reference"; models.logits_processors); for K = 1 every
definition is the reference's. For K > 1 the K words of a group come from one forward pass but are chosen in
order, so a position's constraint sees the words already chosen before it, earlier positions of its own group
included.
"""
import dataclasses

from misc.options.configs import DecodingOptions
from models.search import length_penalty_fn

# Keys of the reference's opt dict read beside the fields: 'remove_bad_endings' is a post-processing of the decoded
# strings (misc.utils.decode_sequence), so the model accepts the key and leaves the tokens alone; 'seq_per_img' is
# ours (rows per image of att_feats).
CALL_KEYS = ('remove_bad_endings', 'seq_per_img')


def _optional(convert):
    return lambda value: None if value is None else convert(value)


def _text(value):
    return value or ''


def option(default, convert):
    """A DecodeConfig field whose outside value (an option, a reference key) is read with convert(value)."""
    return dataclasses.field(default=default, metadata={'convert': convert})


@dataclasses.dataclass(frozen=True)
class _DecodeFields:
    """sample_max: argmax (True) or multinomial sampling at `temperature` (beam_size 1 only);
    beam_size > 1: beam search, split into `group_size` diverse groups of beam_size // group_size beams, a word
    chosen by an earlier group at the same position costing `diversity_lambda` per occurrence;
    decoding_constraint: a word may not repeat the word just before it (greedy, sampling and beams);
    block_trigrams: the reference's soft trigram penalty (greedy and sampling, as the reference);
    max_length: None for the model's own; use_cache: None for the model's own;
    length_penalty '', 'wu_a', 'avg_a': the score of a finished hypothesis, every search (beam search ranks by it;
    a width-one search's one path per row is scored, never changed: models.search)."""
    sample_max: bool = option(True, bool)
    beam_size: int = option(1, int)
    temperature: float = option(1.0, float)
    max_length: int = option(None, _optional(int))
    use_cache: bool = option(None, _optional(bool))
    length_penalty: str = option('', _text)
    group_size: int = option(1, int)
    diversity_lambda: float = option(0.5, float)
    decoding_constraint: bool = option(False, bool)
    block_trigrams: bool = option(False, bool)

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

    def check_vocabulary(self, vocab_size):
        """ValueError when a beam group asks for more beams than the vocabulary's vocab_size + 1 entries (each beam
        proposes that many words)."""
        if self.beam_size > 1 and self.beams_per_group > vocab_size + 1:
            raise ValueError(f'beam_size {self.beam_size} (group_size {self.group_size}: {self.beams_per_group} beams '
                             f'per group) is larger than the {vocab_size + 1} entries of the vocabulary: use a '
                             'smaller beam_size')

    @classmethod
    def option_names(cls):
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values):
        """From a mapping holding (some of) the fields, each read by its field's convert; other keys are ignored,
        missing fields keep their defaults."""
        return cls(**{field.name: field.metadata['convert'](values[field.name])
                      for field in dataclasses.fields(cls) if field.name in values})

    @classmethod
    def from_reference_opt(cls, opt):
        """The reference's opt dict -> (DecodeConfig, seq_per_img). Unknown keys raise ValueError. (opt: the
        reference's sample-mode dict of SATModel.forward(..., opt={...}, mode='sample'), named as there; not a
        Namespace.)"""
        opt = dict(opt or {})
        known = cls.option_names() + CALL_KEYS
        unknown = sorted(set(opt) - set(known))
        if unknown:
            raise ValueError(f"unknown decoding option(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return cls.from_values(opt), int(opt.get('seq_per_img', 1))


def _further_options(options=DecodingOptions):
    """(name, type, field) of every decoding option of the command line (misc.options.configs.DecodingOptions)
    that _DecodeFields does not declare, read with its option's type: a new per-token option is its option line
    plus its step class (models.logits_processors), and the step reads it from the config under its own name."""
    declared = {field.name for field in dataclasses.fields(_DecodeFields)} | set(CALL_KEYS)
    return [(field.name, field.type, option(field.default, field.type))
            for field in dataclasses.fields(options) if field.name not in declared]


DecodeConfig = dataclasses.make_dataclass('DecodeConfig', _further_options(), bases=(_DecodeFields,), frozen=True)
DecodeConfig.__module__, DecodeConfig.__doc__ = __name__, _DecodeFields.__doc__
