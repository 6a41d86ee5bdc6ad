"""The typed configs: the single source of every command-line option's default, type, help, group and allowed
values (misc.options.optspec.option). opts.py generates every entry point's argparse from them and checks every
value once, at parse time; the library takes these configs, built once at the edge (`from_opt`). Torch-free.

A config's plain fields (no option()) are read by the library but declared as options elsewhere (their owner
config: e.g. LossConfig.seq_per_img is DataConfig's) or are not options at all (DataConfig.seq_length).
The reference's options keep their names, types and defaults (../shared/conformance/reference_options.tsv).
"""
import dataclasses

from misc.options.optspec import (ANY_NAME, ANY_PATH, ANY_VALUE, CHECKPOINTS, DATA, DECODING, DEVICES, EVALUATION,
                                  INERT, MODEL, SELF_CRITICAL, TRAINING, Check, at_least, boolean, greater_than,
                                  in_range, matches, minus_one_or_at_least, multiple_of, one_of, option)

HEADS = 8  # attention heads of every SAT/transformer layer (models/transformer.py)
DEFAULT_SEQ_LENGTH = 16  # dataloader: the caption length without a label file
SEEDS = in_range(0, 2 ** 31)
SEEDS.text = 'must be in [0, 2^31)'


def str2bool(value):
    """Parse '1'/'0'/'true'/'false' (the reference used type=bool, so any non-empty string was True)."""
    import argparse
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'y', 't'):
        return True
    if text in ('0', 'false', 'no', 'n', 'f', ''):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {value!r}")


def fields_of(config_class, options):
    """{field: value} of config_class's fields that the parsed options (a Namespace: the edge) have."""
    return {f.name: getattr(options, f.name) for f in dataclasses.fields(config_class) if hasattr(options, f.name)}


class FromOpt:
    @classmethod
    def from_opt(cls, options):
        """The config of parsed options, a Namespace (the defaults for what it lacks, e.g. a reference infos' or a
        test's partial one): the one conversion, at the edge."""
        return cls(**fields_of(cls, options))


@dataclasses.dataclass(frozen=True)
class ModelConfig(FromOpt):
    """The model's hyper-parameters (models.setup / build_model), saved with the run (infos['model_config'] and,
    in the reference's format, infos['opt']). K is resolved: 'transformer' is SAT with K = 1 (resolve_k, the one
    place of that rule)."""
    caption_model: str = option('sat', "'sat' (K words per decoding step) or 'transformer' (K = 1)", MODEL,
                                one_of('sat', 'transformer'))
    K: int = option(6, 'K: words per decoding step (group size); 1 with --caption_model transformer', MODEL,
                    at_least(1))
    rnn_size: int = option(1024, 'd_ff: the feed-forward inner size', MODEL, at_least(1))
    num_layers: int = option(1, 'N: encoder and decoder layers', MODEL, at_least(1))
    input_encoding_size: int = option(512, f'D: d_model (a multiple of the {HEADS} attention heads)', MODEL,
                                      multiple_of(HEADS, HEADS))
    att_feat_size: int = option(2048, 'region feature size (that of the --input_att_dir features)', MODEL,
                                at_least(1))
    use_bn: int = option(0, 'BatchNorm1d on region features before att_embed (2: also after)', MODEL,
                         one_of(0, 1, 2))
    drop_prob_lm: float = option(0.5, 'dropout probability after att_embed and in the layers', MODEL,
                                 in_range(0, 1))
    use_box: int = option(0, 'must be 0: the reference appended 5 box features to every region; refused here',
                          MODEL, Check(lambda v: v == 0, 'refused, use 0: the reference appended 5 normalised box '
                                       'features to every region (needing image sizes in --input_json); SATIC reads '
                                       'region features only', 1, 0))
    use_cache: int = option(1, '(ours) 1: key/value cache while decoding; 0: re-decode the prefix (the reference)',
                            DEVICES, boolean())
    max_length: int = 20  # the decoding option's (DecodingOptions.max_length)

    def __post_init__(self):
        object.__setattr__(self, 'K', self.resolve_k(self.caption_model, self.K))

    @staticmethod
    def resolve_k(caption_model, K):
        """'transformer' is SAT with K = 1 whatever --K says (the reference's transformer infos carry its default
        K = 6). The one place this rule lives."""
        return 1 if caption_model == 'transformer' else K


