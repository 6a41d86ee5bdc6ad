"""Command-line options, generated from the typed configs (misc/options/configs.py: each option's default, type, help,
group and allowed values, declared once) with the reference's names, types and defaults.

`parse_opt()` is train.py's parser; `parse_eval_opt()` is eval.py's / eval_cocotest.py's; eval_ensemble.py adds its
own. Every parser shows the same groups (misc.options.optspec.GROUPS) with each option's default, checks every value
once (a bad one: SaticError, one line naming the flag, the value and what is allowed), and reads `--cfg FILE.yml`
(a recipe: keys are option names; the command line overrides the file). Every reference option is accepted (see
../shared/conformance/reference_options.tsv); options marked "(ours)" are additions whose defaults keep the
reference behaviour, so old infos files keep working (`fill_defaults` gives an old `opt` Namespace the options it
lacks).
"""
import argparse
import os
import sys

from misc.options import optspec
from misc.options.configs import (DataConfig, DecodingOptions, DeviceConfig, EvalConfig, EvaluationConfig,
                          InertReferenceOptions, LossConfig, ModelConfig, OptimConfig, RunConfig, StepConfig,
                          TrainConfig, ValidationConfig, reward_options, str2bool)  # noqa: F401 (str2bool: API)
from misc.errors import SaticError
from misc.files.readers import read_structured

DEFAULT_INIT_FROM = RunConfig.init_from
DEFAULT_REF_JSON = EvaluationConfig.ref_json
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
EVAL_PATHS = ('input_json', 'input_fc_dir', 'input_att_dir', 'input_box_dir', 'input_label_h5')
# eval.py's reference defaults: the author's run. With another --model, the infos beside it and its id are used.
REFERENCE_EVAL_MODEL = EvalConfig.model
REFERENCE_EVAL_INFOS = EvalConfig.infos_path
REFERENCE_EVAL_ID = EvalConfig.id


class OptionParser(argparse.ArgumentParser):
    """argparse with every default shown in --help and its errors as one-line SaticErrors (no usage block)."""

    def __init__(self, **kwargs):
        kwargs.setdefault('formatter_class', argparse.ArgumentDefaultsHelpFormatter)
        kwargs.setdefault('usage', '%(prog)s [-h] [--cfg FILE.yml] [--OPTION VALUE ...]')
        super().__init__(**kwargs)
        self.option_fields = {}  # option name -> its config field (checked after parsing)

    def error(self, message):
        raise SaticError(message)

    def format_help(self):
        groups = self._action_groups
        self._action_groups = [g for g in groups if g._group_actions]  # the groups this entry point has
        try:
            return super().format_help()
        finally:
            self._action_groups = groups



def model_k(opt):
    """K of the model parsed options build: ModelConfig.resolve_k (the K rule's one place) on their caption_model
    and K; applied once, here at the edge, so that everything below reads opt.K."""
    return ModelConfig.resolve_k(opt.caption_model, opt.K)

def _group(parser, name):
    """The argument group `name` of parser; every group of GROUPS made up front, in their order (empty ones are
    not shown)."""
    groups = getattr(parser, '_satic_groups', None)
    if groups is None:
        groups = {group: parser.add_argument_group(group, optspec.GROUP_DESCRIPTIONS[group])
                  for group in optspec.GROUPS}
        parser._satic_groups = groups
    return groups[name]


def add_options(parser, config_class, only=None, defaults=None, groups=None):
    """Add config_class's options (those in `only`, when given) to parser in their groups; defaults: {name: value}
    replacing the config's (e.g. eval.py's data paths default to '', take them from infos); groups: {name: group}
    where an entry point shows an option elsewhere (eval.py's --batch_size is not a training option)."""
    defaults, groups = defaults or {}, groups or {}
    for field in optspec.option_fields(config_class):
        if only is not None and field.name not in only:
            continue
        meta = field.metadata
        shown = meta['check'] not in optspec.UNCHECKED and not meta['action']  # (a flag needs no range)
        text = f"{meta['help']}; {meta['check'].text}" if shown else meta['help']
        kwargs = {'help': text.replace('%', '%%'), 'default': defaults.get(field.name, field.default)}
        if meta['action']:
            kwargs['action'] = meta['action']
        else:
            kwargs['type'] = meta['flag_type'] or field.type
            if meta['nargs']:
                kwargs['nargs'] = meta['nargs']
                kwargs['default'] = list(kwargs['default'])
        _group(parser, groups.get(field.name, meta['group'])).add_argument(f'--{field.name}', **kwargs)
        if hasattr(parser, 'option_fields'):
            parser.option_fields[field.name] = field


