"""Helpers shared by the bench/ scripts: the paper-size model, timing, machine facts, results.json merging.

Not a benchmark itself. The paper configuration (SATIC, Zhou et al. 2021): 6 encoder and 6 decoder layers,
d_model 512, d_ff 2048, 8 heads, COCO Karpathy vocabulary 9487 words, 2048-d bottom-up region features.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from misc.options.configs import ModelConfig  # noqa: E402
from misc.files.atomic import atomic_write  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.json')
VOCAB = 9487
PAPER = dict(input_encoding_size=512, rnn_size=2048, num_layers=6, att_feat_size=2048, vocab_size=VOCAB)


def paper_opt(K, **overrides):
    """The argparse.Namespace models.setup() reads, at the paper configuration."""
    opt = dict(caption_model='sat', K=K, drop_prob_lm=0.5, use_bn=0, max_length=20, use_cache=1, **PAPER)
    opt.update(overrides)
    return argparse.Namespace(**opt)


def paper_model(K, seed=0, full_length=True, device='cpu', **overrides):
    """A randomly initialised paper-size SATModel in eval mode.

    full_length: generator bias[0] = -1e4, so token 0 (end of caption) is never the argmax and never among a
    beam's top candidates: every greedy / beam run decodes the full max_length words, as a trained model's
    longest captions do (random weights would otherwise stop at arbitrary lengths and make timings meaningless).
    """
    torch.manual_seed(seed)
    opt = paper_opt(K, **overrides)
    model = models.setup(ModelConfig.from_opt(opt), opt.vocab_size)
    if full_length:
        with torch.no_grad():
            model.model.generator.proj.bias[0] = -1e4
    return model.to(device).eval()


def median_ms(fn, repeats, warmup=1, device=None):
    """Median wall time of fn() in milliseconds after `warmup` untimed calls. On a CUDA device the clock is read
    after torch.cuda.synchronize(), so the time is the device's work, not just its launch."""
    sync = torch.cuda.synchronize if device is not None and torch.device(device).type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def bench_device(name):
    """--device: 'cpu' or 'cuda' (refused in one line when no GPU is visible)."""
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('--device cuda: no CUDA GPU is visible to torch here; use --device cpu')
    return device


def machine(device=None):
    """CPU model, core count, torch version/threads and the CPU's bf16 support (and the GPU's name, CUDA version
    and driver-visible memory when device is CUDA), for the README and results."""
    model_name, flags = platform.processor() or '?', ''
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith('Model name:'):
                model_name = line.split(':', 1)[1].strip()
            if line.startswith('Flags:'):
                flags = line.split(':', 1)[1]
    except OSError:
        pass
    bf16 = [f for f in ('avx512_bf16', 'amx_bf16', 'avx512f') if f in flags.split()]
    info = {'cpu': model_name, 'cores': os.cpu_count(), 'torch': torch.__version__,
            'threads': torch.get_num_threads(), 'cpu_capability': torch.backends.cpu.get_cpu_capability(),
            'bf16_flags': bf16 or 'none (no avx512_bf16/amx_bf16 in lscpu flags)'}
    if device is not None and torch.device(device).type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_multiprocessors=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def describe(info):
    """One line naming the machine: the GPU when there is one, else the CPU."""
    if 'gpu' in info:
        return f"{info['gpu']} (CUDA {info['cuda']}), torch {info['torch']}, host {info['cores']} cores"
    return f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads"


def other_load():
    """Command lines of other CPU-heavy project processes running now (train/eval/demo/pytest), if any."""
    try:
        out = subprocess.run(['pgrep', '-af', 'run_demo.py|train.py|eval.py|pytest'], capture_output=True, text=True,
                             check=False).stdout
    except OSError:  # no pgrep on this machine
        return []
    own = str(os.getpid())
    return [line for line in out.splitlines() if line and not line.startswith(own + ' ') and 'pgrep' not in line]


def merge_results(key, value, path=RESULTS):
    """Read-modify-write bench/results.json atomically (each bench owns one key)."""
    results = {}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    results[key] = value
    text = json.dumps(results, indent=2, sort_keys=True) + '\n'
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))