@dataclasses.dataclass(frozen=True)
class DataConfig(FromOpt):
    """What the loader reads of the options (train.py's and eval.py's). seq_length: the caption length without a
    label file (else the file's)."""
    input_json: str = option('data/cocotalk.json', 'cocotalk.json from scripts/prepro_labels.py (vocabulary and '
                             'image list)', DATA, ANY_PATH)
    input_label_h5: str = option('data/cocotalk_label.h5', "label h5 from prepro_labels(_seqKD).py, or 'none' for "
                                 'images without captions', DATA, ANY_PATH)
    input_fc_dir: str = option('data/mscoco/cocobu_fc', 'fc features: a directory of <id>.npy, an .lmdb or an .h5 '
                               'file (accepted as in the reference, not read: no model uses them)', DATA, ANY_PATH)
    input_att_dir: str = option('data/mscoco/cocobu_att', 'region features: a directory of <id>.npz, an .lmdb or '
                                'an .h5 file', DATA, ANY_PATH)
    input_box_dir: str = option('data/mscoco/cocobu_box', 'box files: inert in training, as in the reference (it '
                                'read them only with --use_box 1, which SATIC refuses); eval.py --dump_attention '
                                'writes their boxes', DATA, ANY_PATH)
    batch_size: int = option(32, 'images per batch (each with seq_per_img captions)', TRAINING, at_least(1))
    seq_per_img: int = option(5, 'S: captions (or self-critical samples) per image', TRAINING, at_least(1))
    norm_att_feat: int = option(0, 'L2-normalise region features (saved with the run, as a model option)', MODEL,
                                boolean())
    train_only: int = option(0, '1: train on train only, without restval', DATA, boolean())
    num_images: int = option(-1, '(ours) cut every split to this many images (-1: all)', DATA,
                             minus_one_or_at_least(1, 'all'))
    num_workers: int = option(2, '(ours) feature-loading worker threads per split (0: load in the main thread)',
                              DEVICES, at_least(0))
    seed: int = option(123, '(ours) random seed', TRAINING, SEEDS)
    seq_length: int = DEFAULT_SEQ_LENGTH
    # (ours) read the --input_fc_dir features: off for SATIC's models, which take none (SATModel.forward ignores
    # fc_feats; batches then hold fc_feats None, and the folder need not exist); on for tools that want them.
    use_fc_feats: bool = False


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """What the loss reads of train.py's options."""
    label_smoothing: float = option(0, 'label smoothing of the XE loss (0: plain XE)', TRAINING, in_range(0, 1))
    seq_per_img: int = DataConfig.seq_per_img
    encode_per_image: int = option(0, "(ours) 1: run the encoder once per image, not once per caption: 2-3x faster "
                                   "iterations, but the image's seq_per_img rows share one encoder dropout draw, "
                                   'which learned measurably slower per iteration on the demo; 0: the reference',
                                   DEVICES, boolean())
    cached_tokens: str = option('data/coco-train-idxs', 'document frequencies for the CIDEr-D reward '
                                '(scripts/prepro_ngrams.py; .p optional)', SELF_CRITICAL, ANY_PATH)
    kd_weight: float = option(0, 'word-level distillation (XE stage): loss = XE + kd_weight * KL(teacher || '
                              'student) over the masked positions; needs --teacher_model', SELF_CRITICAL, at_least(0))
    teacher_eval_mode: int = option(0, '(ours) 0: the teacher runs in train mode, dropout on (reference quirk); 1: '
                                    'eval mode', SELF_CRITICAL, boolean())
    # {reward name: weight} of misc.train.rewards.REWARDS (--cider_reward_weight, --bleu_reward_weight, ...)
    reward_weights: dict = dataclasses.field(default_factory=lambda: _default_reward_weights())

    @classmethod
    def from_opt(cls, options):
        """The config of parsed options (a Namespace); reward_weights from its --<name>_reward_weight options."""
        from misc.train.rewards import reward_option
        values = fields_of(cls, options)
        values['reward_weights'] = {name: getattr(options, reward_option(name), weight)
                                    for name, weight in _default_reward_weights().items()}
        return cls(**values)


def _default_reward_weights():
    from misc.train.rewards import default_reward_weights
    return default_reward_weights()


