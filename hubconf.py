"""torch.hub entry points (PyTorch's convention for research repositories; no network involved):

    captioner = torch.hub.load('/path/to/satic', 'captioner', 'save/<id>', source='local')
    captioner.caption(['data/cocobu_att/42.npz'])

The argument is a run folder (its model-best.pth, else model.pth) or a model.pth file; keyword arguments are the
Captioner's (infos=..., device='cpu', beam_size=3, ...: eval.py's options). Returns captioner.Captioner.
"""
import os

dependencies = ['torch', 'numpy', 'PIL']


def captioner(run, infos=None, **options):
    """A captioner.Captioner of a run folder or a model.pth (paths relative to the working directory)."""
    from captioner import Captioner
    if os.path.isdir(str(run)):
        if infos is not None:
            raise ValueError('infos= goes with a model.pth path, not a run folder (its infos are found beside it)')
        return Captioner.from_run(run, **options)
    return Captioner.from_checkpoint(run, infos, **options)
