"""scripts/make_viewer.py (misc/viewer/viewer.py, misc/viewer/viewer_template.html): the page's embedded data and its errors, then
the page itself in headless Chromium (skipped, with the reason, when no Chromium is installed).

The browser tests open the generated file from disk with `chromium --headless --dump-dom` and read the DOM the page's
script built: its initial state (sort, filter, selected word) comes from the URL's #hash, as a person's bookmark would.
One test drives Chromium through the DevTools protocol (a websocket, standard library only) with real mouse and
keyboard events: hover a word, click the filter box, type.
"""
import html.parser
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib

import pytest

from misc.errors import SaticError
from misc.viewer.viewer import embed_json, parse_sort, write_viewer
from scripts import make_viewer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOSTILE = '</script><script>alert(1)</script> a dog'
IDS = [101, 102, 103, 104, 105]
BASE = ['a man riding a horse on the street', 'a dog on the grass', 'a red car near the table', 'a cat on a table',
        HOSTILE]
SAT = ['a man riding a horse horse', 'a dog dog on the grass', 'a red car on the street', 'a cat on the table',
       'a big dog']
BASE_CIDER = [0.9, 0.4, 1.2, 0.3, 0.5]
SAT_CIDER = [1.0, 1.3, 0.2, 0.35, 0.1]  # SAT - baseline: +0.1, +0.9, -1.0, +0.05, -0.4
BOXES = [[10 + 40 * k, 20 + 25 * k, 150 + 40 * k, 160 + 25 * k] for k in range(8)]


def _attention(caption):
    return [[[(3 * i + j) % len(BOXES), round(0.7 / (j + 1), 3)] for j in range(3)] for i in range(len(caption.split()))]


def _png(path, width=64, height=48):
    """A plain valid PNG (one colour) without an imaging library."""
    raw = b''.join(b'\x00' + bytes([90, 140, 200]) * width for _ in range(height))

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    with open(path, 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def _write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f)
    return str(path)


@pytest.fixture
def files(tmp_path):
    """Two runs as eval.py writes them: the baseline without attention, SAT with attention and boxes."""
    d = tmp_path
    f = {'base': _write(d / 'vis' / 'base.json', [{'image_id': i, 'caption': c} for i, c in zip(IDS, BASE)]),
         'sat': _write(d / 'vis' / 'sat.json', [{'image_id': i, 'caption': c, 'attention': _attention(c),
                                                 'boxes': BOXES, 'width': 640, 'height': 480}
                                                for i, c in zip(IDS, SAT)])}
    for name, caps, cider in (('base', BASE, BASE_CIDER), ('sat', SAT, SAT_CIDER)):
        f[name + '_scores'] = _write(d / 'eval_results' / f'{name}_test.json', {
            'overall': {'CIDEr': sum(cider) / len(cider), 'Bleu_4': 0.2},
            'imgToEval': {str(i): {'image_id': i, 'CIDEr': s, 'Bleu_4': s / 4, 'caption': c}
                          for i, c, s in zip(IDS, caps, cider)}})
    f['refs'] = _write(d / 'refs.json', {
        'images': [{'id': i, 'file_name': f'{i}.png'} for i in IDS],
        'annotations': [{'image_id': i, 'id': 10 * i + k, 'caption': f'reference {k} of image {i}'}
                        for i in IDS for k in range(2)]})
    os.makedirs(d / 'pictures')
    for i in IDS:
        _png(d / 'pictures' / f'{i}.png')
    f['image_root'] = str(d / 'pictures')
    f['dir'] = d
    return f


def _argv(f, output, *extra):
    return ['--runs', f"{f['base']},{f['sat']}", '--scores', f"{f['base_scores']},{f['sat_scores']}",
            '--names', 'baseline,SAT', '--ref_json', f['refs'], '--output', str(output), *extra]


