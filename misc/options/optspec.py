"""Options declared as typed config fields: each field of an option-bearing config (misc/options/configs.py) carries its
help, its group and its allowed values; opts.py generates argparse from them and checks every value once, at parse
time. Torch-free: --help stays light.

    rnn_size: int = option(1024, 'd_ff: the feed-forward inner size', MODEL, at_least(1))

A check is a small object: ok(value) -> bool, `text` (what is allowed, for the one-line error), and `bad` / `good`
(a refused and a boundary value that is accepted: tests/test_option_ranges.py runs them for every option).
"""
import dataclasses
import math
import re

# The groups of --help, in the order a user thinks in (the same in every entry point).
DATA = 'data'
MODEL = 'model'
TRAINING = 'training'
SELF_CRITICAL = 'self-critical and distillation'
CHECKPOINTS = 'checkpoints'
EVALUATION = 'evaluation'
DECODING = 'decoding'
DEVICES = 'devices and speed'
INERT = 'reference options accepted but inert'
GROUPS = (DATA, MODEL, TRAINING, SELF_CRITICAL, CHECKPOINTS, EVALUATION, DECODING, DEVICES, INERT)
GROUP_DESCRIPTIONS = {
    DATA: 'input files and how they are read (data/README.md)',
    MODEL: "the model's hyper-parameters (saved with the run; eval.py takes them from the checkpoint's infos)",
    TRAINING: 'optimisation and schedule',
    SELF_CRITICAL: 'self-critical training (rewards) and word-level distillation',
    CHECKPOINTS: 'where the run is saved, how often, and resuming',
    EVALUATION: 'validation and evaluation: metrics, references and outputs',
    DECODING: 'how captions are decoded (eval.py, and validation during training)',
    DEVICES: 'devices, precision and speed paths (none changes the results beyond float rounding)',
    INERT: "they change nothing, as in the reference's transformer model",
}


class Check:
    """Allowed values of one option. fn(value) -> bool; text: 'must be ...'; bad/good: examples for the tests."""

    def __init__(self, fn, text, bad, good):
        self.fn, self.text, self.bad, self.good = fn, text, bad, good

    def ok(self, value):
        try:
            return bool(self.fn(value))
        except (TypeError, ValueError):
            return False


def _finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low):
    return Check(lambda v: _finite(v) and v >= low, f'must be >= {low}', low - 1, low)


def greater_than(low):
    bad = low if isinstance(low, int) else low
    good = low + 1 if isinstance(low, int) else (low + 1e-6 if low == 0 else low * 1.000001)
    return Check(lambda v: _finite(v) and v > low, f'must be > {low:g}', bad, good)


def in_range(low, high, high_open=True):
    """[low, high) (or [low, high] with high_open=False)."""
    close = ')' if high_open else ']'
    return Check(lambda v: _finite(v) and low <= v and (v < high if high_open else v <= high),
                 f'must be in [{low}, {high}{close}', high if high_open else high + 1, low)


def minus_one_or_at_least(low, meaning='no limit'):
    return Check(lambda v: _finite(v) and (v == -1 or v >= low), f'must be -1 ({meaning}) or >= {low}',
                 -2 if low > 0 else -2, -1)


def one_of(*values):
    shown = ', '.join("''" if v == '' else str(v) for v in values)
    bad = next(x for x in ('bogus', 7, 3, -1) if x not in values and type(x) is type(values[0]))
    return Check(lambda v: v in values, f'must be one of {shown}', bad, values[-1])


def boolean():
    return one_of(0, 1)


def multiple_of(step, low):
    return Check(lambda v: _finite(v) and v >= low and v % step == 0,
                 f'must be a multiple of {step} (the attention heads) and >= {low}', low + step // 2 + 1, low)


def matches(pattern, text, bad, good):
    regex = re.compile(pattern)
    return Check(lambda v: isinstance(v, str) and regex.fullmatch(v) is not None, text, bad, good)


# Explicitly any value: paths (checked where they are opened), names, and the reference's inert options.
ANY_PATH = Check(lambda v: True, 'a path (checked where it is opened)', None, 'x')
ANY_NAME = Check(lambda v: True, 'any name', None, 'x')
ANY_VALUE = Check(lambda v: True, 'any value (inert, as in the reference)', None, None)
UNCHECKED = (ANY_PATH, ANY_NAME, ANY_VALUE)


def option(default, help, group, check, *, flag_type=None, action=None, nargs=None, when=None):
    """A config field that is a command-line option --<field name>: its default, help, group and allowed values.
    flag_type: argparse's type when it is not the annotation's (e.g. str2bool); action: 'store_true';
    when: (predicate on the parsed options, text): the check applies only then (an option that is inert otherwise
    stays accepted at any value, as in the reference)."""
    return dataclasses.field(default=default, metadata={
        'help': help, 'group': group, 'check': check, 'flag_type': flag_type, 'action': action, 'nargs': nargs,
        'when': when})


def option_fields(config_class):
    """The fields of config_class that are options (declared with option())."""
    return [f for f in dataclasses.fields(config_class) if 'help' in f.metadata]


def check_value(name, value, check):
    """None when allowed, else the one-line refusal naming the flag, the value and what is allowed."""
    if check.ok(value):
        return None
    shown = repr(value) if isinstance(value, str) else value
    return f'--{name} {shown}: {check.text}'


def checked(args, **checks):
    """A script's parsed args, each named option checked (its one-line refusal: SaticError); returns args.
    e.g. `return checked(p.parse_args(argv), max_length=at_least(1))`."""
    from misc.errors import SaticError
    for name, check in checks.items():
        problem = check_value(name, getattr(args, name), check)
        if problem:
            raise SaticError(problem)
    return args
