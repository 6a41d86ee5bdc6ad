"""The defaults the library applies itself, to options Namespaces that may lack some: a reference infos' opt (older
than our options), a test's partial one. Torch-free; models/ and misc/ import this, never opts.py.

opts.py defines every option, once, and resolves a run's options at the edge (parse_opt, fill_defaults,
resolve_eval_options); its model options take their defaults from MODEL below, and model_k is the K rule it applies.
tests/test_defaults.py checks that these values are opts.py's defaults.
"""
import argparse
import dataclasses

# The options models.setup reads (SATModel's hyper-parameters), at opts.py's defaults.
MODEL = {'caption_model': 'sat', 'K': 6, 'rnn_size': 1024, 'num_layers': 1, 'input_encoding_size': 512,
         'att_feat_size': 2048, 'use_bn': 0, 'drop_prob_lm': 0.5, 'max_length': 20, 'use_cache': 1}


def model_k(opt):
    """K of the model the options build: 'transformer' is SAT with K = 1 whatever --K says (the reference's
    transformer infos carry its default K = 6). The one place this rule lives; opts.py applies it when it resolves
    options, model_options here, so everything below reads opt.K."""
    return 1 if opt.caption_model == 'transformer' else opt.K


def fields_of(config_class, opt):
    """{field: opt's value} of a config dataclass's fields that the options Namespace opt has (the typed configs
    built once at the edge, e.g. dataloader.DataConfig: a partial Namespace leaves the other fields at their
    defaults)."""
    return {f.name: getattr(opt, f.name) for f in dataclasses.fields(config_class) if hasattr(opt, f.name)}


def model_options(opt):
    """A copy of opt with the model options it lacks at their defaults (MODEL) and the K rule applied."""
    opt = argparse.Namespace(**{**MODEL, **vars(opt)})
    opt.K = model_k(opt)
    return opt
