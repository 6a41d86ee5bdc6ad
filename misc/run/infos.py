"""The infos file's schema: the one place that names its fields (FIELDS: name, type, required?, since which format
version, what it holds), its one reader (read_infos) and its one writer (make_infos; misc.run.checkpoint.save_checkpoint
adds what the infos belong to: describe).

Format versions (infos['format']; absent = 1):
  1  the reference's infos (iter, epoch, iterators, split_ix, vocab, opt, best_val_score) and ours before this
     module (+ rng_states, model_fingerprint, optimizer_step, K, caption_model, vocab_sha1, grad_scaler,
     validation_pending);
  2  + format and model_config (ModelConfig's fields as a plain dict).
Every version is written in the reference's format too: infos['opt'] is an argparse.Namespace with the run's
options, so the reference's code (and older SATIC) reads our infos. A reader never sees the Namespace as options:
model_config(infos) converts it once, here, at load time (the options an old infos lacks at ModelConfig's defaults,
the K rule applied).

Adding a field: one row in FIELDS (required=False, since=FORMAT_VERSION, bumped when readers must tell old files
from new; shown='name' to show it when the checkpoint is loaded), the value written by the code that knows it
(make_infos' fields=..., or CheckpointSaver.save).
"""
import argparse
import dataclasses

from misc.options.configs import ModelConfig
from misc.errors import SaticError
from misc.files.safe_load import load_pickle

FORMAT_VERSION = 2
ADVICE = 'pass the infos_<id>.pkl saved with the checkpoint'


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    types: tuple  # accepted types of its value (None is accepted for fields that are not required)
    required: bool
    since: int  # the format version that introduced it
    doc: str
    shown: str = ''  # when set, loading the checkpoint shows the field under this name (loaded_line)
    show: object = str  # how its value is shown


FIELDS = (
    Field('opt', (argparse.Namespace,), True, 1, "the run's options, in the reference's format (a Namespace)"),
    Field('vocab', (dict,), True, 1, 'ix_to_word: the vocabulary the model was trained with'),
    Field('iter', (int,), False, 1, 'completed iterations', 'iteration'),
    Field('epoch', (int,), False, 1, 'completed epochs', 'epoch'),
    Field('iterators', (dict,), False, 1, "the loader's position per split"),
    Field('split_ix', (dict,), False, 1, "the loader's image order per split"),
    Field('best_val_score', (int, float), False, 1, 'best validation score so far', 'best validation score',
          lambda score: f'{score:.4f}'),
    Field('rng_states', (list,), False, 1, "(ours) every rank's random generators"),
    Field('grad_scaler', (dict,), False, 1, "(ours) --fp16's gradient scaler state"),
    Field('validation_pending', (int,), False, 1, '(ours) the iteration whose validation was cut short'),
    Field('model_fingerprint', (str,), False, 1, "(ours) sha1 of model.pth's state_dict"),
    Field('optimizer_step', (int,), False, 1, '(ours) updates the saved optimizer state has made'),
    Field('K', (int,), False, 1, '(ours) words per decoding step of the model (the K rule applied)'),
    Field('caption_model', (str,), False, 1, "(ours) 'sat' or 'transformer'"),
    Field('vocab_sha1', (str,), False, 1, "(ours) the vocabulary's fingerprint (misc.files.vocabulary.vocab_sha1)"),
    Field('format', (int,), False, 2, '(ours) this schema version (absent: 1)'),
    Field('model_config', (dict,), False, 2, "(ours) ModelConfig's fields: the model's hyper-parameters"),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)


def format_version(infos):
    return infos.get('format', 1)


def read_infos(path, name=None, advice=ADVICE, check=True):
    """The infos file at path, through the restricted unpickler. check: refuse (SaticError, one line:
    '<name> is not an infos file (...): <advice>') a file that is not a dict with FIELDS' required fields, or of
    a newer format than this code reads; check=False: the pickle as it is (a histories file, or a reader that checks
    only what it uses, e.g. an iteration number for a message)."""
    infos = load_pickle(path)
    if not check:
        return infos
    name = name or path
    if not isinstance(infos, dict):
        raise SaticError(f'{name} is not an infos file (a dict with opt and vocab): {advice}')
    for field in FIELDS:  # the required fields, of their types (an optional one is checked by who reads it)
        value = infos.get(field.name)
        if field.required and not isinstance(value, field.types):
            raise SaticError(f'{name} is not an infos file (a dict with opt and vocab): {advice}')
    if not isinstance(format_version(infos), int) or format_version(infos) > FORMAT_VERSION:
        raise SaticError(f'{name} has infos format {format_version(infos)}, newer than this SATIC reads '
                         f'({FORMAT_VERSION}): update SATIC')
    return infos


def model_config(infos):
    """The ModelConfig of an infos: its model_config entry (format 2), else its opt Namespace converted once (the
    reference's and format-1 infos: the options they lack at ModelConfig's defaults, the K rule applied)."""
    if isinstance(infos.get('model_config'), dict):
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in infos['model_config'].items() if k in names})
    return ModelConfig.from_opt(infos['opt'])


def loaded_line(infos, model_path):
    """'checkpoint <model_path>: iteration 60, epoch 6, best validation score 0.1234': the FIELDS shown on load
    (those with `shown`) that infos hold; eval.py, eval_ensemble.py and the Captioner print it."""
    shown = [f'{f.shown} {f.show(infos[f.name])}' for f in FIELDS if f.shown and infos.get(f.name) is not None]
    return f"checkpoint {model_path}" + (f": {', '.join(shown)}" if shown else '')


def recorded_value(infos, name, default=None):
    """One of the run's recorded options (infos['opt'], the reference's format), or default."""
    return getattr(infos.get('opt'), name, default)


def make_infos(options, config, vocab, iteration=0, epoch=0, best_val_score=None, position=None, **fields):
    """An infos dict (FIELDS): iter, epoch, the loader's position (iterators, split_ix), vocab, opt (options, a
    {name: value} dict, written as the reference's Namespace), best_val_score, format, model_config (config, a
    ModelConfig), then fields (ours: rng_states, grad_scaler). save_checkpoint adds what they belong to."""
    unknown = [key for key in fields if key not in FIELD_NAMES]
    if unknown:
        raise ValueError(f'infos fields {unknown} are not in misc.run.infos.FIELDS: add them there')
    return {'iter': iteration, 'epoch': epoch, **(position or {}), 'vocab': vocab,
            'opt': argparse.Namespace(**dict(options)), 'best_val_score': best_val_score,
            'format': FORMAT_VERSION, 'model_config': dataclasses.asdict(config), **fields}
