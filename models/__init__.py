"""Captioning models: `setup(config, vocab_size)` builds one, `load_weights` puts a checkpoint's weights into it (checked first);
misc.run.checkpoint reads the files (load_model does both from a model.pth).

'transformer' is the autoregressive baseline, 'sat' the semi-autoregressive SATIC model (K words per step); they
are one class, SATModel, with K = 1 for 'transformer'.
"""
import re

from misc.options.configs import ModelConfig
from misc.errors import SaticError
from models.sat import SATModel, build_model

__all__ = ['SATModel', 'setup', 'load_weights']


def setup(config, vocab_size=None):
    """The captioner of config (a misc.options.configs.ModelConfig: caption_model, K with its rule applied, sizes, ...)
    over a vocabulary of vocab_size words. The entry scripts build the config at the edge
    (ModelConfig.from_opt: the options it lacks, e.g. a reference infos', at their defaults).

    The reference's call `models.setup(opt)` (an options object holding vocab_size) is still understood: it is
    converted here, once (../shared/tools/check_decoding.py and reference-era code call it so)."""
    if not isinstance(config, ModelConfig):
        config, vocab_size = ModelConfig.from_opt(config), config.vocab_size
    if config.caption_model in ('sat', 'transformer'):
        return build_model(config, vocab_size)
    raise SaticError(f"unknown --caption_model {config.caption_model!r}: SATIC provides 'sat' and 'transformer'")


def _layer_count(state_dict, part):
    pattern = re.compile(rf'model\.{part}\.layers\.(\d+)\.')
    found = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
    return max(found) + 1 if found else None


def _checkpoint_sizes(state_dict):
    """What the checkpoint says about the architecture (None where a key is absent)."""
    def shape(key, dim):
        return tuple(state_dict[key].shape)[dim] if key in state_dict else None
    linears = sorted(k for k in state_dict if re.fullmatch(r'att_embed\.\d+\.weight', k)
                     and state_dict[k].dim() == 2)
    generator = shape('model.generator.proj.weight', 0)
    return {
        'vocabulary': None if generator is None else generator - 1,
        'd_model': shape('model.tgt_embed.0.lut.weight', 1),
        'att_feat_size': tuple(state_dict[linears[0]].shape)[1] if linears else None,
        'layers': _layer_count(state_dict, 'encoder'),
        'decoder layers': _layer_count(state_dict, 'decoder'),
        'd_ff': shape('model.encoder.layers.0.feed_forward.w_1.weight', 0),
    }


def load_weights(model, state_dict, source):
    """Load state_dict (strict) into model, first checking that the sizes agree.

    A disagreement raises SaticError with one line naming the checkpoint `source` and the size, e.g. a vocabulary
    of 9487 words in the checkpoint but 30 in the options (the wrong infos file).
    """
    expected = _checkpoint_sizes(model.state_dict())
    found = _checkpoint_sizes(state_dict)
    names = {'vocabulary': 'a vocabulary of {} words', 'd_model': 'd_model (input_encoding_size) {}',
             'att_feat_size': 'att_feat_size {}', 'layers': '{} encoder layers (num_layers)',
             'decoder layers': '{} decoder layers (num_layers)', 'd_ff': 'd_ff (rnn_size) {}'}
    for key, text in names.items():
        if found[key] is not None and found[key] != expected[key]:
            raise SaticError(f'checkpoint {source} has {text.format(found[key])} but the options/infos say '
                             f'{expected[key]}: use the infos file that came with the checkpoint')
    own = model.state_dict()
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    wrong_shape = [key for key in own if key in state_dict and own[key].shape != state_dict[key].shape]
    problems = [f'{len(keys)} {what} (first: {keys[0]})' for what, keys in
                (('missing keys', missing), ('unexpected keys', unexpected), ('keys of another shape', wrong_shape))
                if keys]
    if problems:
        raise SaticError(f"checkpoint {source} does not fit this model: {'; '.join(problems)}; check "
                         '--caption_model/--use_bn against the infos file that came with the checkpoint')
    model.load_state_dict(state_dict, strict=True)
    return model