def embedded(page_path):
    with open(page_path, encoding='utf-8') as fh:
        page = fh.read()
    m = re.search(r'<script type="application/json" id="viewer-data">(.*?)</script>', page, re.S)
    return page, json.loads(m.group(1))


# ---- the page's data -------------------------------------------------------------------------------------------

def test_page_embeds_every_run_with_references_and_scores(files, tmp_path):
    out = tmp_path / 'out' / 'compare.html'
    assert make_viewer.main(_argv(files, out)) == 0
    page, data = embedded(out)
    assert [r['name'] for r in data['runs']] == ['baseline', 'SAT']
    assert [im['id'] for im in data['images']] == [str(i) for i in IDS]
    assert [im['caps'][0]['c'] for im in data['images']] == BASE
    assert [im['caps'][1]['c'] for im in data['images']] == SAT
    assert [im['caps'][1]['s']['CIDEr'] for im in data['images']] == SAT_CIDER
    assert data['images'][0]['refs'] == ['reference 0 of image 101', 'reference 1 of image 101']
    assert data['metrics'][:2] == ['CIDEr', 'Bleu_4'] and 'caption' not in data['metrics']
    assert data['default'] == {'sort': 'CIDEr', 'run': 1, 'minus': 0, 'order': 'desc'}  # SAT minus the baseline
    assert data['runs'][1]['attention'] == len(IDS) and data['runs'][0]['attention'] == 0
    assert data['images'][1]['caps'][1]['a'][1][0] == [3, 0.7] and data['images'][1]['w'] == 640
    assert 'http://' not in page.replace('http://www.w3.org/2000/svg', '') and 'https://' not in page  # no network


def test_missing_scores_attention_and_captions_are_tolerated(files, tmp_path, capsys):
    only_sat = _write(tmp_path / 'vis' / 'extra.json', [{'image_id': 999, 'caption': 'a lone caption'},
                                                         {'image_id': 101, 'caption': 'a man',
                                                          'attention': [['not', 'pairs']]}])
    _, data = write_viewer(str(tmp_path / 'v.html'), [files['base'], only_sat], score_paths=['-', ''],
                           ref_json='')
    assert 'malformed attention' in capsys.readouterr().err
    by_id = {im['id']: im for im in data['images']}
    assert set(by_id) == {str(i) for i in IDS} | {'999'}
    assert by_id['999']['caps'][0] is None and by_id['999']['caps'][1]['c'] == 'a lone caption'
    assert 'a' not in by_id['101']['caps'][1] and 's' not in by_id['101']['caps'][0]
    assert data['metrics'] == [] and data['default']['sort'] == 'id' and by_id['101']['refs'] == []
    assert [r['name'] for r in data['runs']] == ['base', 'extra']


def test_hostile_captions_stay_text(files, tmp_path):
    out = tmp_path / 'v.html'
    tricky = HOSTILE + ' <!-- & \u2028 \u2029'
    hostile = _write(tmp_path / 'vis' / 'hostile.json', [{'image_id': 1, 'caption': tricky}])
    write_viewer(str(out), [hostile], names=['</script><b>x'], title='<script>alert(2)</script>')
    page, data = embedded(out)
    assert page.lower().count('</script') == 2  # the data block's own end and the code's
    assert '<script>alert' not in page and '<!--' not in page and '\u2028' not in page
    assert data['images'][0]['caps'][0]['c'] == tricky and data['runs'][0]['name'] == '</script><b>x'
    assert json.loads(embed_json({'x': '</SCRIPT>'})) == {'x': '</SCRIPT>'}


@pytest.mark.parametrize('case', ['missing_run', 'bad_json', 'not_a_list', 'scores_not_eval', 'missing_refs',
                                  'count_mismatch', 'bad_sort', 'image_root_missing'])