def reward_options():
    """The reward weights' options, one per registered reward (misc.train.rewards.REWARDS, read now: a reward registered
    later, e.g. by a test, gets its option in the next parser)."""
    from misc.train.rewards import REWARDS, reward_option
    return dataclasses.make_dataclass('RewardOptions', [
        (reward_option(name), float, option(scorer.default_weight, scorer.help, SELF_CRITICAL, at_least(0)))
        for name, scorer in REWARDS.items()], frozen=True)


@dataclasses.dataclass(frozen=True)
class StepConfig(FromOpt):
    """What a training step reads: the autocast precision (--bf16, --fp16) and the element-wise gradient clamp."""
    bf16: int = option(0, '(ours) bfloat16 autocast for training and decoding (off: fp32, as the reference)', DEVICES,
                       boolean())
    fp16: int = option(0, '(ours) float16 autocast with a gradient scaler (torch.amp.GradScaler) for training and '
                       'validation; off: fp32 (docs: several GPUs)', DEVICES, boolean())
    grad_clip: float = option(0.1, 'element-wise gradient clamp (not norm clipping)', TRAINING, greater_than(0))


NOT_NOAM = (lambda o: not o.noamopt, 'without --noamopt')
PLAIN_LR = (lambda o: not o.noamopt and not o.reduce_on_plateau, 'without --noamopt or --reduce_on_plateau')
NOAM = (lambda o: o.noamopt, 'with --noamopt')
OPTIMS = ('adam', 'adamw', 'sgd', 'sgdm', 'sgdmom', 'rmsprop', 'adagrad')
FLAG = Check(lambda v: isinstance(v, bool), 'a flag (true or false)', None, True)


def _conditional(default, help, group, check, condition):
    return option(default, help, group, check, when=condition)


@dataclasses.dataclass(frozen=True)
class OptimConfig(FromOpt):
    """Optimiser and learning-rate schedule (misc.train.optim)."""
    optim: str = _conditional('adam', 'optimiser (inert with --noamopt, as in the reference)', TRAINING,
                              one_of(*OPTIMS), NOT_NOAM)
    learning_rate: float = _conditional(5e-4, 'learning rate (inert with --noamopt, as in the reference)', TRAINING,
                                        greater_than(0.0), NOT_NOAM)
    learning_rate_decay_start: int = option(-1, 'epoch to start step decay (-1: off); inert with --noamopt or '
                                            '--reduce_on_plateau, as in the reference', TRAINING,
                                            minus_one_or_at_least(0, 'off'))
    learning_rate_decay_every: int = _conditional(3, 'epochs between two decays (see --learning_rate_decay_start)',
                                                  TRAINING, greater_than(0), PLAIN_LR)
    learning_rate_decay_rate: float = _conditional(0.8, 'lr factor at every decay (see --learning_rate_decay_start)',
                                                   TRAINING, greater_than(0.0), PLAIN_LR)
    optim_alpha: float = _conditional(0.9, "adam's beta1 / momentum (inert with --noamopt, as in the reference)",
                                      TRAINING, in_range(0, 1), NOT_NOAM)
    optim_beta: float = _conditional(0.999, "adam's beta2 (inert with --noamopt, as in the reference)", TRAINING,
                                     in_range(0, 1), NOT_NOAM)
    optim_epsilon: float = _conditional(1e-8, "adam's epsilon (inert with --noamopt, as in the reference)",
                                        TRAINING, at_least(0), NOT_NOAM)
    weight_decay: float = _conditional(0, 'weight decay (inert with --noamopt, as in the reference)', TRAINING,
                                       at_least(0), NOT_NOAM)
    noamopt: bool = option(False, 'Noam schedule: factor * D^-0.5 * min(t^-0.5, t * warmup^-1.5)', TRAINING, FLAG,
                           action='store_true')
    noamopt_warmup: int = option(2000, 'Noam schedule: warmup iterations', TRAINING, greater_than(0))
    noamopt_factor: float = _conditional(1, 'Noam schedule: factor', TRAINING, greater_than(0.0), NOAM)
    reduce_on_plateau: bool = option(False, 'halve the lr after 3 validations without gain', TRAINING, FLAG,
                                     action='store_true')


