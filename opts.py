"""Command-line options: defined once, with the reference's names, types and defaults.

`parse_opt()` is train.py's parser; `parse_eval_opt()` is eval.py's / eval_cocotest.py's.
Every reference option is accepted (see ../shared/conformance/reference_options.tsv); options marked
"(ours)" are additions whose defaults keep the reference behaviour, so old infos files keep working
(`fill_defaults` gives an old `opt` Namespace the options it lacks).
"""
import argparse
import os

from misc.defaults import MODEL, model_k  # noqa: F401 (model_k: the K rule, opts.model_k)
from misc.errors import SaticError
from misc.rewards import REWARDS, reward_option

DEFAULT_INIT_FROM = 'save/nsc-transformer-baseline/model-best.pth'
DEFAULT_REF_JSON = 'coco-caption/annotations/captions_val2014.json'
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def str2bool(value):
    """Parse '1'/'0'/'true'/'false' (the reference used type=bool, so any non-empty string was True)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ('1', 'true', 'yes', 'y', 't'):
        return True
    if text in ('0', 'false', 'no', 'n', 'f', ''):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (1/0/true/false), got {value!r}")


def add_data_options(parser, defaults=True):
    """Input files (data/README.md). With defaults=False the paths default to '' (eval: take them from infos)."""
    d = (lambda value: value) if defaults else (lambda value: '')
    parser.add_argument('--input_json', type=str, default=d('data/cocotalk.json'),
                        help='cocotalk.json from scripts/prepro_labels.py (vocabulary and image list)')
    parser.add_argument('--input_fc_dir', type=str, default=d('data/mscoco/cocobu_fc'),
                        help='fc features: a directory of <id>.npy, an .lmdb or an .h5 file (accepted as in the '
                             'reference, not read: no model uses them)')
    parser.add_argument('--input_att_dir', type=str, default=d('data/mscoco/cocobu_att'),
                        help='region features: a directory of <id>.npz, an .lmdb or an .h5 file')
    parser.add_argument('--input_box_dir', type=str, default=d('data/mscoco/cocobu_box'),
                        help='box files: inert in training, as in the reference (it read them only with --use_box 1, '
                             'which SATIC refuses); eval.py --dump_attention writes their boxes')
    parser.add_argument('--input_label_h5', type=str, default=d('data/cocotalk_label.h5'),
                        help="label h5 from prepro_labels(_seqKD).py, or 'none' for images without captions")
    parser.add_argument('--ref_json', type=str, default=DEFAULT_REF_JSON,
                        help='(ours) COCO-format reference captions for language evaluation')
    parser.add_argument('--num_workers', type=int, default=2,
                        help='(ours) feature-loading worker threads per split (0: load in the main thread)')


def add_model_options(parser):
    """Model hyper-parameters (README, "Reference quirks kept")."""
    parser.add_argument('--caption_model', type=str, default=MODEL['caption_model'], help="'sat' (K words per step) or 'transformer' (K=1)")
    parser.add_argument('--rnn_size', type=int, default=MODEL['rnn_size'], help='d_ff: the feed-forward inner size')
    parser.add_argument('--num_layers', type=int, default=MODEL['num_layers'], help='N: encoder and decoder layers')
    parser.add_argument('--input_encoding_size', type=int, default=MODEL['input_encoding_size'], help='D: d_model')
    parser.add_argument('--att_feat_size', type=int, default=MODEL['att_feat_size'], help='region feature size')
    parser.add_argument('--use_bn', type=int, default=MODEL['use_bn'], help='BatchNorm1d on region features before att_embed (2: also after)')
    parser.add_argument('--norm_att_feat', type=int, default=0, help='L2-normalise region features')
    parser.add_argument('--use_box', type=int, default=0,
                        help='must be 0: the reference appended 5 box features to every region; refused here')
    parser.add_argument('--drop_prob_lm', type=float, default=MODEL['drop_prob_lm'], help='dropout after att_embed')
    parser.add_argument('--K', type=int, default=MODEL['K'], help='K: words per decoding step (group size)')
    parser.add_argument('--use_cache', type=int, default=1,
                        help='(ours) 1: key/value cache while decoding; 0: re-decode the prefix (the reference)')


def add_decoding_options(parser, beam_size=1):
    """How captions are decoded (README, "Decoding options"): eval.py, and train.py's validation. Their own
    argument group; eval.py takes every option of it from its command line (`decoding_option_names`)."""
    # Every option below goes to the group (eval.py always takes them from its command line, never from infos).
    parser = parser.add_argument_group('decoding options', 'how captions are decoded')
    parser.add_argument('--beam_size', type=int, default=beam_size, help='beam width (1: greedy)')
    parser.add_argument('--max_length', type=int, default=20, help='maximum caption length when decoding')
    parser.add_argument('--length_penalty', type=str, default='', help="e.g. 'wu_0.5' or 'avg_0' ('' = none)")
    parser.add_argument('--block_trigrams', type=int, default=0,
                        help='1: soft penalty on repeated trigrams (greedy and sampling; README, decoding options)')
    parser.add_argument('--remove_bad_endings', type=int, default=0,
                        help="1: drop trailing 'a', 'the', 'with', ... from the decoded captions")
    parser.add_argument('--group_size', type=int, default=1,
                        help='diverse beam search: beam_size is split into this many groups (1: plain beam search)')
    parser.add_argument('--diversity_lambda', type=float, default=0.5,
                        help='diverse beam search: penalty per earlier group choosing the same word at a position')
    parser.add_argument('--decoding_constraint', type=int, default=0,
                        help='1: a word never repeats the word just before it (greedy, sampling and beams)')
    parser.add_argument('--sample_max', type=int, default=1,
                        help='1: argmax; 0: sample (eval.py; training validation is always greedy)')
    parser.add_argument('--temperature', type=float, default=1.0, help='sampling temperature (with --sample_max 0)')
    parser.add_argument('--device', type=str, default='',
                        help="(ours) 'cuda', 'cpu', 'cuda:1'...; default: cuda when available")
    parser.add_argument('--bf16', type=int, default=0,
                        help='(ours) bfloat16 autocast for training and decoding (off: fp32, as the reference)')
    parser.add_argument('--compile', type=int, default=0,
                        help='(ours) 1: torch.compile the training forward/backward and the decoding step '
                             '(minutes of compilation up front; README, "Speed options")')
    parser.add_argument('--cuda_graphs', type=int, default=0,
                        help='(ours) 1: on a GPU, the steps of eval-mode decoding (eval.py, validation) replayed from '
                             'CUDA graphs (README, "Speed options"; off until measured on a GPU); ignored on the CPU')


def add_training_options(parser):
    """Optimisation, self-critical, checkpointing (README, "Using it on COCO")."""
    parser.add_argument('--start_from', type=str, default=None,
                        help='resume from this folder (model.pth, optimizer.pth, infos_<id>.pkl)')
    parser.add_argument('--init_from', type=str, default=DEFAULT_INIT_FROM,
                        help="(ours) SAT (K>1) without --start_from starts from this autoregressive checkpoint; "
                             "'none' to train from scratch")
    parser.add_argument('--cached_tokens', type=str, default='data/coco-train-idxs',
                        help='document frequencies for the CIDEr-D reward (scripts/prepro_ngrams.py; .p optional)')
    parser.add_argument('--max_epochs', type=int, default=30)
    parser.add_argument('--max_iters', type=int, default=-1, help='(ours) stop after this many iterations (-1: no limit)')
    parser.add_argument('--batch_size', type=int, default=32, help='images per batch (each with seq_per_img captions)')
    parser.add_argument('--grad_clip', type=float, default=0.1, help='element-wise gradient clamp (not norm clipping)')
    parser.add_argument('--self_critical_after', type=int, default=-1,
                        help='epoch from which self-critical training is used (-1: never)')
    parser.add_argument('--seq_per_img', type=int, default=5, help='S: captions (or samples) per image')
    parser.add_argument('--optim', type=str, default='adam',
                        help='adam|adamw|sgd|sgdm|sgdmom|rmsprop|adagrad (inert with --noamopt, as in the reference)')
    parser.add_argument('--learning_rate', type=float, default=5e-4, help='(inert with --noamopt, as in the reference)')
    parser.add_argument('--learning_rate_decay_start', type=int, default=-1,
                        help='epoch to start step decay (-1: off); inert with --noamopt or --reduce_on_plateau, '
                             'as in the reference')
    parser.add_argument('--learning_rate_decay_every', type=int, default=3, help='(see --learning_rate_decay_start)')
    parser.add_argument('--learning_rate_decay_rate', type=float, default=0.8, help='(see --learning_rate_decay_start)')
    parser.add_argument('--optim_alpha', type=float, default=0.9, help='(inert with --noamopt, as in the reference)')
    parser.add_argument('--optim_beta', type=float, default=0.999, help='(inert with --noamopt, as in the reference)')
    parser.add_argument('--optim_epsilon', type=float, default=1e-8, help='(inert with --noamopt, as in the reference)')
    parser.add_argument('--weight_decay', type=float, default=0, help='(inert with --noamopt, as in the reference)')
    parser.add_argument('--label_smoothing', type=float, default=0)
    parser.add_argument('--noamopt', action='store_true', help='Noam schedule: factor * D^-0.5 * min(t^-0.5, t * warmup^-1.5)')
    parser.add_argument('--noamopt_warmup', type=int, default=2000)
    parser.add_argument('--noamopt_factor', type=float, default=1)
    parser.add_argument('--reduce_on_plateau', action='store_true', help='halve the lr after 3 validations without gain')
    parser.add_argument('--val_images_use', type=int, default=-1, help='val images per validation (-1: all)')
    parser.add_argument('--save_checkpoint_every', type=int, default=2500)
    parser.add_argument('--save_history_ckpt', type=int, default=0, help='also keep model-<iter>.pth at every save')
    parser.add_argument('--checkpoint_path', type=str, default='save/nsc-sat-6-from-nsc-seqkd-without-init')
    parser.add_argument('--language_eval', type=int, default=1, help='compute COCO metrics at validation')
    parser.add_argument('--losses_log_every', type=int, default=25)
    parser.add_argument('--load_best_score', type=int, default=1)
    parser.add_argument('--id', type=str, default='nsc-sat-6-from-nsc-seqkd-without-init')
    parser.add_argument('--overwrite_run', type=int, default=0,
                        help="(ours) 1: start over on purpose in a --checkpoint_path that holds another run's "
                             "checkpoint (a run without --start_from, another --id, or a resume from another "
                             "folder): this run's first save replaces the folder's checkpoint (its model*.pth, "
                             "optimizer.pth, infos/histories and manifest); 0: such a run is refused (README, "
                             "\"Interrupts and resume\")")
    parser.add_argument('--train_only', type=int, default=0, help='1: train on train only, without restval')
    parser.add_argument('--num_images', type=int, default=-1, help='(ours) cut every split to this many images')
    for name, scorer_class in REWARDS.items():  # --cider_reward_weight, --bleu_reward_weight (misc/rewards.py)
        parser.add_argument(f'--{reward_option(name)}', type=float, default=scorer_class.default_weight,
                            help=scorer_class.help)
    parser.add_argument('--kd_weight', type=float, default=0,
                        help='word-level distillation (XE stage): loss = XE + kd_weight * KL(teacher || student) '
                             'over the masked positions; needs --teacher_model')
    parser.add_argument('--teacher_caption_model', type=str, default='show_tell',
                        help="the reference's teacher type; here the teacher's caption model comes from its infos "
                             "(sat or transformer): a value other than show_tell must match it. Inert without "
                             "--kd_weight, as in the reference")
    parser.add_argument('--teacher_model', type=str, default=None,
                        help='(ours) with --kd_weight > 0: the teacher checkpoint (model.pth / model-best.pth of a '
                             'sat or transformer run of this project, same vocabulary)')
    parser.add_argument('--teacher_infos', type=str, default=None,
                        help='(ours) the teacher\'s infos pkl (default: infos_*.pkl beside --teacher_model, '
                             'infos_*-best.pkl for model-best.pth)')
    parser.add_argument('--teacher_eval_mode', type=int, default=0,
                        help='(ours) 0: the teacher runs in train mode, dropout on (reference quirk); 1: eval mode')
    parser.add_argument('--seed', type=int, default=123, help='(ours) random seed')
    parser.add_argument('--encode_per_image', type=int, default=0,
                        help="(ours) 1: run the encoder once per image, not once per caption: 2-3x faster "
                             "iterations, but the image's seq_per_img rows share one encoder dropout draw, which "
                             "learned measurably slower per iteration on the demo; 0 (default): the reference")
    parser.add_argument('--val_batch_size', type=int, default=0,
                        help='(ours) images per validation batch (0: --batch_size); validation keeps no gradients, '
                             'so a GPU takes larger batches there')
    parser.add_argument('--fp16', type=int, default=0,
                        help='(ours) float16 autocast with a gradient scaler (torch.amp.GradScaler) for training and '
                             'validation; off: fp32 (README, "Several GPUs")')
    parser.add_argument('--tf32', type=int, default=0,
                        help='(ours) 1: TensorFloat-32 matrix products and convolutions on CUDA (Ampere and later); '
                             '0: full fp32 (README, "Several GPUs")')
    parser.add_argument('--dist_timeout_minutes', type=float, default=60,
                        help='(ours) with torchrun: a collective that waits longer than this for a rank fails the run '
                             '(README, "Several GPUs")')


def add_inert_reference_options(parser):
    """Reference options that change nothing in the reference's transformer/SAT model either: accepted at any value
    (the original README passes --scheduled_sampling_start 0), documented in README "Reference options accepted
    but inert". (Also inert, as in the reference, but defined with their groups: --input_box_dir without
    --use_box; --learning_rate_decay_* with --noamopt or --reduce_on_plateau; --optim, --optim_alpha/beta/epsilon,
    --weight_decay, --learning_rate with --noamopt; --teacher_caption_model without --kd_weight.)"""
    inert = 'inert, as in the reference'
    group = parser.add_argument_group('reference options accepted but inert', 'they change nothing, as in the '
                                      "reference's transformer model")
    group.add_argument('--rnn_type', type=str, default='lstm', help=f'{inert} (no RNN in the transformer)')
    group.add_argument('--att_hid_size', type=int, default=512, help=f'{inert} (its ctx2att layer was deleted)')
    group.add_argument('--fc_feat_size', type=int, default=2048,
                       help=f'{inert} (fc features are not used by the model; its fc_embed was deleted)')
    group.add_argument('--logit_layers', type=int, default=1, help=f'{inert} (its logit layers were deleted)')
    group.add_argument('--norm_box_feat', type=int, default=0, help=f'{inert} (only acted with --use_box 1)')
    group.add_argument('--scheduled_sampling_start', type=int, default=-1,
                       help=f'{inert} (the transformer ignores ss_prob); the original README passes 0')
    group.add_argument('--scheduled_sampling_increase_every', type=int, default=5, help=inert)
    group.add_argument('--scheduled_sampling_increase_prob', type=float, default=0.05, help=inert)
    group.add_argument('--scheduled_sampling_max_prob', type=float, default=0.25, help=inert)
    group.add_argument('--nsc', type=str2bool, default=True,
                       help=f'{inert}: reference quirk, always True (leave-one-out baseline) whatever its value')


def _need(cond, message):
    """A refused option value: SaticError, one line (train.py and eval.py print 'error: ...' and exit 2)."""
    if not cond:
        raise SaticError(message)


def _train_parser():
    parser = argparse.ArgumentParser(description='Train a SATIC captioner (XE / seq-KD, then self-critical).')
    add_data_options(parser)
    add_model_options(parser)
    add_decoding_options(parser)
    add_training_options(parser)
    add_inert_reference_options(parser)
    return parser


def parse_opt(argv=None):
    """train.py options, resolved (the K rule applied) and checked: nothing changes them afterwards."""
    opt = _train_parser().parse_args(argv)
    opt.K = model_k(opt)
    check_opt(opt)
    check_train_opt(opt)
    check_schedule_opt(opt)
    return opt


def check_schedule_opt(opt):
    """train.py: lengths, periods and sizes of the run that make no sense (a one-line refusal, exit 2)."""
    _need(opt.max_epochs == -1 or opt.max_epochs > 0,
         f'--max_epochs must be -1 (no limit) or > 0 (got {opt.max_epochs}: 0 trains nothing)')
    _need(opt.max_iters == -1 or opt.max_iters > 0, f'--max_iters must be -1 (no limit) or > 0 (got {opt.max_iters})')
    _need(opt.save_checkpoint_every > 0, f'--save_checkpoint_every must be > 0 (got {opt.save_checkpoint_every})')
    _need(opt.losses_log_every > 0, f'--losses_log_every must be > 0 (got {opt.losses_log_every})')
    _need(opt.val_images_use == -1 or opt.val_images_use > 0,
         f'--val_images_use must be -1 (all) or > 0 (got {opt.val_images_use})')
    _need(opt.self_critical_after >= -1, f'--self_critical_after must be -1 (never) or >= 0 (got {opt.self_critical_after})')
    _need(opt.grad_clip > 0, f'--grad_clip must be > 0 (got {opt.grad_clip})')
    _need(opt.learning_rate >= 0, f'--learning_rate must be >= 0 (got {opt.learning_rate})')
    _need(opt.noamopt_warmup > 0, f'--noamopt_warmup must be > 0 (got {opt.noamopt_warmup})')
    # Learning-rate options are checked where they act (README, "Reference training and model options"): inert
    # values stay accepted at any value, as in the reference.
    if opt.noamopt:
        _need(opt.noamopt_factor >= 0, f'--noamopt_factor must be >= 0 (got {opt.noamopt_factor}: a negative '
                                       'learning rate climbs the loss)')
    elif not opt.reduce_on_plateau:
        _need(opt.learning_rate_decay_rate >= 0,
             f'--learning_rate_decay_rate must be >= 0 (got {opt.learning_rate_decay_rate}: a negative learning rate '
             'climbs the loss)')
        _need(opt.learning_rate_decay_every > 0,
             f'--learning_rate_decay_every must be > 0 epochs (got {opt.learning_rate_decay_every})')
    if not opt.noamopt:
        for flag in ('optim_alpha', 'optim_beta'):
            _need(0 <= vars(opt)[flag] < 1, f'--{flag} must be in [0, 1) (got {vars(opt)[flag]})')
        _need(opt.optim_epsilon >= 0, f'--optim_epsilon must be >= 0 (got {opt.optim_epsilon})')
        _need(opt.weight_decay >= 0, f'--weight_decay must be >= 0 (got {opt.weight_decay})')
    _need(0 <= opt.seed < 2 ** 31, f'--seed must be in [0, 2^31) (got {opt.seed})')
    _need(opt.val_batch_size >= 0, f'--val_batch_size must be >= 0 (0: --batch_size; got {opt.val_batch_size})')
    _need(opt.overwrite_run in (0, 1), f'--overwrite_run must be 0 or 1 (got {opt.overwrite_run})')
    _need(opt.dist_timeout_minutes > 0, f'--dist_timeout_minutes must be > 0 (got {opt.dist_timeout_minutes})')
    _need(not (opt.bf16 and opt.fp16), '--bf16 and --fp16 exclude each other: choose one autocast type')
    _need(not (opt.noamopt and opt.reduce_on_plateau),
         '--reduce_on_plateau cannot be combined with --noamopt: Noam sets the lr at every step (the reference '
         'crashed at the first validation); choose one')


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
    parser.add_argument('--model', type=str, default='save/nsc-sat-4-from-nsc-seqkd/model-best.pth')
    parser.add_argument('--infos_path', type=str, default='save/nsc-sat-4-from-nsc-seqkd/infos_nsc-sat-4-from-nsc-seqkd-best.pkl')
    parser.add_argument('--batch_size', type=int, default=batch_size, help='images per decoding batch')
    parser.add_argument('--num_images', type=int, default=-1, help='images to evaluate (-1: the whole split)')
    parser.add_argument('--language_eval', type=int, default=1, help='compute COCO metrics (needs Java)')
    parser.add_argument('--dump_images', type=int, default=0, help='write vis/index.html with captions and scores')
    parser.add_argument('--dump_json', type=int, default=1, help='write vis/<id>.json')
    parser.add_argument('--dump_path', type=int, default=0, help='include file paths in vis/<id>.json')
    parser.add_argument('--dump_attention', type=int, default=0,
                        help="(ours) N > 0: vis/<id>.json gets each word's N most attended regions (the last decoder "
                             "layer's cross-attention, heads averaged), and with --input_box_dir their boxes")
    add_decoding_options(parser, beam_size=beam_size)
    parser.add_argument('--image_folder', type=str, default='',
                        help="refused: the reference's raw-image mode (a CNN over image files); extract bottom-up "
                             "features instead (data/README.md)")
    parser.add_argument('--image_root', type=str, default='', help='with --dump_images: copy images from here to vis/imgs/')
    add_data_options(parser, defaults=False)
    parser.add_argument('--split', type=str, default='test', help='train | val | test')
    parser.add_argument('--coco_json', type=str, default='',
                        help="refused: the image list of the reference's raw-image mode (see --image_folder)")
    parser.add_argument('--id', type=str, default='nsc-sat-4-from-nsc-seqkd-cocoval', help='name of the outputs')
    parser.add_argument('--seq_kd', type=str2bool, default=False,
                        help='1: also write every beam of every image (input of scripts/prepro_labels_seqKD.py)')
    parser.add_argument('--seq_kd_path', type=str, default='',
                        help='(ours) where --seq_kd writes its beams (default vis/<id>_seq_kd.json)')
    parser.add_argument('--timing_json', type=str, default='',
                        help='(ours) also write the decoding time (ms per image, batch, beam) to this JSON file')
    parser.add_argument('--verbose', type=int, default=0, help='(ours) print every caption as it is decoded')
    parser.add_argument('--verbose_beam', type=int, default=1, help='with --verbose: also print the beams of each image')
    parser.add_argument('--verbose_loss', type=int, default=0, help='also compute the loss on the labels')
    parser.add_argument('--seed', type=int, default=123, help='(ours) random seed for sampling')
    parser.add_argument('--quantize', type=str, default='',
                        help="(ours) 'int8': dynamic int8 linear layers for CPU inference (off by default)")


def parse_eval_opt(argv=None, beam_size=1, batch_size=32, language_eval=1, description='Evaluate a SATIC checkpoint.'):
    parser = argparse.ArgumentParser(description=description)
    add_eval_options(parser, beam_size=beam_size, batch_size=batch_size)
    parser.set_defaults(language_eval=language_eval)
    return parser.parse_args(argv)


def fill_defaults(opt):
    """Resolve the options of an infos file: every option it lacks at its default (reference infos lack ours),
    then the K rule (model_k). Returns opt, changed in place (pass a copy to keep the original)."""
    defaults = vars(_train_parser().parse_args([]))
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
                             'num_workers', 'seed')
# Data paths: the command line's when given, else the infos' (the reference's `opt.x or infos['opt'].x`).
EVAL_PATHS = ('input_json', 'input_fc_dir', 'input_att_dir', 'input_box_dir', 'input_label_h5')


EVAL_SPLITS = ('train', 'val', 'test')  # dataloader.SPLITS


def check_eval_split(eval_opt):
    """--split must name one of the loader's splits (restval images are in train)."""
    if eval_opt.split not in EVAL_SPLITS:
        raise SaticError(f"--split {eval_opt.split!r} is not a split: use one of {', '.join(EVAL_SPLITS)}")