def test_bad_input_is_one_line_naming_the_file(files, tmp_path, capsys, case):
    out = tmp_path / 'v.html'
    argv = _argv(files, out)
    bad = tmp_path / 'bad.json'
    if case == 'missing_run':
        argv[1], named = f"{files['base']},{tmp_path / 'nope.json'}", 'nope.json'
    elif case == 'bad_json':
        bad.write_text('[{"image_id": 1,')
        argv[1], named = f"{files['base']},{bad}", 'bad.json'
    elif case == 'not_a_list':
        bad.write_text('{"overall": {}}')
        argv[1], named = f"{files['base']},{bad}", 'bad.json'
    elif case == 'scores_not_eval':
        argv[3], named = f"{files['base_scores']},{files['sat']}", 'sat.json'
    elif case == 'missing_refs':
        argv[7], named = str(tmp_path / 'refs_missing.json'), 'refs_missing.json'
    elif case == 'count_mismatch':
        argv[3], named = files['base_scores'], '--scores'
    elif case == 'bad_sort':
        argv, named = argv + ['--sort', 'CIDEr:3-1'], '--sort'
    else:
        argv, named = argv + ['--image_root', str(tmp_path / 'no_pictures')], 'no_pictures'
    assert make_viewer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and named in err, err
    assert not out.exists()


@pytest.mark.parametrize('case', ['swapped', 'another_split'])
def test_scores_of_another_run_are_refused_in_one_line(files, tmp_path, capsys, case):
    """The scores files hold the captions they scored: scores given in the wrong order (or of other images) would
    show one run's CIDEr on the other's captions."""
    out = tmp_path / 'v.html'
    argv = _argv(files, out)
    if case == 'swapped':
        argv[3], named, which = f"{files['sat_scores']},{files['base_scores']}", 'sat_test.json', '5 of 5 captions'
    else:
        other = _write(tmp_path / 'eval_results' / 'val.json', {'overall': {}, 'imgToEval': {
            '7': {'image_id': 7, 'CIDEr': 0.5, 'caption': 'a dog'}}})
        argv[3], named, which = f"{files['base_scores']},{other}", 'val.json', 'no image in common'
    assert make_viewer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: --scores ') and named in err, err
    assert 'does not belong to --runs' in err and which in err and '--runs order' in err
    assert not out.exists()


def test_scores_without_captions_are_not_checked(files, tmp_path):
    """A scores file that names no captions (not eval.py's) cannot be checked: it is taken as given."""
    bare = _write(tmp_path / 'eval_results' / 'bare.json', {'overall': {}, 'imgToEval': {
        str(i): {'image_id': i, 'CIDEr': s} for i, s in zip(IDS, SAT_CIDER)}})
    _, data = write_viewer(str(tmp_path / 'v.html'), [files['base'], files['sat']],
                           score_paths=[files['base_scores'], bare])
    assert data['images'][1]['caps'][1]['s'] == {'CIDEr': SAT_CIDER[1]}


def test_url_state_keeps_the_selected_word(tmp_path):
    """The template's URL logic (node, no browser): a clicked word's select= is written into the #hash with the
    rest of the state, and read back into the selection; a run whose name holds ':' is named by its number."""
    node = shutil.which('node') or shutil.which('nodejs')
    if node is None:
        pytest.skip('node not installed')
    with open(os.path.join(REPO, 'misc', 'viewer', 'viewer_template.html'), encoding='utf-8') as f:
        template = f.read()
    start, end = template.index('  function runIndex('), template.index('  // ---- controls')
    select_value = re.search(r'  function selectValue\(.*?\n  }\n', template, re.S).group(0)
    script = r"""
var runs = [{name: 'baseline'}, {name: 'SAT'}, {name: 'a:b'}], metrics = ['CIDEr'], D = {default: {}};
var location = {search: '', hash: ''}, written = [];
var history = {replaceState: function (s, t, url) { written.push(url); }};
function fresh() { return {metric: 'CIDEr', run: 1, minus: 0, order: 'desc', word: '', repeats: '', scope: -1,
                           sel: {}, clicked: '', limit: 50}; }
var state = fresh();
""" + template[start:end] + select_value + r"""
var out = {};
writeHash(); out.before = written.pop();
state.clicked = selectValue('102', 1, 2); writeHash(); out.clicked = written.pop();
state = fresh(); readParams(new URLSearchParams(out.clicked.slice(1))); out.read = state.sel; out.kept = state.clicked;
out.colon = selectValue('7', 2, 0);
state = fresh(); readParams(new URLSearchParams('select=7:3:0')); out.colonRead = state.sel;
console.log(JSON.stringify(out));
"""
    (tmp_path / 'url.js').write_text(script)
    proc = subprocess.run([node, str(tmp_path / 'url.js')], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert 'select' not in out['before']
    assert out['clicked'] == '#sort=CIDEr&run=SAT&minus=baseline&order=desc&select=102%3ASAT%3A2'
    assert out['read'] == {'102': {'run': 1, 'word': 2}} and out['kept'] == '102:SAT:2'
    assert out['colon'] == '7:3:0' and out['colonRead'] == {'7': {'run': 2, 'word': 0}}


def test_cli_as_a_file_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, 'scripts/make_viewer.py', '--runs', str(tmp_path / 'missing.json'),
                           '--output', str(tmp_path / 'v.html')], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and 'missing.json' in proc.stderr, proc.stderr


