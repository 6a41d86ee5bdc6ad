"""Language evaluation: COCO caption metrics of generated captions against a COCO-format reference file.

Used by eval.py, eval_cocotest.py and train.py's validation; the only importer of pycocoevalcap (the pinned COCO
caption toolkit). The numbers are those of pycocoevalcap's COCOEvalCap as the reference ran it (predictions filtered
to the images of the reference file, PTB tokenizer, Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE), with these differences
in how, not what:
- one PTB tokenizer run for references and predictions together (two in COCOEvalCap: same tokens);
- one METEOR java process per call, closed before returning (COCOEvalCap leaves it to the garbage collector);
- CIDEr by misc/cider_d.py, tested equal to pycocoevalcap's Cider (and faster);
- SPICE only when the Stanford CoreNLP 3.6.0 jars are installed (coco-caption/README.md); otherwise, or when SPICE
  fails, it is reported unavailable and the other metrics stand. Its per-image scores are matched to images by id
  (COCOEvalCap pairs its image-id-sorted scores with unsorted ids, misplacing per-image SPICE).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

from misc.cider_d import corpus_cider_d
from misc.errors import SaticError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_SPICE_LIB = os.path.join(REPO_ROOT, 'coco-caption', 'spice-lib')
SPICE_JARS = ('stanford-corenlp-3.6.0.jar', 'stanford-corenlp-3.6.0-models.jar')
# punctuation tokens that pycocoevalcap's PTBTokenizer wrapper removes
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}
JAVA_MISSING = ('Java not found: install a JRE (Debian: apt-get install default-jre-headless) '
                'or run with --language_eval 0')


def java_available():
    """True when a `java` executable is on PATH (the PTB tokenizer, METEOR and SPICE are Java programs)."""
    return shutil.which('java') is not None


def _package_dir(*parts):
    """A folder inside the installed pycocoevalcap (a namespace package: no __init__.py at its top)."""
    import pycocoevalcap
    return os.path.join(list(pycocoevalcap.__path__)[0], *parts)


def spice_status():
    """(available, reason): whether SPICE can run, i.e. Java and the CoreNLP 3.6.0 jars (in pycocoevalcap's
    spice/lib/, or in coco-caption/spice-lib/ from where language_eval links them into place)."""
    if not java_available():
        return False, 'Java not found'
    lib = _package_dir('spice', 'lib')
    if all(os.path.isfile(os.path.join(lib, jar)) for jar in SPICE_JARS):
        return True, 'CoreNLP jars in %s' % lib
    if all(os.path.isfile(os.path.join(USER_SPICE_LIB, jar)) for jar in SPICE_JARS):
        return True, 'CoreNLP jars in %s' % USER_SPICE_LIB
    return False, ('Stanford CoreNLP 3.6.0 jars (%s) are not installed: see coco-caption/README.md'
                   % ', '.join(SPICE_JARS))


def _place_spice_jars():
    """Link (or copy) the jars from coco-caption/spice-lib/ into pycocoevalcap/spice/lib/, where spice-1.0.jar's
    manifest looks for them."""
    lib = _package_dir('spice', 'lib')
    for jar in SPICE_JARS:
        target = os.path.join(lib, jar)
        if not os.path.isfile(target):
            source = os.path.join(USER_SPICE_LIB, jar)
            if os.path.lexists(target):  # a dangling link
                os.remove(target)
            try:
                os.symlink(source, target)
            except OSError:
                shutil.copyfile(source, target)


def ptb_tokenize(captions):
    """pycocoevalcap's PTB tokenization (Stanford PTBTokenizer 3.4.1, lower case, punctuation removed), one java run.
    captions: list of str -> list of str."""
    jar = _package_dir('tokenizer', 'stanford-corenlp-3.4.1.jar')
    with tempfile.NamedTemporaryFile('wb', suffix='.txt', delete=False) as f:
        f.write('\n'.join(c.replace('\n', ' ') for c in captions).encode())
    try:
        cmd = ['java', '-cp', jar, 'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines', '-lowerCase',
               '-encoding', 'utf-8', f.name]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise RuntimeError('PTB tokenizer failed: %s' % proc.stderr.decode(errors='replace').strip())
    lines = proc.stdout.decode().split('\n')
    lines += [''] * (len(captions) - len(lines))  # a trailing empty caption yields no line
    return [' '.join(w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS) for line in lines[:len(captions)]]


def _load_references(ref_json):
    """COCO-format json -> {image_id: [caption, ..]} in the file's image order (COCO API order)."""
    if not os.path.isfile(ref_json):
        raise SaticError('reference file %s not found: build it with python scripts/prepro_reference_json.py '
                         '(or pass --ref_json PATH)' % ref_json)
    with open(ref_json) as f:
        dataset = json.load(f)
    refs = {img['id']: [] for img in dataset.get('images', [])}
    for ann in dataset.get('annotations', []):
        if ann['image_id'] in refs:
            refs[ann['image_id']].append(ann['caption'])
    return {image_id: caps for image_id, caps in refs.items() if caps}


