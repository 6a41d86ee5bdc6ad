"""misc/options/defaults.py and the option edge: the library's defaults are opts.py's, and models/, misc/ and dataloader.py
never import opts.py (options are resolved once, in the entry scripts)."""
import argparse
import dataclasses
import re
from pathlib import Path

import opts
from misc.options import defaults
from dataloader import DataConfig
from misc.train.loss_wrapper import LossConfig
from misc.train.rewards import REWARDS
from train import StepConfig

REPO = Path(__file__).resolve().parents[1]


def test_model_loss_and_data_defaults_are_the_options_defaults():
    parsed = vars(opts.parse_opt([]))
    assert {key: parsed[key] for key in defaults.MODEL} == defaults.MODEL
    for config_class in (LossConfig, DataConfig, StepConfig):
        config = config_class()
        names = [f.name for f in dataclasses.fields(config_class) if f.name in parsed]
        assert names and {name: getattr(config, name) for name in names} == {name: parsed[name] for name in names}
    weights = LossConfig().reward_weights
    assert weights == {name: parsed[f'{name}_reward_weight'] for name in REWARDS}
    assert {name: weights[name] for name in ('cider', 'bleu')} == {'cider': 1, 'bleu': 0}  # the reference's defaults


def test_an_infos_partial_options_become_the_model_config_fill_defaults_gives():
    from misc.run.infos import model_config
    partial = argparse.Namespace(caption_model='transformer', K=6, rnn_size=8)
    filled = model_config({'opt': partial, 'vocab': {}})
    full = opts.fill_defaults(argparse.Namespace(**vars(partial)))
    assert all(getattr(filled, key) == getattr(full, key) for key in defaults.MODEL)
    assert filled.K == 1 and filled.rnn_size == 8 and not hasattr(partial, 'num_layers')  # read, not changed


def test_the_library_does_not_import_opts():
    files = [REPO / 'dataloader.py'] + sorted((REPO / 'misc').rglob('*.py')) + sorted((REPO / 'models').glob('*.py'))
    importing = [str(p.relative_to(REPO)) for p in files
                 if re.search(r'^\s*(import opts\b|from opts import)', p.read_text(), re.M)]
    assert importing == []


def test_the_k_rule_lives_in_model_config_only():
    from misc.options.configs import ModelConfig
    assert ModelConfig(caption_model='transformer', K=6).K == 1 and ModelConfig(K=3).K == 3
    assert opts.model_k(argparse.Namespace(caption_model='transformer', K=4)) == 1
    files = [REPO / name for name in ('train.py', 'eval.py', 'eval_cocotest.py', 'eval_ensemble.py', 'opts.py',
                                      'dataloader.py')]
    files += sorted((REPO / 'misc').rglob('*.py')) + sorted((REPO / 'models').rglob('*.py'))
    applying = [str(p.relative_to(REPO)) for p in files
                if re.search(r"caption_model\s*==\s*'transformer'", p.read_text())]
    assert applying == ['misc/options/configs.py']


def test_models_setup_takes_a_model_config_and_the_reference_call():
    import torch
    import models
    from misc.options.configs import ModelConfig
    sizes = dict(rnn_size=16, num_layers=1, input_encoding_size=16, att_feat_size=8)
    torch.manual_seed(0)
    typed = models.setup(ModelConfig(caption_model='transformer', K=6, **sizes), 10)
    torch.manual_seed(0)
    reference = models.setup(argparse.Namespace(caption_model='transformer', K=6, vocab_size=10, **sizes))
    assert typed.K == reference.K == 1 and typed.vocab_size == 10
    a, b = typed.state_dict(), reference.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
