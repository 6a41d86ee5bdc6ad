"""One timing job of bench/compare.py for ONE implementation: the SATIC tree given by --root (this one, or the
1ebca89 worktree) is imported first on sys.path, so `models`, `opts`, `misc` are that tree's. Nothing of this
tree's bench/ is imported. The weights, batches and cached tokens come from files written by compare.py, so both
implementations see exactly the same inputs. Writes one JSON result to --out (and the decoded tokens, if any,
to --out + '.pt').

    python bench/_ab_worker.py --root DIR --job train|decode --inputs DIR --out FILE [job options]
"""
import argparse
import json
import statistics
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--root', required=True)
    parser.add_argument('--job', choices=('train', 'decode'), required=True)
    parser.add_argument('--inputs', required=True, help='folder with weights_K*.pt, train_batch.pt, decode_*.pt')
    parser.add_argument('--out', required=True)
    parser.add_argument('--K', type=int, default=2)
    parser.add_argument('--mode', default='xe', help='train: xe | sc')
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--batch', type=int, default=50, help='decode: 1 or 50 images')
    parser.add_argument('--compile', type=int, default=0)
    parser.add_argument('--quantize', default='')
    parser.add_argument('--bf16', type=int, default=0)
    parser.add_argument('--threads', type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import models
    ModelConfig = misc_module('options.configs', 'configs').ModelConfig

    opt = argparse.Namespace(caption_model='sat', K=args.K, drop_prob_lm=0.5, use_bn=0, max_length=20, use_cache=1,
                             input_encoding_size=512, rnn_size=2048, num_layers=6, att_feat_size=2048,
                             vocab_size=9487)
    model = models.setup(ModelConfig.from_opt(opt), opt.vocab_size)
    weights = f'weights_train_K{args.K}.pt' if args.job == 'train' else f'weights_K{args.K}.pt'
    model.load_state_dict(torch.load(f'{args.inputs}/{weights}', weights_only=True), strict=True)
    result = {'root': args.root, 'job': args.job, 'K': args.K, 'threads': torch.get_num_threads()}
    compile_s = None
    if args.compile:
        compile_model = speed_paths().compile_model
        compile_model(model, training=args.job == 'train', decoding=args.job == 'decode')
    if args.job == 'train':
        result.update(train_job(args, model, torch))
    else:
        if args.quantize == 'int8':
            model = speed_paths().quantize_int8(model.eval())
        result.update(decode_job(args, model, torch))
    if compile_s is not None:
        result['compile_s'] = compile_s
    with open(args.out, 'w') as f:
        json.dump(result, f)


def misc_module(path, before):
    """The --root tree's misc.<path> (misc.<before> before misc/ was grouped into subpackages: an older --base)."""
    import importlib
    try:
        return importlib.import_module(f'misc.{path}')
    except ImportError:
        return importlib.import_module(f'misc.{before}')


def speed_paths():
    """The --root tree's models.accel.speed (models.speed before models/accel/, e.g. an older --base)."""
    try:
        from models.accel import speed
    except ImportError:
        from models import speed
    return speed


def timed(fn, iters, warmup):
    """(median s, min s, every timed s, the warm-up calls' s)."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), times, warm


def train_job(args, model, torch):
    import opts
    optim = misc_module('train.optim', 'optim')
    OptimConfig = misc_module('options.configs', 'configs').OptimConfig
    loss_wrapper = misc_module('train.loss_wrapper', 'loss_wrapper')
    LossConfig, LossWrapper = loss_wrapper.LossConfig, loss_wrapper.LossWrapper
    batch = torch.load(f'{args.inputs}/train_batch.pt', weights_only=False)
    flags = ['--caption_model', 'sat', '--K', str(args.K), '--cached_tokens', f'{args.inputs}/train-idxs.p',
             '--seq_per_img', '5', '--input_encoding_size', '512', '--rnn_size', '2048', '--num_layers', '6']
    flags += ['--noamopt'] if args.mode == 'xe' else ['--learning_rate', '2e-5']
    opt = opts.parse_opt(flags)
    sc = args.mode == 'sc'
    wrapper = LossWrapper(model, LossConfig.from_opt(opt))
    out = {'mode': args.mode}
    # The same loss on the same batch and weights: eval mode (no dropout); self-critical with one seed (the
    # samples are then the same when the log-probs are, and the reward with them).
    model.eval()
    torch.manual_seed(7)
    with torch.no_grad():
        loss = wrapper(batch, sc)
    out['eval_loss'] = float(loss['loss'])
    if sc:
        out['eval_reward'] = float(loss['reward'])
        # the samples themselves (the same seed): identical tokens, and their summed log-probs
        torch.manual_seed(7)
        with torch.no_grad():
            seq, logprobs = model(batch['fc_feats'], batch['att_feats'], batch['att_masks'],
                                  opt={'sample_max': 0, 'seq_per_img': 1}, mode='sample')
        out['sample_seq_sum'] = int(seq.sum())
        out['sample_logprob_sum'] = float((logprobs * (seq > 0)).sum())
    model.train()
    optimizer = optim.build(model, OptimConfig.from_opt(opt), opt.input_encoding_size)

    def iteration():
        optimizer.zero_grad()
        o = wrapper(batch, sc)
        o['loss'].backward()
        optim.clamp_gradients(model.parameters(), opt.grad_clip)
        optimizer.step()
    med, best, times, warm = timed(iteration, args.iters, args.warmup)
    out.update(s_per_iter=med, min_s=best, times=times, warmup_s=warm)
    return out


def decode_job(args, model, torch):
    data = torch.load(f'{args.inputs}/decode_b{args.batch}.pt', weights_only=False)
    att, masks = data['att'], data['masks']
    model.eval()
    holder = {}

    def run():
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bool(args.bf16)):
            holder['seq'] = model(None, att, masks, opt={'sample_max': 1, 'beam_size': 1}, mode='sample')[0]
    med, best, times, warm = timed(run, args.iters, args.warmup)
    torch.save(holder['seq'].clone(), args.out + '.pt')

    def encode():  # the encoder and the cross-attention keys/values, as decoding runs them
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bool(args.bf16)):
            memory, mask = model.encode(att, masks)
            model.init_cache(memory, mask)
    encode_med, encode_min = timed(encode, max(args.iters, 7), 1)[:2]
    return {'batch': args.batch, 'encode_ms': 1000 * encode_med, 'encode_min_ms': 1000 * encode_min, 'quantize': args.quantize, 'bf16': args.bf16, 'compile': args.compile,
            'ms': 1000 * med, 'min_ms': 1000 * best, 'times_ms': [1000 * t for t in times],
            'warmup_ms': [1000 * t for t in warm], 'words': float((holder['seq'] > 0).sum(1).float().mean())}


if __name__ == '__main__':
    main()
