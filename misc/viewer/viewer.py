"""scripts/make_viewer.py: one self-contained HTML page over caption runs (vis/<id>.json), their per-image scores
(eval_results/<id>_<split>.json) and the references; the data is embedded as JSON, the page
(misc/viewer/viewer_template.html) draws, sorts and filters it in the browser. docs/viewer.md.
"""
import json
import math
import os
import shutil
import sys

from misc.errors import SaticError
from misc.files.atomic import atomic_write
from misc.files.folders import check_output_folder
from misc.files.readers import read_json

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'viewer_template.html')
DATA_MARK = '__VIEWER_DATA__'
METRIC_ORDER = ('CIDEr', 'Bleu_4', 'METEOR', 'ROUGE_L', 'SPICE', 'Bleu_1', 'Bleu_2', 'Bleu_3')


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _key(image_id):
    """Image ids as the page knows them: strings (json object keys are strings; 42 and "42" are one image)."""
    return str(image_id)


def _boxes(value):
    if isinstance(value, list) and all(isinstance(b, list) and len(b) == 4 and all(_number(x) for x in b)
                                       for b in value):
        return [[round(float(x), 1) for x in b] for b in value]
    return None


def _attention(value):
    """[[[region, weight], ..] per word] cleaned (strongest first), or None when absent or malformed."""
    if not isinstance(value, list):
        return None
    out = []
    for word in value:
        if not isinstance(word, list):
            return None
        pairs = []
        for pair in word:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], int)
                    and not isinstance(pair[0], bool) and pair[0] >= 0 and _number(pair[1])):
                return None
            pairs.append([pair[0], round(float(pair[1]), 4)])
        out.append(sorted(pairs, key=lambda p: -p[1]))
    return out


def load_run(path):
    """{image key: entry} of eval.py's vis/<id>.json, in the file's order (the first caption of an image wins)."""
    entries = read_json(path, 'caption file (--runs)')
    if not isinstance(entries, list) or not all(isinstance(e, dict) and 'image_id' in e
                                                and isinstance(e.get('caption'), str) for e in entries):
        raise SaticError(f"{path}: expected eval.py's vis/<id>.json, a list of {{image_id, caption}} entries: "
                         'pass the captions file of a run (not its _seq_kd beams or an eval_results file)')
    run, bad = {}, 0
    for e in entries:
        key = _key(e['image_id'])
        if key in run:
            continue
        entry = {'c': e['caption']}
        if 'attention' in e:
            entry['a'] = _attention(e['attention'])
            bad += entry['a'] is None
            if entry['a'] is None:
                del entry['a']
        if 'boxes' in e and _boxes(e['boxes']) is not None:
            entry['b'] = _boxes(e['boxes'])
        for name, field in (('width', 'width'), ('height', 'height'), ('image_width', 'width'),
                            ('image_height', 'height'), ('file_path', 'file_path')):  # (eval.py writes image_*)
            if name in e:
                entry[field] = e[name]
        run[key] = entry
    if bad:
        print(f'warning: {path}: {bad} captions have malformed attention (expected [[region, weight], ..] per word): '
              'shown without it', file=sys.stderr)
    return run


def load_scores(path, run=None, run_path=''):
    """(overall {metric: float}, {image key: {metric: float}}) of eval.py's eval_results/<id>_<split>.json; with
    run (load_run of run_path), checked to be that run's scores (check_scores_belong)."""
    data = read_json(path, 'scores file (--scores)')
    if not isinstance(data, dict) or not isinstance(data.get('imgToEval'), dict):
        raise SaticError(f"{path}: expected eval.py's eval_results/<id>_<split>.json ({{overall, imgToEval}}): "
                         'pass the file eval.py --language_eval 1 wrote for that run')
    overall = {m: float(v) for m, v in (data.get('overall') or {}).items() if _number(v)}
    per_image = {}
    for image_id, scores in data['imgToEval'].items():
        if isinstance(scores, dict):
            per_image[_key(image_id)] = {m: float(v) for m, v in scores.items() if m != 'image_id' and _number(v)}
    if run is not None:
        check_scores_belong(path, data['imgToEval'], run, run_path)
    return overall, per_image


def check_scores_belong(path, img_to_eval, run, run_path):
    """SaticError (one line) unless the scores file's captions (imgToEval's 'caption', which eval.py writes) are the
    run's: scores given in the wrong --scores order would show one run's scores on another's captions. A scores
    file without captions (not eval.py's) is not checked."""
    scored = {_key(image_id): e['caption'] for image_id, e in img_to_eval.items()
              if isinstance(e, dict) and isinstance(e.get('caption'), str)}
    if not scored:
        return
    common = [key for key in scored if key in run]
    if not common:
        raise SaticError(f'--scores {path} does not belong to --runs {run_path}: no image in common; give the scores '
                         "files in --runs order ('-' for a run without scores)")
    differ = [key for key in common if scored[key] != run[key]['c']]
    if differ:
        key = differ[0]
        raise SaticError(f'--scores {path} does not belong to --runs {run_path}: {len(differ)} of {len(common)} '
                         f'captions differ (image {key}: {scored[key]!r} there, {run[key]["c"]!r} here); give the '
                         "scores files in --runs order ('-' for a run without scores)")