def add_cfg_option(parser):
    parser.add_argument('--cfg', type=str, default=None,
                        help='a recipe: YAML file of option names and values (configs/*.yml); the command line '
                             'overrides it')


def check_declared(opt, fields):
    """Every option's declared range or choice set (misc/options/configs.py), once: SaticError naming the first bad
    one."""
    for name, field in fields.items():
        if not hasattr(opt, name):
            continue
        meta = field.metadata
        if meta.get('when') is not None and not meta['when'][0](opt):
            continue
        problem = optspec.check_value(name, getattr(opt, name), meta['check'])
        if problem:
            raise SaticError(problem + (f" ({meta['when'][1]})" if meta.get('when') else ''))


def load_cfg(path, parser):
    """{dest: value} of a recipe file, each value read as its option's type; unknown keys refused in one line."""
    import yaml  # (PyYAML, requirements.txt)
    data = read_structured(path, '--cfg', yaml.safe_load, (yaml.YAMLError,), 'YAML')
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SaticError(f'--cfg {path}: expected a mapping of option names to values, got a {type(data).__name__}')
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    values = {}
    for key, value in data.items():
        action = actions.get(str(key).lstrip('-'))
        if action is None or action.dest in ('help', 'cfg'):
            raise SaticError(f'{path}: unknown option {key!r} (keys are option names, as in --help)')
        values[action.dest] = _cfg_value(path, key, value, action)
    return values


def _cfg_value(path, key, value, action):
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise SaticError(f'{path}: {key}: {value!r} is not true or false')
        return value
    convert = action.type or str
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not action.nargs:
        raise SaticError(f'{path}: {key}: a list, but --{action.dest} takes one value')
    out = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise SaticError(f'{path}: {key}: {item!r} is not a value')
        text = str(item).lower() if isinstance(item, bool) else str(item)
        if convert is int and isinstance(item, float) and not item.is_integer():
            raise SaticError(f'{path}: {key}: {item!r} is not an integer')
        try:
            out.append(convert(str(int(item)) if convert is int and isinstance(item, float) else text))
        except (ValueError, argparse.ArgumentTypeError) as e:
            raise SaticError(f'{path}: {key}: {item!r} is not a valid {getattr(convert, "__name__", "value")} '
                             f'({e})') from None
    return out if isinstance(value, list) else out[0]


