"""eval.py --dump_images 1: a self-contained vis/index.html of captions, references and per-image CIDEr of one run.

Several runs side by side (sorting, filters, attention): scripts/make_viewer.py (misc/viewer/viewer.py).
"""
import html
import json
import os
import shutil

from misc.files.atomic import atomic_write
from misc.viewer.viewer import load_references


def _references(ref_json):
    """str(image_id) -> list of reference captions, from a COCO-format annotation file (empty if there is none)."""
    return load_references(ref_json)[0] if ref_json and os.path.isfile(ref_json) else {}


def _per_image_cider(lang_stats_path):
    if lang_stats_path and os.path.isfile(lang_stats_path):
        with open(lang_stats_path) as f:
            img_to_eval = json.load(f).get('imgToEval', {})
        return {int(k): v.get('CIDEr') for k, v in img_to_eval.items()}
    return {}


def write_index_html(predictions, run_id, split, beam_size, ref_json, input_json='', lang_stats_path=None,
                     image_root='', out_dir='vis', image_files=None):
    """Write out_dir/index.html for predictions [{image_id, caption[, file_path]}] of the run `run_id` (--id) on
    `split` at `beam_size`, with the references of ref_json; returns its path.

    With image_root, each image (image_root/<file_path of input_json>) is copied to out_dir/imgs/ and shown;
    image_files {image_id: path} (eval.py --image_folder) names the image files directly (no references then).
    """
    refs = {} if image_files else _references(ref_json)
    cider = _per_image_cider(lang_stats_path)
    file_paths = {}
    if image_files:
        image_root, file_paths = os.sep, {int(k): os.path.abspath(v) for k, v in image_files.items()}
    elif image_root:
        with open(input_json) as f:
            file_paths = {int(img['id']): img.get('file_path', '') for img in json.load(f).get('images', [])}
    if image_root:
        os.makedirs(os.path.join(out_dir, 'imgs'), exist_ok=True)
    rows = []
    for p in predictions:
        image_id = int(p['image_id'])
        cells = [f'<td>{image_id}</td>']
        if image_root:
            src = os.path.join(image_root, file_paths.get(image_id, ''))
            name = f'{image_id}{os.path.splitext(src)[1] or ".jpg"}'
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, 'imgs', name))
                cells.append(f'<td><img src="imgs/{html.escape(name)}" width="224"></td>')
            else:
                cells.append('<td>(image not found)</td>')
        cells.append(f"<td><b>{html.escape(p['caption'])}</b></td>")
        cells.append('<td>' + '<br>'.join(html.escape(r) for r in refs.get(str(image_id), [])) + '</td>')
        score = cider.get(image_id)
        cells.append(f'<td>{score:.3f}</td>' if isinstance(score, (int, float)) else '<td></td>')
        rows.append('<tr>' + ''.join(cells) + '</tr>')
    head = '<th>image</th>' + ('<th>picture</th>' if image_root else '') + \
        '<th>generated caption</th><th>references</th><th>CIDEr</th>'
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(run_id)}: captions</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:6px;vertical-align:top;text-align:left}} th{{background:#eee}}</style></head>
<body><h1>{html.escape(run_id)}</h1>
<p>{len(predictions)} images{'' if image_files else f' of split <code>{html.escape(str(split))}</code>'},
beam size {beam_size}.</p>
<table><tr>{head}</tr>
{chr(10).join(rows)}
</table></body></html>
"""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, 'index.html')
    atomic_write(path, lambda f: f.write(page.encode('utf-8')))
    return path