def load_references(path):
    """({image key: [reference captions]}, {image key: file_name}) of a COCO-format annotation json."""
    data = read_json(path, 'reference json (--ref_json)')
    if not isinstance(data, dict) or not isinstance(data.get('annotations'), list):
        raise SaticError(f'{path}: expected a COCO-format caption json (annotations[] of {{image_id, caption}}): '
                         'pass e.g. coco-caption/annotations/captions_val2014.json or data/demo/captions_demo.json')
    refs = {}
    for ann in data['annotations']:
        if isinstance(ann, dict) and 'image_id' in ann and isinstance(ann.get('caption'), str):
            refs.setdefault(_key(ann['image_id']), []).append(ann['caption'].strip())
    names = {_key(img['id']): img['file_name'] for img in data.get('images') or []
             if isinstance(img, dict) and 'id' in img and isinstance(img.get('file_name'), str)}
    return refs, names


def _metric_order(names):
    known = [m for m in METRIC_ORDER if m in names]
    return known + sorted(n for n in names if n not in known)


def _run_names(paths, names):
    if names:
        if len(names) != len(paths):
            raise SaticError(f'--names has {len(names)} names for {len(paths)} --runs files: give one name per run')
        return names
    out = []
    for p in paths:
        base = os.path.splitext(os.path.basename(p))[0]
        out.append(base if base not in out else f'{base} ({len(out) + 1})')
    return out


def _place_image(image_root, rel, key, out_dir, link):
    """Copy (or symlink) image_root/rel to out_dir/imgs/<key><ext>; its src relative to the page, None if absent."""
    src = os.path.join(image_root, rel)
    if not rel or not os.path.isfile(src):
        return None
    name = f'{key}{os.path.splitext(rel)[1] or ".jpg"}'
    dst = os.path.join(out_dir, 'imgs', name)
    if os.path.isdir(dst) and not os.path.islink(dst):
        raise SaticError(f'{dst} is a folder, where the viewer puts the picture of image {key}: remove it or choose '
                         'another --output folder')
    try:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)
        if link:
            os.symlink(os.path.abspath(src), dst)
        else:
            shutil.copyfile(src, dst)
    except OSError as e:
        raise SaticError(f'cannot {"link" if link else "copy"} {src} to {dst} ({e.strerror or e}): check that '
                         'folder, or choose another --output folder') from None
    return f'imgs/{name}'


def parse_sort(spec, runs, metrics):
    """--sort METRIC[:RUN[-RUN]] (runs by 1-based number) or 'id' -> the page's initial sort."""
    if not spec:
        scored = [i for i, r in enumerate(runs) if r['overall'] is not None or r['scored']]
        if not scored or not metrics:
            return {'sort': 'id', 'order': 'asc'}
        metric = 'CIDEr' if 'CIDEr' in metrics else metrics[0]
        if len(scored) >= 2:  # the last scored run minus the first: where the new model gains and loses
            return {'sort': metric, 'run': scored[-1], 'minus': scored[0], 'order': 'desc'}
        return {'sort': metric, 'run': scored[0], 'minus': -1, 'order': 'desc'}
    if spec == 'id':
        return {'sort': 'id', 'order': 'asc'}
    metric, _, which = spec.partition(':')
    if metric not in metrics:
        raise SaticError(f'--sort {spec}: no per-image {metric!r} in the --scores files (they hold '
                         f'{", ".join(metrics) or "nothing"}): choose one of those, or id')
    try:
        parts = [int(x) - 1 for x in which.split('-')] if which else [len(runs) - 1]
    except ValueError:
        parts = [-1]
    if not 1 <= len(parts) <= 2 or not all(0 <= p < len(runs) for p in parts):
        raise SaticError(f'--sort {spec}: expected METRIC, METRIC:RUN or METRIC:RUN-RUN with runs numbered '
                         f'1..{len(runs)} in --runs order (e.g. CIDEr:2-1)')
    return {'sort': metric, 'run': parts[0], 'minus': parts[1] if len(parts) == 2 else -1, 'order': 'desc'}


