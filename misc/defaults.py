"""The defaults the library applies itself, to options Namespaces that may lack some: a reference infos' opt (older
than our options), a test's partial one. Torch-free; models/ and misc/ import this, never opts.py.

misc/configs.py declares every option once (default, type, help, group, range); opts.py generates argparse from it
and resolves a run's options at the edge (parse_opt, fill_defaults, resolve_eval_options). MODEL below is
ModelConfig's defaults as a mapping, and model_k applies ModelConfig's K rule to a Namespace.
"""
import argparse
import dataclasses

from misc.configs import ModelConfig, fields_of  # noqa: F401 (fields_of: the configs' from_opt)

# The options models.setup reads (SATModel's hyper-parameters), at their defaults (ModelConfig's).
MODEL = {name: value for name, value in dataclasses.asdict(ModelConfig()).items() if name != 'use_box'}


def model_k(opt):
    """K of the model the options build: ModelConfig.resolve_k (the K rule's one place) on opt's caption_model and
    K. opts.py applies it when it resolves options, model_options here, so everything below reads opt.K."""
    return ModelConfig.resolve_k(opt.caption_model, opt.K)


def model_options(opt):
    """A copy of opt with the model options it lacks at their defaults (MODEL) and the K rule applied."""
    opt = argparse.Namespace(**{**MODEL, **vars(opt)})
    opt.K = model_k(opt)
    return opt
