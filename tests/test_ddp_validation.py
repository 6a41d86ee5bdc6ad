"""torchrun --nproc_per_node 2 (gloo, CPU): validation sharded over the ranks gives one process's numbers, the
--reduce_on_plateau schedule steps on every rank, and a failure in one rank's validation ends every rank at once
(docs/speed.md, "Several GPUs")."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from misc.files.safe_load import load_pickle
from misc.eval.cider_d import corpus_cider_d
from tests.helpers import targs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason='torch.distributed/gloo missing')

# (1) train.validate on both ranks (sharded) and, on rank 0, alone (one process), with the same random weights
# (scaled up, so that the captions differ between images);
# (2) train.main with --reduce_on_plateau and a validation loss that never improves: the lr halves on every rank.
SHARDED_AND_PLATEAU = '''
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
import opts, train
from dataloader import DataConfig, DataLoader
from misc.train import optim
from misc.run.distributed import World
from misc.train.loss_wrapper import LossConfig, LossWrapper

out, argv, plateau_argv = sys.argv[1], sys.argv[2:sys.argv.index('--')], sys.argv[sys.argv.index('--') + 1:]
opt = opts.parse_opt(argv)
world = train.setup_distributed(opt.device, opt.dist_timeout_minutes)
result = {{}}
with DataLoader(DataConfig.from_opt(opt), rank=world.rank, world_size=world.size) as loader:
    run_opt = train.run_options(opt, loader)
    torch.manual_seed(0)
    model = train.build_model(run_opt, world.device)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    crit = LossWrapper(model, LossConfig.from_opt(run_opt)).crit
    sharded = train.validate(model, loader, crit, run_opt, world)
    result['sharded'] = {{k: sharded[k] for k in ('loss', 'predictions', 'score')}}
    if world.is_main:
        alone = train.validate(model, loader, crit, run_opt, World())
        result['alone'] = {{k: alone[k] for k in ('loss', 'predictions', 'score')}}

real_evaluate, optimizers, built = train.evaluate, [], []


def never_improving(*args, **kwargs):
    shard = real_evaluate(*args, **kwargs)
    shard.loss, shard.loss_parts = 1.0, [(start, 1.0) for start, _ in shard.loss_parts]
    return shard


def build_optimizer(*args):
    optimizers.append(real_build_optimizer(*args))
    return optimizers[-1]


real_build_optimizer, real_build_model = train.build_optimizer, train.build_model
train.evaluate, train.build_optimizer = never_improving, build_optimizer
train.build_model = lambda *a: built.append(real_build_model(*a)) or built[-1]
result['rc'] = train.main(plateau_argv)
result['lr'] = optim.get_lr(optimizers[0])
torch.save(built[0].state_dict(), os.path.join(out, 'weights%d.pth' % world.rank))
with open(os.path.join(out, 'rank%d.json' % world.rank), 'w') as f:
    json.dump(result, f)
'''

# train.main where one rank's validation raises: every rank must end (rank<r>.json written), none wait.
FAILING_VALIDATION = '''
import json, os, sys
sys.path.insert(0, {repo!r})
import train

out, where, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
rank = int(os.environ['RANK'])
if where == 'rank0-scoring':  # rank 0's COCO metrics fail
    def score_validation(*args):
        raise RuntimeError('boom in the metrics')
    train.score_validation = score_validation
elif where == 'rank1-decoding' and rank == 1:  # rank 1's share of the decoding fails
    def evaluate(*args, **kwargs):
        raise RuntimeError('boom in the decoding')
    train.evaluate = evaluate
try:
    rc = train.main(argv)
except BaseException as e:  # (an error main does not turn into a return code)
    rc = repr(e)
with open(os.path.join(out, 'rank%d.json' % rank), 'w') as f:
    json.dump({{'rc': rc}}, f)
'''


def torchrun(tmp_path, script_text, *args, timeout=180):
    script = tmp_path / 'rank.py'
    script.write_text(script_text.format(repo=str(REPO)))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    start = time.time()
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           str(script), *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.time() - start


def model_args(*extra):
    return ['--caption_model', 'sat', '--K', '2', '--init_from', 'none', *extra]


def test_sharded_validation_equals_one_process_and_plateau_steps_on_every_rank(tiny_dataset, tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    validation = targs(tiny_dataset, tmp_path / 'unused', *model_args('--val_batch_size', '2'))
    plateau = targs(tiny_dataset, tmp_path / 'plateau', *model_args(
        '--reduce_on_plateau', '--learning_rate', '1e-3', '--max_iters', '6', '--save_checkpoint_every', '1'))
    proc, _ = torchrun(tmp_path, SHARDED_AND_PLATEAU, out, *validation, '--', *plateau)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]

    # Each rank read and decoded its batches of 2 (val images 0-1 on rank 0, 2 on rank 1): merged, the captions,
    # their order, the CIDEr-D and the loss are those of one process decoding all three.
    alone, sharded = ranks[0]['alone'], ranks[0]['sharded']
    assert sharded['predictions'] == alone['predictions'] and ranks[1]['sharded'] == sharded
    assert len({p['caption'] for p in alone['predictions']}) == 3
    assert sharded['loss'] == alone['loss'] and sharded['score'] == -sharded['loss']
    refs = {}
    with open(tiny_dataset.ref_json) as f:
        for ann in json.load(f)['annotations']:
            refs.setdefault(ann['image_id'], []).append(ann['caption'])
    cider = [corpus_cider_d([p['caption'] for p in r['predictions']], [refs[p['image_id']] for p in r['predictions']])[0]
             for r in (alone, sharded)]
    assert cider[0] == cider[1]

    # The validation loss never improves: after 1 + 4 validations the lr halves, on BOTH ranks (one broadcast
    # score), and the weights stay equal.
    assert [r['rc'] for r in ranks] == [0, 0]
    assert ranks[0]['lr'] == ranks[1]['lr'] == pytest.approx(0.5e-3)
    weights = [torch.load(out / f'weights{r}.pth') for r in range(2)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert 'global batch: 2 images x 2 rank(s) x 5 captions = 20 captions per iteration' in proc.stdout


@pytest.mark.parametrize('where', ['rank0-scoring', 'rank1-decoding'])
def test_a_failing_validation_ends_every_rank(tiny_dataset, tmp_path, where):
    out, folder = tmp_path / 'out', tmp_path / 'ck'
    out.mkdir()
    argv = targs(tiny_dataset, folder, *model_args('--max_iters', '10', '--save_checkpoint_every', '3'))
    proc, seconds = torchrun(tmp_path, FAILING_VALIDATION, out, where, *argv, timeout=300)
    log = proc.stdout + proc.stderr
    assert seconds < 240, log[-3000:]  # a rank left waiting would wait --dist_timeout_minutes (60)
    ranks = [json.loads((out / f'rank{r}.json').read_text()) for r in range(2)]  # both ended on their own
    failing, other = (0, 1) if where == 'rank0-scoring' else (1, 0)
    assert 'RuntimeError' in str(ranks[failing]['rc']) and ranks[other]['rc'] == 2, ranks
    assert f'error: rank {failing} failed in validation: RuntimeError: boom' in log
    # rank 0 saved the state after the last completed iteration (3) before stopping
    assert load_pickle(str(folder / 'infos_run.pkl'))['iter'] == 3
    assert f'the state after iteration 3 is saved in {folder}' in log