def parse_with_cfg(parser, argv):
    """parser.parse_args(argv), with --cfg's file as defaults under the command line; the cfg key is dropped, so
    the options are exactly those the file's flags would give."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--cfg', type=str, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.cfg:
        parser.set_defaults(**load_cfg(known.cfg, parser))
    opt = parser.parse_args(argv)
    if hasattr(opt, 'cfg'):
        del opt.cfg
    check_declared(opt, getattr(parser, 'option_fields', {}))
    return opt


def warn(message):
    print(f'warning: {message}', file=sys.stderr)


def add_data_options(parser, defaults=True):
    """Input files (data/README.md). With defaults=False the paths default to '' (eval: take them from infos)."""
    add_options(parser, DataConfig, only=EVAL_PATHS + ('num_workers',),
                defaults=None if defaults else {name: '' for name in EVAL_PATHS})
    add_options(parser, EvaluationConfig, only=('ref_json',))


def add_model_options(parser):
    """Model hyper-parameters (docs/reproducibility.md, "Reference quirks kept")."""
    add_options(parser, ModelConfig)
    add_options(parser, DataConfig, only=('norm_att_feat',))


def add_decoding_options(parser, beam_size=1):
    """How captions are decoded: eval.py, and train.py's validation. eval.py takes every option of it from its
    command line (`decoding_option_names`)."""
    add_options(parser, DecodingOptions, defaults={'beam_size': beam_size})


EVAL_DEVICE_OPTIONS = ('device', 'bf16', 'compile', 'cuda_graphs')


def add_device_options(parser, only=None):
    add_options(parser, DeviceConfig, only=only)
    add_options(parser, StepConfig, only=tuple(o for o in ('bf16', 'fp16') if only is None or o in only))


def add_training_options(parser):
    """Optimisation, self-critical, checkpointing, validation (README, "The COCO recipe")."""
    add_options(parser, DataConfig, only=('batch_size', 'seq_per_img', 'train_only', 'num_images', 'seed'))
    add_options(parser, OptimConfig)
    add_options(parser, StepConfig, only=('grad_clip',))
    add_options(parser, LossConfig)
    add_options(parser, TrainConfig)
    add_options(parser, reward_options())  # --cider_reward_weight, --bleu_reward_weight (misc/train/rewards.py)
    add_options(parser, RunConfig)
    add_options(parser, EvaluationConfig, only=('language_eval', 'spice'))
    add_options(parser, ValidationConfig)


def add_inert_reference_options(parser):
    """Reference options that change nothing in the reference's transformer/SAT model either: accepted at any value
    (the original README passes --scheduled_sampling_start 0), documented in README "Reference options accepted
    but inert". (Also inert, as in the reference, but defined with their groups: --input_box_dir without
    --use_box; --learning_rate_decay_* with --noamopt or --reduce_on_plateau; --optim, --optim_alpha/beta/epsilon,
    --weight_decay, --learning_rate with --noamopt; --teacher_caption_model without --kd_weight.)"""
    add_options(parser, InertReferenceOptions)


def _need(cond, message):
    """A refused option value: SaticError, one line (train.py and eval.py print 'error: ...' and exit 2)."""
    if not cond:
        raise SaticError(message)


def _train_parser():
    parser = OptionParser(description='Train a SATIC captioner (XE / seq-KD, then self-critical).')
    add_cfg_option(parser)
    add_data_options(parser)
    add_model_options(parser)
    add_decoding_options(parser)
    add_training_options(parser)
    add_device_options(parser)
    add_inert_reference_options(parser)
    return parser


def parse_opt(argv=None):
    """train.py options (--cfg file, then the command line), resolved (the K rule applied) and checked: every
    declared range, then the combinations; nothing changes them afterwards."""
    opt = parse_with_cfg(_train_parser(), argv)
    opt.K = model_k(opt)
    check_opt(opt)
    check_train_opt(opt)
    check_schedule_opt(opt)
    return opt


def check_schedule_opt(opt):
    """train.py: combinations of options that train nothing or mean nothing (one-line refusal, exit 2); those the
    reference accepted and recipes use are warned about instead. Single values are checked by their declared
    ranges (misc/options/configs.py)."""
    _need(not (opt.bf16 and opt.fp16), '--bf16 and --fp16 exclude each other: choose one autocast type')
    _need(not (opt.noamopt and opt.reduce_on_plateau),
         '--reduce_on_plateau cannot be combined with --noamopt: Noam sets the lr at every step (the reference '
         'crashed at the first validation); choose one')
    _need(opt.beam_size == 1 or opt.group_size <= opt.beam_size,
         f'--group_size {opt.group_size}: must be <= --beam_size {opt.beam_size} (groups of beams)')
    if opt.self_critical_after >= 0:
        from misc.train.rewards import REWARDS, reward_option
        weights = {reward_option(name): getattr(opt, reward_option(name), 0) for name in REWARDS}
        _need(any(weight > 0 for weight in weights.values()),
             f'--self_critical_after {opt.self_critical_after} with every reward weight 0 '
             f"({', '.join(f'--{k} {v}' for k, v in weights.items())}): self-critical training would learn nothing; "
             'give a reward a weight > 0')
        if opt.max_epochs != -1 and opt.self_critical_after >= opt.max_epochs:
            warn(f'--self_critical_after {opt.self_critical_after} >= --max_epochs {opt.max_epochs}: self-critical '
                 'training never starts in this run (accepted, as in the reference: a later --start_from run with '
                 'more epochs reaches it)')
    if opt.kd_weight > 0 and opt.self_critical_after == 0:
        warn(f'--kd_weight {opt.kd_weight} acts in XE epochs only, and --self_critical_after 0 leaves none')


def check_opt(opt):
    """Reject values the code cannot honour, with a one-line message naming the flag."""
    _need(opt.K >= 1, f'--K must be >= 1 (got {opt.K})')
    _need(opt.caption_model in ('sat', 'transformer'), f"--caption_model must be 'sat' or 'transformer' (got {opt.caption_model!r})")
    _need(opt.batch_size > 0, '--batch_size must be > 0')
    _need(opt.beam_size > 0, '--beam_size must be > 0')
    _need(opt.seq_per_img > 0, '--seq_per_img must be > 0')
    check_reference_options(opt)


def check_reference_options(opt):
    """Reference model/data options that SATIC cannot honour (train.py, and eval.py on infos): one-line refusal."""
    if opt.use_box:
        raise SaticError(f'--use_box {opt.use_box} is refused: the reference appended 5 normalised box '
                         'features to every region (needing image sizes in --input_json); SATIC reads region '
                         'features only; use 0')


def check_train_opt(opt):
    """train.py's own refusals (not applied to the options of a checkpoint's infos): distillation options."""
    kd = opt.kd_weight
    _need(kd >= 0, f'--kd_weight must be >= 0 (got {kd})')
    _need(opt.teacher_eval_mode in (0, 1),
         f'--teacher_eval_mode must be 0 (train mode, the reference) or 1 (got {opt.teacher_eval_mode})')
    if kd > 0:
        _need(bool(opt.teacher_model),
             f"--kd_weight {kd} needs --teacher_model: the reference's {opt.teacher_caption_model} teacher (hard-coded "
             "show_tell/topdown checkpoints) does not exist in this project; pass --teacher_model PATH of a "
             "transformer or sat checkpoint trained here (same vocabulary)")
        _need(opt.teacher_caption_model in ('show_tell', 'sat', 'transformer'),
             f"--teacher_caption_model {opt.teacher_caption_model!r}: only this project's sat/transformer "
             "checkpoints can teach (the teacher's caption model is read from its infos)")
    else:
        for flag, default in (('teacher_model', None), ('teacher_infos', None), ('teacher_eval_mode', 0)):
            _need(vars(opt)[flag] in (default, ''),
                 f'--{flag} is used only with --kd_weight > 0 (word-level distillation); add --kd_weight or drop it')


def add_eval_options(parser, beam_size=1, batch_size=32):
    """eval.py / eval_cocotest.py options (reference_eval_options.tsv); paths default to '' = take from infos."""
    add_options(parser, EvalConfig)
    add_options(parser, DataConfig, only=('batch_size', 'num_images', 'seed'), defaults={'batch_size': batch_size},
                groups={'batch_size': optspec.EVALUATION, 'seed': optspec.DECODING})
    add_options(parser, EvaluationConfig, only=('language_eval', 'spice'))
    add_decoding_options(parser, beam_size=beam_size)
    add_device_options(parser, only=EVAL_DEVICE_OPTIONS)
    add_data_options(parser, defaults=False)


def eval_parser(beam_size=1, batch_size=32, language_eval=1, description='Evaluate a SATIC checkpoint.'):
    parser = OptionParser(description=description)
    add_cfg_option(parser)
    add_eval_options(parser, beam_size=beam_size, batch_size=batch_size)
    parser.set_defaults(language_eval=language_eval)
    return parser


def parse_eval_opt(argv=None, beam_size=1, batch_size=32, language_eval=1, description='Evaluate a SATIC checkpoint.'):
    return parse_with_cfg(eval_parser(beam_size, batch_size, language_eval, description), argv)


def fill_defaults(opt):
    """Resolve the options of an infos file: every option it lacks at its default (reference infos lack ours),
    then the K rule (model_k). Returns opt, changed in place (pass a copy to keep the original)."""
    defaults = vars(_train_parser().parse_args([]))
    defaults.pop('cfg', None)
    for key, value in defaults.items():
        if not hasattr(opt, key):
            setattr(opt, key, value)
    opt.K = model_k(opt)
    return opt


def decode_config(opt, vocab_size=None):
    """The models.decode_config.DecodeConfig of resolved options; a bad value -> SaticError, one line naming it.

    vocab_size: refuse more beams per group than the vocabulary has entries."""
    from models.decode_config import DecodeConfig  # (models/ imports torch: opts.py stays torch-free)
    unset = [name for name in DecodeConfig.option_names() if not hasattr(opt, name)]
    if unset:  # a field without its option line would silently decode at its default
        raise SaticError(f"DecodeConfig field(s) {', '.join(unset)} have no option: add them to "
                         'opts.add_decoding_options')
    try:
        config = DecodeConfig.from_values(vars(opt))
        if vocab_size is not None:
            config.check_vocabulary(vocab_size)
    except ValueError as e:
        raise SaticError(f'decoding options: {e}') from None
    return config


def decoding_option_names():
    """The options of add_decoding_options' group, which eval.py owns."""
    parser = argparse.ArgumentParser(add_help=False)
    add_decoding_options(parser)
    return tuple(vars(parser.parse_args([])))