def test_images_are_copied_or_linked_beside_the_page(files, tmp_path, capsys):
    os.remove(os.path.join(files['image_root'], '105.png'))
    out = tmp_path / 'site' / 'compare.html'
    assert make_viewer.main(_argv(files, out, '--image_root', files['image_root'])) == 0
    _, data = embedded(out)
    assert [im['img'] for im in data['images']] == [f'imgs/{i}.png' for i in IDS[:4]] + [None]
    assert os.path.isfile(tmp_path / 'site' / 'imgs' / '101.png')
    assert '1 of 5 images not found' in capsys.readouterr().err
    assert make_viewer.main(_argv(files, out, '--image_root', files['image_root'], '--link_images', '1')) == 0
    assert os.path.islink(tmp_path / 'site' / 'imgs' / '101.png')


def test_sort_flag():
    runs = [{'overall': {'CIDEr': 1}, 'scored': True}] * 3
    assert parse_sort('CIDEr:3-1', runs, ['CIDEr']) == {'sort': 'CIDEr', 'run': 2, 'minus': 0, 'order': 'desc'}
    assert parse_sort('CIDEr', runs, ['CIDEr'])['run'] == 2 and parse_sort('id', runs, [])['sort'] == 'id'
    for bad in ('BLEU', 'CIDEr:0', 'CIDEr:x', 'CIDEr:1-2-3'):
        with pytest.raises(SaticError):
            parse_sort(bad, runs, ['CIDEr'])


def test_run_demo_writes_the_comparison_viewer(tmp_path, capsys):
    """make demo's step 7 on small fake files named as the demo's step 5 writes them."""
    from scripts import run_demo
    base, sat = 'demo-nsc-transformer-baseline-b1', 'demo-nsc-sat-2-from-nsc-seqkd-b1'
    for run_id, caps in ((base, BASE), (sat, SAT)):
        _write(tmp_path / 'vis' / f'{run_id}.json', [{'image_id': i, 'caption': c} for i, c in zip(IDS, caps)])
        _write(tmp_path / 'eval_results' / f'{run_id}_test.json',
               {'overall': {'CIDEr': 0.5}, 'imgToEval': {str(i): {'CIDEr': 0.5} for i in IDS}})
    refs = _write(tmp_path / 'captions_demo.json', {'annotations': [{'image_id': 101, 'caption': 'a man'}]})
    out = run_demo.comparison_viewer(sys.executable, base, sat, refs, 2, vis_dir=str(tmp_path / 'vis'),
                                     results_dir=str(tmp_path / 'eval_results'), output=str(tmp_path / 'compare.html'))
    _, data = embedded(out)
    assert [r['name'] for r in data['runs']] == ['baseline', 'SAT K=2']
    assert data['default'] == {'sort': 'CIDEr', 'run': 1, 'minus': 0, 'order': 'desc'}
    assert data['title'] == 'Demo test split: the baseline vs SAT K=2 (greedy)'
    assert 'scripts/make_viewer.py' in capsys.readouterr().out  # the command is printed, as every demo step