@dataclasses.dataclass(frozen=True)
class TrainConfig(FromOpt):
    """The run's length and its self-critical switch."""
    max_epochs: int = option(30, 'epochs to train (-1: no limit)', TRAINING, minus_one_or_at_least(1))
    max_iters: int = option(-1, '(ours) stop after this many iterations (-1: no limit)', TRAINING,
                            minus_one_or_at_least(1))
    self_critical_after: int = option(-1, 'epoch from which self-critical training is used (-1: never)',
                                      SELF_CRITICAL, minus_one_or_at_least(0, 'never'))
    teacher_caption_model: str = option('show_tell', "the reference's teacher type; here the teacher's caption "
                                        'model comes from its infos (sat or transformer): a value other than '
                                        'show_tell must match it. Inert without --kd_weight, as in the reference',
                                        SELF_CRITICAL, ANY_NAME)
    teacher_model: str = option(None, '(ours) with --kd_weight > 0: the teacher checkpoint (model.pth / '
                                'model-best.pth of a sat or transformer run of this project, same vocabulary)',
                                SELF_CRITICAL, ANY_PATH)
    teacher_infos: str = option(None, "(ours) the teacher's infos pkl (default: infos_*.pkl beside --teacher_model, "
                                'infos_*-best.pkl for model-best.pth)', SELF_CRITICAL, ANY_PATH)


@dataclasses.dataclass(frozen=True)
class RunConfig(FromOpt):
    """Where the run lives, how often it saves, resuming."""
    start_from: str = option(None, 'resume from this folder (model.pth, optimizer.pth, infos_<id>.pkl)',
                             CHECKPOINTS, ANY_PATH)
    init_from: str = option('save/nsc-transformer-baseline/model-best.pth', '(ours) SAT (K>1) without --start_from '
                            "starts from this autoregressive checkpoint; 'none' to train from scratch", CHECKPOINTS,
                            ANY_PATH)
    checkpoint_path: str = option('save/nsc-sat-6-from-nsc-seqkd-without-init', 'the run folder: checkpoints, infos, '
                                  'histories, logs', CHECKPOINTS, ANY_PATH)
    id: str = option('nsc-sat-6-from-nsc-seqkd-without-init', "the run's name (infos_<id>.pkl, histories_<id>.pkl)",
                     CHECKPOINTS, ANY_NAME)
    save_checkpoint_every: int = option(2500, 'iterations between two validations and saves', CHECKPOINTS,
                                        greater_than(0))
    save_history_ckpt: int = option(0, 'also keep model-<iter>.pth at every save', CHECKPOINTS, boolean())
    losses_log_every: int = option(25, 'iterations between two loss log lines', CHECKPOINTS, greater_than(0))
    load_best_score: int = option(1, '1: a resumed run keeps its best validation score (model-best.pth is replaced '
                                  'only by a better one)', CHECKPOINTS, boolean())
    overwrite_run: int = option(0, "(ours) 1: start over on purpose in a --checkpoint_path that holds another run's "
                                'checkpoint; its first save replaces that checkpoint; 0: such a run is refused',
                                CHECKPOINTS, boolean())


@dataclasses.dataclass(frozen=True)
class EvaluationConfig(FromOpt):
    """Language evaluation, in validation and eval.py."""
    language_eval: int = option(1, 'compute COCO metrics (BLEU, METEOR, ROUGE-L, CIDEr; needs Java)', EVALUATION,
                                boolean())
    ref_json: str = option('coco-caption/annotations/captions_val2014.json', '(ours) COCO-format reference captions '
                           'for language evaluation', EVALUATION, ANY_PATH)
    spice: str = option('auto', 'SPICE: auto = where its jars work', EVALUATION, one_of('auto', '0', '1'))


@dataclasses.dataclass(frozen=True)
class ValidationConfig(FromOpt):
    """train.py's validation."""
    val_images_use: int = option(-1, 'val images per validation (-1: all)', EVALUATION,
                                 minus_one_or_at_least(1, 'all'))
    val_batch_size: int = option(0, '(ours) images per validation batch (0: --batch_size); validation keeps no '
                                 'gradients, so a GPU takes larger batches there', EVALUATION, at_least(0))