class _Meteor:
    """pycocoevalcap's METEOR scorer whose java process is closed explicitly (and surely)."""

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor
        self.scorer = Meteor()

    def compute_score(self, gts, res):
        return self.scorer.compute_score(gts, res)

    def close(self):
        proc = self.scorer.meteor_p
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        proc.kill()
        proc.wait()


def _spice(gts, res, verbose):
    """(mean, {image_id: per-category scores}) or None with the reason printed when SPICE cannot run."""
    available, reason = spice_status()
    if available:
        try:
            if not all(os.path.isfile(_package_dir('spice', 'lib', jar)) for jar in SPICE_JARS):
                _place_spice_jars()
            from pycocoevalcap.spice.spice import Spice
            mean, scores = Spice().compute_score(gts, res)
            return float(mean), dict(zip(sorted(gts), scores))  # Spice orders its scores by sorted image id
        except Exception as e:  # SPICE is optional: its failure must not lose the other metrics
            lines = str(e).strip().splitlines()
            reason = 'SPICE failed: %s' % (lines[-1] if lines else type(e).__name__)
    if verbose:
        print('SPICE: unavailable (%s)' % reason)
    return None


def language_eval(predictions, ref_json, split_name=None, out_path=None, spice='auto', verbose=True):
    """COCO caption metrics of predictions ([{"image_id": int, "caption": str}]) against ref_json.

    Only images present in ref_json are scored. spice: 'auto'/True to compute it when available, False to skip.
    Writes {"overall": .., "imgToEval": ..} to out_path (atomically) when given.
    Returns (overall {metric: float}, img_to_eval {image_id: {"image_id", metrics.., "caption"}})."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    references = _load_references(ref_json)
    if not java_available():
        raise SaticError(JAVA_MISSING)
    captions = {}
    for p in predictions:
        if p['image_id'] in references:
            if p['image_id'] in captions:
                print('WARNING: image %s has several predictions: scoring the first' % p['image_id'],
                      file=sys.stderr)
                continue
            captions[p['image_id']] = p['caption']
    if verbose:
        print('using %d/%d predictions%s' % (len(captions), len(predictions),
                                             ' (%s split)' % split_name if split_name else ''))
    if len(captions) < len(predictions):
        print('WARNING: %d predictions have an image id absent from %s: not scored'
              % (len(predictions) - len(captions), ref_json), file=sys.stderr)
    if not captions:
        raise SaticError('none of the %d predictions has an image id in %s: is it the right --ref_json?'
                         % (len(predictions), ref_json))
    image_ids = [i for i in references if i in captions]  # the reference file's order, as the COCO API gives

    ref_texts = [c for i in image_ids for c in references[i]]
    tokens = ptb_tokenize(ref_texts + [captions[i] for i in image_ids])
    gts, res, pos = {}, {}, 0
    for i in image_ids:
        gts[i] = tokens[pos:pos + len(references[i])]
        pos += len(references[i])
    for i, t in zip(image_ids, tokens[len(ref_texts):]):
        res[i] = [t]

    overall, per_image = {}, {}
    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=int(verbose))
    for n in range(4):
        overall['Bleu_%d' % (n + 1)], per_image['Bleu_%d' % (n + 1)] = bleu[n], bleus[n]
    meteor = _Meteor()
    try:
        overall['METEOR'], per_image['METEOR'] = meteor.compute_score(gts, res)
    finally:
        meteor.close()
    overall['ROUGE_L'], per_image['ROUGE_L'] = Rouge().compute_score(gts, res)
    overall['CIDEr'], per_image['CIDEr'] = corpus_cider_d([res[i][0] for i in image_ids],
                                                          [gts[i] for i in image_ids])
    spice_result = _spice(gts, res, verbose) if spice not in (False, 0, None) else None

    img_to_eval = {i: {'image_id': i} for i in image_ids}
    for metric, scores in per_image.items():
        overall[metric] = float(overall[metric])
        for i, s in zip(image_ids, scores):
            img_to_eval[i][metric] = float(s)
    if spice_result is not None:
        overall['SPICE'] = spice_result[0]
        for i in image_ids:
            img_to_eval[i]['SPICE'] = spice_result[1][i]
    for i in image_ids:
        img_to_eval[i]['caption'] = captions[i]
    if verbose:
        for metric, score in overall.items():
            print('%s: %0.3f' % (metric, score))
    if out_path:
        _write_json_atomic(out_path, {'overall': overall, 'imgToEval': img_to_eval})
    return overall, img_to_eval


def _write_json_atomic(path, obj):
    """Through a temp file + rename; an interrupted write leaves neither half a JSON nor the temp file."""
    from misc.checkpoint import atomic_write
    atomic_write(path, lambda f: f.write(json.dumps(obj).encode('utf-8')))