# ---- the page in a real browser --------------------------------------------------------------------------------

def find_chromium():
    for name in (os.environ.get('SATIC_CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome', 'chrome'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = find_chromium()
browser = pytest.mark.skipif(CHROMIUM is None, reason='no Chromium for the browser tests: install it (Debian: '
                             'apt-get install chromium; `make test` does as root) or set SATIC_CHROMIUM')


def chromium(tmp_path, url, *flags):
    """Run headless Chromium on url; returns its stdout. No network is used: the page is a local file."""
    profile = tmp_path / 'chromium-profile'
    cmd = [CHROMIUM, '--headless', '--disable-gpu', '--no-sandbox', '--no-first-run', '--disable-extensions',
           '--disable-dev-shm-usage', f'--user-data-dir={profile}', '--virtual-time-budget=3000', *flags, url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


class Dom(html.parser.HTMLParser):
    """What a person sees of the table: rows in order, each row's selected word, boxes and bars."""

    def __init__(self, text):
        super().__init__()
        self.rows, self.boxes, self.bars, self.selected, self.count, self._in_count = [], [], [], [], '', False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get('class') or '').split()
        if tag == 'tr' and 'data-image-id' in a:
            self.rows.append(a['data-image-id'])
        if tag == 'rect' and 'box' in cls:
            self.boxes.append((self.rows[-1], int(a['data-region'])))
        if 'bar' in cls:
            self.bars.append((self.rows[-1], int(a['data-region'])))
        if 'sel' in cls:
            self.selected.append((self.rows[-1], a.get('data-word')))
        self._in_count = a.get('id') == 'count'

    def handle_data(self, data):
        if self._in_count:
            self.count += data
            self._in_count = False


def view(tmp_path, page, state=''):
    return Dom(chromium(tmp_path, f'file://{page}' + (f'#{state}' if state else ''), '--dump-dom'))


@pytest.fixture
def page(files, tmp_path):
    out = tmp_path / 'out' / 'compare.html'
    assert make_viewer.main(_argv(files, out, '--image_root', files['image_root'])) == 0
    return out


@browser
def test_browser_shows_every_row_and_sorts(page, tmp_path):
    dom = view(tmp_path, page)  # default: SAT's CIDEr minus the baseline's, highest first
    assert dom.rows == ['102', '101', '104', '105', '103'] and dom.count.startswith('showing 5 of 5')
    assert view(tmp_path, page, 'sort=CIDEr&run=SAT&minus=baseline&order=asc').rows == ['103', '105', '104', '101', '102']
    assert view(tmp_path, page, 'sort=CIDEr&run=baseline').rows == ['103', '101', '105', '102', '104']
    assert view(tmp_path, page, 'sort=id&order=asc').rows == ['101', '102', '103', '104', '105']


@browser
def test_browser_filters_hide_rows(page, tmp_path):
    assert view(tmp_path, page, 'sort=id&order=asc&filter=dog').rows == ['102', '105']
    assert view(tmp_path, page, 'sort=id&order=asc&filter=dog&scope=baseline').rows == ['102', '105']
    assert view(tmp_path, page, 'sort=id&order=asc&filter=red car').rows == ['103']
    assert view(tmp_path, page, 'sort=id&order=asc&repeats=adjacent').rows == ['101', '102']  # SAT's "horse horse"
    assert view(tmp_path, page, 'sort=id&order=asc&repeats=any&scope=baseline').rows == ['101', '104']
    dom = view(tmp_path, page, 'filter=zebra')
    assert dom.rows == [] and dom.count.startswith('showing 0 of 0')


@browser
def test_browser_hostile_caption_is_shown_as_text(page, tmp_path):
    text = chromium(tmp_path, f'file://{page}#sort=id&order=asc&filter=dog&scope=baseline', '--dump-dom')
    assert '&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;' in text and '<script>alert' not in text
    assert Dom(text).rows == ['102', '105']  # and the page still works


@browser
def test_browser_selected_word_draws_its_boxes_or_bars(page, files, tmp_path):
    dom = view(tmp_path, page, 'select=102:SAT:2')  # "dog" (the second one) of SAT's "a dog dog on the grass"
    expected = [(3 * 2 + j) % 8 for j in range(3)]
    assert dom.selected == [('102', '2')]
    assert sorted(r for _, r in dom.boxes) == sorted(expected) and {i for i, _ in dom.boxes} == {'102'}
    assert [r for _, r in dom.bars] == expected
    # without pictures the same word is a bar chart over regions
    plain = tmp_path / 'plain' / 'compare.html'
    assert make_viewer.main(_argv(files, plain)) == 0
    dom = view(tmp_path, plain, 'select=102:2:2')
    assert dom.boxes == [] and [r for _, r in dom.bars] == expected
    # a word without attention (the baseline saved none) draws nothing
    assert view(tmp_path, plain, 'select=102:1:1').bars == []


class DevTools:
    """Just enough of the Chrome DevTools protocol over a websocket (standard library only) to move the mouse and
    type like a person: Chromium starts with --remote-debugging-port=0 and prints the port it chose."""

    def __init__(self, tmp_path, url, timeout=30):
        import base64
        import socket
        import threading
        import urllib.request
        self.proc = subprocess.Popen(
            [CHROMIUM, '--headless', '--disable-gpu', '--no-sandbox', '--no-first-run', '--disable-extensions',
             '--disable-dev-shm-usage', f'--user-data-dir={tmp_path / "cdp-profile"}', '--remote-debugging-port=0',
             '--remote-debugging-address=127.0.0.1', '--window-size=1400,900', url],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        found = []

        def read_port():
            for line in self.proc.stderr:
                m = re.search(r'DevTools listening on ws://127\.0\.0\.1:(\d+)/', line)
                if m:
                    found.append(int(m.group(1)))
                    break
            for _ in self.proc.stderr:  # keep draining so Chromium never blocks on a full pipe
                pass
        threading.Thread(target=read_port, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if not found:
            self.close()
            pytest.fail('Chromium did not print its DevTools port')
        with urllib.request.urlopen(f'http://127.0.0.1:{found[0]}/json/list', timeout=timeout) as r:
            target = next(t for t in json.load(r) if t['type'] == 'page')
        path = target['webSocketDebuggerUrl'].split(f':{found[0]}', 1)[1]
        self.sock = socket.create_connection(('127.0.0.1', found[0]), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f'GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{found[0]}\r\nUpgrade: websocket\r\n'
                           f'Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n').encode())
        reply = b''
        while b'\r\n\r\n' not in reply:
            reply += self.sock.recv(1)
        assert b' 101 ' in reply.split(b'\r\n')[0], reply
        self.next_id = 0

    def _read(self, n):
        data = b''
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError('Chromium closed the DevTools socket')
            data += chunk
        return data

    def call(self, method, **params):
        self.next_id += 1
        payload = json.dumps({'id': self.next_id, 'method': method, 'params': params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack('>H', n)
                                if n < 65536 else bytes([0x80 | 127]) + struct.pack('>Q', n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            message, opcode = b'', None
            while True:  # one message, possibly in fragments
                b0, b1 = self._read(2)
                opcode = opcode or b0 & 0x0f
                n = b1 & 0x7f
                n = struct.unpack('>H', self._read(2))[0] if n == 126 else \
                    struct.unpack('>Q', self._read(8))[0] if n == 127 else n
                message += self._read(n)
                if b0 & 0x80:
                    break
            if opcode == 1:
                reply = json.loads(message)
                if reply.get('id') == self.next_id:
                    assert 'error' not in reply, reply
                    return reply['result']

    def js(self, expression):
        result = self.call('Runtime.evaluate', expression=expression, returnByValue=True)
        assert 'exceptionDetails' not in result, result
        return result['result'].get('value')

    def wait_for(self, expression, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.call('Runtime.evaluate', expression=expression, returnByValue=True)
            value = None if 'exceptionDetails' in result else result['result'].get('value')  # (still loading)
            if value:
                return value
            time.sleep(0.05)
        pytest.fail(f'the page never had {expression}')

    def center(self, selector):
        """Scroll the element into view; its centre in the viewport."""
        box = self.js(f'(function(){{var e=document.querySelector({json.dumps(selector)}); e.scrollIntoView({{block:"center"}});'
                      'var r=e.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2];})()')
        return box[0], box[1]

    def mouse(self, kind, x, y, **extra):
        self.call('Input.dispatchMouseEvent', type=kind, x=x, y=y, **extra)

    def close(self):
        if getattr(self, 'sock', None):
            self.sock.close()
        self.proc.kill()
        self.proc.wait(timeout=30)


@browser
def test_browser_hover_and_typing_like_a_person(page, tmp_path):
    """Real input events: the mouse moves over a word (its boxes appear), a click in the filter box and typing."""
    tools = DevTools(tmp_path, f'file://{page}#sort=id&order=asc')
    try:
        tools.wait_for("document.body.getAttribute('data-rendered') === '5'")
        rows = "Array.from(document.querySelectorAll('#rows tr')).map(function (r) { return r.dataset.imageId; })"
        assert tools.js(rows) == ['101', '102', '103', '104', '105']
        boxes = "document.querySelectorAll('tr[data-image-id=\"102\"] rect.box').length"
        assert tools.js(boxes) == 0
        x, y = tools.center('tr[data-image-id="102"] td.caption[data-run="1"] .w[data-word="2"]')
        tools.mouse('mouseMoved', x, y)
        assert tools.wait_for(boxes) == 3
        assert tools.js("document.querySelector('tr[data-image-id=\"102\"] .w.sel').textContent") == 'dog'
        regions = "Array.from(document.querySelectorAll('tr[data-image-id=\"102\"] .bar')).map(function (b) { return +b.dataset.region; })"
        assert tools.js(regions) == [6, 7, 0]
        x, y = tools.center('#filter-word')
        tools.mouse('mousePressed', x, y, button='left', clickCount=1)
        tools.mouse('mouseReleased', x, y, button='left', clickCount=1)
        tools.call('Input.insertText', text='grass')
        assert tools.wait_for(f"(function(){{var r={rows}; return r.length === 1 && r;}})()") == ['102']
        assert 'filter=grass' in tools.js('location.hash')  # the state is in the URL, to bookmark or share
    finally:
        tools.close()


@browser
def test_browser_click_puts_the_selected_word_in_the_url(page, tmp_path):
    """A click on a word (not a hover) writes select= into the URL; opening that URL selects the same word."""
    tools = DevTools(tmp_path, f'file://{page}#sort=id&order=asc')
    try:
        tools.wait_for("document.body.getAttribute('data-rendered') === '5'")
        x, y = tools.center('tr[data-image-id="102"] td.caption[data-run="1"] .w[data-word="2"]')
        tools.mouse('mouseMoved', x, y)
        assert 'select=' not in tools.js('location.hash')  # a hover shows, it does not bookmark
        tools.mouse('mousePressed', x, y, button='left', clickCount=1)
        tools.mouse('mouseReleased', x, y, button='left', clickCount=1)
        hash_ = tools.wait_for("location.hash.indexOf('select=') >= 0 && location.hash")
        assert 'select=102%3ASAT%3A2' in hash_ and 'sort=id' in hash_
    finally:
        tools.close()
    assert view(tmp_path, page, hash_[1:]).selected == [('102', '2')]