@dataclasses.dataclass(frozen=True)
class DecodingOptions(FromOpt):
    """The decoding options of the command line (opts.decode_config turns them into models' DecodeConfig)."""
    beam_size: int = option(1, 'beam width (1: greedy or sampling)', DECODING, at_least(1))
    max_length: int = option(20, 'maximum caption length when decoding', DECODING, at_least(1))
    length_penalty: str = option('', "e.g. 'wu_0.5' or 'avg_0' ('' = none)", DECODING,
                                 matches(r'((wu|avg)_[0-9]*\.?[0-9]+)?', "must be '', wu_<alpha> or avg_<alpha>",
                                         'wu', 'avg_0'))
    block_trigrams: int = option(0, '1: soft penalty on repeated trigrams (greedy and sampling)', DECODING, boolean())
    remove_bad_endings: int = option(0, "1: drop trailing 'a', 'the', 'with', ... from the decoded captions",
                                     DECODING, boolean())
    group_size: int = option(1, 'diverse beam search: beam_size is split into this many groups (1: plain beam '
                             'search)', DECODING, at_least(1))
    diversity_lambda: float = option(0.5, 'diverse beam search: penalty per earlier group choosing the same word at '
                                     'a position', DECODING, at_least(0))
    decoding_constraint: int = option(0, '1: a word never repeats the word just before it (greedy, sampling and '
                                      'beams)', DECODING, boolean())
    sample_max: int = option(1, '1: argmax; 0: sample (eval.py; training validation is always greedy)', DECODING,
                             boolean())
    temperature: float = option(1.0, 'sampling temperature (with --sample_max 0)', DECODING, greater_than(0.0))


DEVICE_NAMES = matches(r'(|auto|cpu|cuda(:[0-9]+)?|mps)', "must be '', auto, cpu, cuda or cuda:N", 'bogus', 'cpu')


@dataclasses.dataclass(frozen=True)
class DeviceConfig(FromOpt):
    """Where and how fast (none of these changes the results beyond float rounding)."""
    device: str = option('', "(ours) 'cuda', 'cpu', 'cuda:1'...; '' or 'auto': cuda when available", DEVICES,
                         DEVICE_NAMES)
    compile: int = option(0, '(ours) 1: torch.compile the training forward/backward and the decoding step (minutes '
                          'of compilation up front; docs: speed)', DEVICES, boolean())
    cuda_graphs: int = option(0, '(ours) 1: on a GPU, the steps of eval-mode decoding replayed from CUDA graphs '
                              '(docs: speed); ignored on the CPU', DEVICES, boolean())
    tf32: int = option(0, '(ours) 1: TensorFloat-32 matrix products and convolutions on CUDA (Ampere and later); 0: '
                       'full fp32', DEVICES, boolean())
    dist_timeout_minutes: float = option(60, '(ours) with torchrun: a collective that waits longer than this for a '
                                         'rank fails the run', DEVICES, greater_than(0.0))


@dataclasses.dataclass(frozen=True)
class InertReferenceOptions:
    """Reference options that change nothing in the reference's transformer/SAT model either: accepted at any value
    (the original README passes --scheduled_sampling_start 0)."""
    rnn_type: str = option('lstm', 'inert, as in the reference (no RNN in the transformer)', INERT, ANY_VALUE)
    att_hid_size: int = option(512, 'inert, as in the reference (its ctx2att layer was deleted)', INERT, ANY_VALUE)
    fc_feat_size: int = option(2048, 'inert, as in the reference (fc features are not used by the model)', INERT,
                               ANY_VALUE)
    logit_layers: int = option(1, 'inert, as in the reference (its logit layers were deleted)', INERT, ANY_VALUE)
    norm_box_feat: int = option(0, 'inert, as in the reference (only acted with --use_box 1)', INERT, ANY_VALUE)
    scheduled_sampling_start: int = option(-1, 'inert, as in the reference (the transformer ignores ss_prob); the '
                                           'original README passes 0', INERT, ANY_VALUE)
    scheduled_sampling_increase_every: int = option(5, 'inert, as in the reference', INERT, ANY_VALUE)
    scheduled_sampling_increase_prob: float = option(0.05, 'inert, as in the reference', INERT, ANY_VALUE)
    scheduled_sampling_max_prob: float = option(0.25, 'inert, as in the reference', INERT, ANY_VALUE)
    nsc: bool = option(True, 'inert: reference quirk, always True (leave-one-out baseline) whatever its value',
                       INERT, ANY_VALUE, flag_type=str2bool)


