"""Models from checkpoint files: the layer above misc.run.checkpoint (which reads and checks the files and never
imports models/) that builds the model a checkpoint describes.

  load_model(model_path, config, vocab_size): models.setup of a ModelConfig with the weights of a model.pth;
  load_for_eval(model_path, infos_path, resolve): eval.py's (model, options, infos), checked to belong together;
  restore_model(saved, model): --start_from's model.pth (a misc.run.checkpoint.SavedRun) into the model train.py built.
"""
import os

import models
from misc.run.checkpoint import check_infos_match, load_model_state, recover_folder
from misc.options.configs import ModelConfig
from misc.run.infos import read_infos


def load_model(model_path, config, vocab_size, what='model'):
    """models.setup(config, vocab_size) with the weights of model_path (safe loading, sizes checked), on the
    CPU; what names the file in messages ('teacher model')."""
    model = models.setup(config, vocab_size)
    return models.load_weights(model, load_model_state(model_path, what), model_path)


def load_for_eval(model_path, infos_path, resolve):
    """eval.py's checkpoint: (model on the CPU, options, infos). A save of model_path's folder cut between its
    renames is completed first; infos_path must be an infos file (misc.run.infos.read_infos); resolve(infos) -> the
    options (opts.resolve_eval_options, at the edge), whose model options build the model; the model must be the
    one the infos were saved with."""
    recover_folder(os.path.dirname(model_path) or '.')  # finishes a save that a kill cut between its renames
    infos = read_infos(infos_path)
    opt = resolve(infos)
    config = ModelConfig.from_opt(opt)  # the edge's resolved options: converted once, here
    model = load_model(model_path, config, opt.vocab_size)
    # Our infos record the model they belong to (reference infos do not, and pass).
    check_infos_match(infos, model.state_dict(), config=config, infos_path=infos_path, model_path=model_path)
    return model, opt, infos


def restore_model(saved, model):
    """--start_from: the weights of saved's model.pth (a misc.run.checkpoint.SavedRun) into model (sizes checked);
    refuses a model.pth that is not the one the infos were saved with."""
    models.load_weights(model, load_model_state(saved.model_path, 'model'), saved.model_path)
    return saved.check_model(model)