def resolve_eval_options(eval_opt, infos, infos_path='infos'):
    """The options one run of eval.py uses: infos['opt'] (defaults filled) overridden by the evaluation's own
    options and its non-empty data paths; vocab_size from infos['vocab']. Bad values -> SaticError, one line."""
    for flag in ('image_folder', 'coco_json'):
        if getattr(eval_opt, flag):
            raise SaticError(f"--{flag}: the reference's raw-image mode (a CNN over image files) is not provided; "
                             "extract bottom-up features and pass --input_att_dir (data/README.md)")
    check_eval_split(eval_opt)
    opt = fill_defaults(argparse.Namespace(**vars(infos['opt'])))
    for key in decoding_option_names() + EVAL_OWN_BESIDES_DECODING:
        setattr(opt, key, getattr(eval_opt, key))
    for key in EVAL_PATHS:
        if getattr(eval_opt, key):
            setattr(opt, key, getattr(eval_opt, key))
    if opt.ref_json == DEFAULT_REF_JSON and not os.path.isfile(opt.ref_json):
        # The default is relative to the repository (where the reference was always run), not to any cwd.
        opt.ref_json = os.path.join(REPO_ROOT, DEFAULT_REF_JSON)
    opt.vocab_size = len(infos['vocab'])
    try:
        check_opt(opt)
    except SaticError as e:  # check_opt's one line, here about the infos file or this command line
        raise SaticError(f'{e} (options of {infos_path} and this command line)') from None
    return opt