@dataclasses.dataclass(frozen=True)
class EvalConfig(FromOpt):
    """eval.py's own options (reference_eval_options.tsv and ours)."""
    model: str = option('save/nsc-sat-4-from-nsc-seqkd/model-best.pth', 'the checkpoint (model.pth or '
                        'model-best.pth)', CHECKPOINTS, ANY_PATH)
    infos_path: str = option('save/nsc-sat-4-from-nsc-seqkd/infos_nsc-sat-4-from-nsc-seqkd-best.pkl',
                             "the checkpoint's infos pkl (its options, vocabulary)", CHECKPOINTS, ANY_PATH)
    split: str = option('test', 'the split to evaluate', DATA, one_of('train', 'val', 'test'))
    id: str = option('nsc-sat-4-from-nsc-seqkd-cocoval', 'name of the outputs (vis/<id>.json)', EVALUATION, ANY_NAME)
    dump_images: int = option(0, 'write vis/index.html with captions and scores', EVALUATION, boolean())
    dump_json: int = option(1, 'write vis/<id>.json', EVALUATION, boolean())
    dump_path: int = option(0, 'include file paths in vis/<id>.json', EVALUATION, boolean())
    dump_attention: int = option(0, "(ours) N > 0: vis/<id>.json gets each word's N most attended regions (the "
                                 "last decoder layer's cross-attention, heads averaged), and with --input_box_dir "
                                 'their boxes', EVALUATION, at_least(0))
    image_folder: str = option('', 'caption every image file under this folder (or those --coco_json lists) instead '
                               'of a split: writes vis/<id>.json, no metrics (docs/own_images.md)', DATA, ANY_PATH)
    image_root: str = option('', 'with --dump_images: copy images from here to vis/imgs/', EVALUATION, ANY_PATH)
    coco_json: str = option('', "with --image_folder: caption only the images of this COCO-style json ({'images': "
                            "[{'id', 'file_name'}]}), under their ids", DATA, ANY_PATH)
    cnn_model: str = option('resnet101', 'with --image_folder: the ImageNet ResNet that computes grid features',
                            DATA, one_of('resnet101', 'resnet152'))
    cnn_weights: str = option('', '(ours) with --image_folder: its weights file (default '
                              'data/imagenet_weights/<cnn_model>.pth, torchvision key names, as the reference)',
                              DATA, ANY_PATH)
    att_size: int = option(0, "(ours) with --image_folder: a grid of att_size x att_size regions; 0: the grid of the "
                           "run's training features (a file of its --input_att_dir), else 14 as the reference",
                           DATA, at_least(0))
    seq_kd: bool = option(False, '1: also write every beam of every image (input of '
                          'scripts/prepro_labels_seqKD.py)', EVALUATION, FLAG, flag_type=str2bool)
    seq_kd_path: str = option('', '(ours) where --seq_kd writes its beams (default vis/<id>_seq_kd.json)',
                              EVALUATION, ANY_PATH)
    timing_json: str = option('', '(ours) also write the decoding time (ms per image, batch, beam) to this JSON file',
                              EVALUATION, ANY_PATH)
    verbose: int = option(0, '(ours) print every caption as it is decoded', EVALUATION, boolean())
    verbose_beam: int = option(1, 'with --verbose: also print the beams of each image', EVALUATION, boolean())
    verbose_loss: int = option(0, 'also compute the loss on the labels', EVALUATION, boolean())
    quantize: str = option('', "(ours) 'int8': dynamic int8 linear layers for CPU inference (off by default)",
                           DEVICES, one_of('', 'none', 'int8'))


@dataclasses.dataclass(frozen=True)
class EnsembleOptions:
    """eval_ensemble.py's own options."""
    ids: tuple = option((), 'run ids: save/<id>/model-best.pth with save/<id>/infos_<id>-best.pkl (the reference)',
                        CHECKPOINTS, ANY_NAME, flag_type=str, nargs='+')
    weights: tuple = option((), 'one weight per model (--ids first, then --models), default equal; normalised; '
                            'finite and >= 0 with a positive sum', CHECKPOINTS, ANY_VALUE, flag_type=str, nargs='+')
    models: tuple = option((), '(ours) model.pth files outside save/<id>/', CHECKPOINTS, ANY_PATH, flag_type=str,
                           nargs='+')
    infos_paths: tuple = option((), '(ours) their infos pkl files, in order', CHECKPOINTS, ANY_PATH, flag_type=str,
                                nargs='+')
    server_json: int = option(0, "(ours) 1: vis/<id>.json in the COCO server format (eval_cocotest.py's), no "
                              'references', EVALUATION, boolean())