def build_data(run_paths, score_paths=(), names=(), ref_json='', image_root='', images_json='', out_dir='.',
               link_images=False, title='', sort=''):
    """The page's data: {title, runs, metrics, overall_metrics, default, images}. score_paths: one per run ('' or
    '-' for a run without scores), or empty."""
    if not run_paths:
        raise SaticError('--runs: give at least one captions file (vis/<id>.json)')
    score_paths = list(score_paths or [])
    if score_paths and len(score_paths) != len(run_paths):
        raise SaticError(f'--scores has {len(score_paths)} files for {len(run_paths)} --runs files: give one per run, '
                         "in the same order ('-' for a run without scores)")
    if image_root and not os.path.isdir(image_root):
        raise SaticError(f'--image_root {image_root} is not a folder: pass the folder the file paths are relative to')
    if image_root:  # the pictures go to imgs/ beside the page: a file there stops that before any work
        check_output_folder(os.path.join(out_dir, 'imgs'), f'the pictures of --image_root (beside the page)')
    loaded = [load_run(p) for p in run_paths]
    scores = [load_scores(p, run, run_path) if p and p != '-' else (None, {})
              for p, run, run_path in zip(score_paths or [''] * len(run_paths), loaded, run_paths)]
    refs, ref_names = load_references(ref_json) if ref_json else ({}, {})
    paths = {}
    if images_json:
        data = read_json(images_json, 'image list (--images_json)')
        images = data.get('images') if isinstance(data, dict) else None
        if not isinstance(images, list):
            raise SaticError(f'{images_json}: expected a json with images[] of {{id, file_path}} '
                             '(cocotalk.json from prepro_labels.py)')
        paths = {_key(i['id']): i['file_path'] for i in images
                 if isinstance(i, dict) and 'id' in i and isinstance(i.get('file_path'), str)}
    run_names = _run_names(run_paths, list(names or []))

    order = []
    seen = set()
    for run in loaded:
        for key in run:
            if key not in seen:
                seen.add(key)
                order.append(key)
    metric_names = set()
    for _, per_image in scores:
        for s in per_image.values():
            metric_names.update(s)
    metrics = _metric_order(metric_names)
    overall_names = set()
    for overall, _ in scores:
        overall_names.update(overall or {})

    images, missing = [], 0
    for key in order:
        caps = []
        item = {'id': key, 'refs': refs.get(key, [])}
        for run, (_, per_image) in zip(loaded, scores):
            entry = run.get(key)
            if entry is None:
                caps.append(None)
                continue
            cap = {'c': entry['c']}
            if key in per_image:
                cap['s'] = per_image[key]
            for name in ('a', 'b'):
                if name in entry:
                    cap[name] = entry[name]
            caps.append(cap)
            for src, dst in (('width', 'w'), ('height', 'h')):
                if dst not in item and _number(entry.get(src)) and entry[src] > 0:
                    item[dst] = entry[src]
            if 'file_path' not in item and isinstance(entry.get('file_path'), str):
                item['file_path'] = entry['file_path']
        item['caps'] = caps
        if image_root:
            rel = item.pop('file_path', None) or paths.get(key) or ref_names.get(key, '')
            item['img'] = _place_image(image_root, rel, key, out_dir, link_images)
            missing += item['img'] is None
        item.pop('file_path', None)
        images.append(item)
    if image_root and missing:
        print(f'warning: {missing} of {len(images)} images not found under --image_root {image_root} '
              '(their attention is drawn as bars)', file=sys.stderr)

    runs = [{'name': n, 'file': p, 'scores_file': (score_paths[i] if score_paths and score_paths[i] != '-' else ''),
             'overall': scores[i][0], 'scored': bool(scores[i][1]), 'count': len(loaded[i]),
             'attention': sum('a' in e for e in loaded[i].values())}
            for i, (n, p) in enumerate(zip(run_names, run_paths))]
    default = parse_sort(sort, runs, metrics)
    title = title or ('Captions: ' + ' vs '.join(run_names))
    return {'title': title, 'runs': runs, 'metrics': metrics, 'overall_metrics': _metric_order(overall_names),
            'default': default, 'images': images}


def embed_json(obj):
    """JSON that is safe inside <script>: no '<', '>' or '&' (so no '</script>' or '<!--'), nor U+2028/U+2029."""
    text = json.dumps(obj, ensure_ascii=False, separators=(',', ':'), allow_nan=False)
    for char, escaped in (('&', '\\u0026'), ('<', '\\u003c'), ('>', '\\u003e'), ('\u2028', '\\u2028'),
                          ('\u2029', '\\u2029')):
        text = text.replace(char, escaped)
    return text


def render_page(data):
    with open(TEMPLATE, encoding='utf-8') as f:
        template = f.read()
    head, mark, tail = template.partition(DATA_MARK)
    assert mark and DATA_MARK not in tail, 'the viewer template must hold the data mark once'
    return head + embed_json(data) + tail


def write_viewer(output, run_paths, **kwargs):
    """Build the data, write the page to output (atomically); returns (path, data)."""
    out_dir = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise SaticError(f'--output {output} is a folder: pass the html file to write, e.g. {output}/compare.html')
    check_output_folder(out_dir, f'--output {output}')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise SaticError(f'--output {output}: cannot create its folder ({e.strerror}): choose another path') from None
    data = build_data(run_paths, out_dir=out_dir, **kwargs)
    page = render_page(data)
    atomic_write(output, lambda f: f.write(page.encode('utf-8')))
    return output, data