# Options besides the decoding ones that eval.py takes from its own command line (reference_eval_options.tsv and
# our additions); everything else comes from the checkpoint's infos.
EVAL_OWN_BESIDES_DECODING = ('id', 'batch_size', 'language_eval', 'quantize', 'num_images', 'split', 'ref_json',
                             'num_workers', 'seed', 'spice') + EVAL_DEVICE_OPTIONS
# Data paths (EVAL_PATHS): the command line's when given, else the infos' (the reference's `opt.x or
# infos['opt'].x`).


EVAL_SPLITS = ('train', 'val', 'test')  # dataloader.SPLITS


def check_eval_split(eval_opt):
    """--split must name one of the loader's splits (restval images are in train)."""
    if eval_opt.split not in EVAL_SPLITS:
        raise SaticError(f"--split {eval_opt.split!r} is not a split: use one of {', '.join(EVAL_SPLITS)}")


def check_image_options(eval_opt):
    """--coco_json and the CNN options act only with --image_folder (one-line refusals)."""
    if eval_opt.coco_json and not eval_opt.image_folder:
        raise SaticError('--coco_json lists images of --image_folder: add --image_folder DIR (or drop --coco_json)')
    if eval_opt.image_folder and eval_opt.dump_attention:
        raise SaticError('--dump_attention writes the attended regions of a split\'s features; with --image_folder '
                         'use the Python API (Captioner.caption_images(paths, attention=True)) or drop --dump_attention')


