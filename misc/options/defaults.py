"""The model options' defaults as a mapping (ModelConfig's), for the option edge (opts.py) and tests. Torch-free;
models/ and misc/ never import opts.py.

misc/options/configs.py declares every option once (default, type, help, group, range); opts.py generates argparse
from it and resolves a run's options at the edge (parse_opt, fill_defaults, resolve_eval_options). The K rule lives in
ModelConfig (resolve_k) only; an infos' options become a ModelConfig once, when read (misc.run.infos.model_config).
"""
import dataclasses

from misc.options.configs import ModelConfig, fields_of  # noqa: F401 (fields_of: the configs' from_opt)

# The options models.setup reads (SATModel's hyper-parameters), at their defaults (ModelConfig's).
MODEL = {name: value for name, value in dataclasses.asdict(ModelConfig()).items() if name != 'use_box'}