def resolve_eval_options(eval_opt, infos, infos_path='infos', model_path=None):
    """The options one run of eval.py uses: infos['opt'] (defaults filled) overridden by the evaluation's own
    options and its non-empty data paths; vocab_size from infos['vocab']; model_path: the checkpoint (default
    --model; an ensemble's member). Bad values -> SaticError, one line."""
    check_image_options(eval_opt)
    check_eval_split(eval_opt)
    opt = fill_defaults(argparse.Namespace(**vars(infos['opt'])))
    for key in decoding_option_names() + EVAL_OWN_BESIDES_DECODING:
        setattr(opt, key, getattr(eval_opt, key))
    for key in EVAL_PATHS:
        if getattr(eval_opt, key):
            setattr(opt, key, getattr(eval_opt, key))
    # Defaults of the author's run give way to the checkpoint's own: its references and its id.
    trained = vars(infos['opt'])
    if eval_opt.ref_json == DEFAULT_REF_JSON and trained.get('ref_json'):
        opt.ref_json = trained['ref_json']
    if eval_opt.id == REFERENCE_EVAL_ID and (model_path or eval_opt.model) != REFERENCE_EVAL_MODEL \
            and trained.get('id'):
        opt.id = trained['id']
    if opt.ref_json == DEFAULT_REF_JSON and not os.path.isfile(opt.ref_json):
        # The default is relative to the repository (where the reference was always run), not to any cwd.
        opt.ref_json = os.path.join(REPO_ROOT, DEFAULT_REF_JSON)
    opt.vocab_size = len(infos['vocab'])
    try:
        check_opt(opt)
    except SaticError as e:  # check_opt's one line, here about the infos file or this command line
        raise SaticError(f'{e} (options of {infos_path} and this command line)') from None
    return opt
