"""Language evaluation: COCO caption metrics of generated captions against a COCO-format reference file.

Used by eval.py, eval_cocotest.py and train.py's validation; the only importer of pycocoevalcap (the pinned COCO
caption toolkit). The numbers are those of pycocoevalcap's COCOEvalCap as the reference ran it (predictions filtered
to the images of the reference file, PTB tokenizer, Bleu_1..4, METEOR, ROUGE_L, CIDEr, SPICE), with these differences
in how, not what:
- one PTB tokenizer run for references and predictions together (two in COCOEvalCap: same tokens);
- one METEOR java process per call, closed before returning (COCOEvalCap leaves it to the garbage collector), and
  killed at once on Ctrl-C or any error (pycocoevalcap's Meteor.__del__ would otherwise wait for ever on its lock);
- pycocoevalcap's debug prints (Bleu's testlen/ratio) only with toolkit_verbose (eval.py --verbose 1);
- a Java that fails to start or crashes is one SaticError line naming the program, not a traceback;
- CIDEr by misc/eval/cider_d.py, tested equal to pycocoevalcap's Cider (and faster);
- SPICE launched by us, not by pycocoevalcap's Spice (which runs `java -jar spice-1.0.jar` and fails on Java 15+):
  spice-1.0.jar's main class with --add-opens for its cache serializer (Java 9+) and, on Java 15+ (no Nashorn), a
  JavaScript engine's jar on the class path (Debian's librhino-java, or a js.jar in coco-caption/spice-lib/); its
  output captured; its parse cache in coco-caption/spice-cache/; nothing written inside the installed package;
- SPICE only when the Stanford CoreNLP 3.6.0 jars are installed (coco-caption/README.md) and open as jars (a
  zero-byte or truncated download fails the check); otherwise, without a JavaScript engine on Java 15+, or when
  SPICE fails, it is reported unavailable in one line saying what to do, and the other metrics stand. The switch
  --spice (ours; SPICE_MODES): auto = that; 0 = never; 1 = required: check_ready fails in one line before any
  decoding where it cannot run, and a failed SPICE run is an error. Its per-image scores are matched to images by
  id (COCOEvalCap pairs its image-id-sorted scores with unsorted ids, misplacing per-image SPICE).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile

from misc.eval.cider_d import corpus_cider_d
from misc.errors import SaticError
from misc.files.atomic import write_json
from misc.files.readers import check_field, read_json

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # misc/eval/ -> the repository
USER_SPICE_LIB = os.path.join(REPO_ROOT, 'coco-caption', 'spice-lib')
SPICE_CACHE = os.path.join(REPO_ROOT, 'coco-caption', 'spice-cache')  # SPICE's parses of captions (LMDB), reused
SPICE_JAR = 'spice-1.0.jar'  # in pycocoevalcap/spice/
SPICE_MAIN = 'edu.anu.spice.SpiceScorer'  # Main-Class of spice-1.0.jar's manifest
SPICE_JARS = ('stanford-corenlp-3.6.0.jar', 'stanford-corenlp-3.6.0-models.jar')
# the java.base packages that SPICE's cache serializer (fst-2.47) reflects into
SPICE_OPENS = ('java.lang', 'java.util', 'java.math', 'java.net', 'java.text', 'java.util.concurrent')
DEBIAN_JS_JAR = '/usr/share/java/js.jar'  # librhino-java: Rhino, a javax.script "JavaScript" engine
SCRIPT_ENGINE_SERVICE = 'META-INF/services/javax.script.ScriptEngineFactory'
# punctuation tokens that pycocoevalcap's PTBTokenizer wrapper removes
PUNCTUATIONS = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...",
                ";"}
SPICE_MODES = ('auto', '0', '1')  # --spice
JAVA_MISSING = ('Java not found: install a JRE (Debian: apt-get install default-jre-headless) '
                'or run with --language_eval 0')


def java_available():
    """True when a `java` executable is on PATH (the PTB tokenizer, METEOR and SPICE are Java programs)."""
    return shutil.which('java') is not None


def _package_dir(*parts):
    """A folder inside the installed pycocoevalcap (a namespace package: no __init__.py at its top)."""
    import pycocoevalcap  # (pycocoevalcap only when scoring: train.py --language_eval 0 never needs it)
    return os.path.join(list(pycocoevalcap.__path__)[0], *parts)


# Seconds each Java tool may take before it is killed and named as not answering (a java that starts but never
# answers must not hang an evaluation, or a training run's validation, for ever). Generous: the whole COCO val split
# tokenizes in seconds, METEOR scores it in about a minute, SPICE parses it in tens of minutes on its first run.
# SATIC_JAVA_TIMEOUT (seconds) overrides all three.
JAVA_TIMEOUTS = {'ptb': 600.0, 'meteor': 1800.0, 'spice': 7200.0}


def java_timeout(tool):
    """The timeout (seconds) of tool ('ptb', 'meteor', 'spice'): SATIC_JAVA_TIMEOUT when set, else JAVA_TIMEOUTS."""
    value = os.environ.get('SATIC_JAVA_TIMEOUT')
    if value:
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise SaticError(f'SATIC_JAVA_TIMEOUT={value}: give the seconds a Java tool may take (a number > 0)')
        return seconds
    return JAVA_TIMEOUTS[tool]


def _no_answer(what, seconds):
    """The one line for a Java tool that started but did not answer in time."""
    return ('%s did not answer within %g s (java: %s): it was stopped; check that Java works and is not starved of '
            'memory, set SATIC_JAVA_TIMEOUT=<seconds> for a slower machine, or run with --language_eval 0'
            % (what, seconds, shutil.which('java') or 'java'))


def _java_failed(what, detail):
    """The one line for a Java program that failed to start or crashed: what failed, and what to do."""
    detail = ' '.join(detail.split())[-300:] or 'no error output'
    return ('%s failed (java: %s; %s): check that `java -version` works (Debian: apt-get install '
            'default-jre-headless) or run with --language_eval 0' % (what, shutil.which('java') or 'java', detail))


def check_java():
    """SaticError (one line) unless Java is installed and starts with METEOR's heap (java -Xmx2G -version): called
    before decoding or training, so that a missing or broken Java fails in seconds, not after hours of work."""
    if not java_available():
        raise SaticError(JAVA_MISSING)
    what = '`java -Xmx2G -version`'
    try:
        proc = subprocess.run(['java', '-Xmx2G', '-version'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=120)
    except OSError as e:  # not executable
        raise SaticError(_java_failed(what, 'cannot start: %s' % e)) from None
    except subprocess.TimeoutExpired:
        raise SaticError(_java_failed(what, 'no answer within 120 s')) from None
    if proc.returncode != 0:
        raise SaticError(_java_failed(what, 'exit status %d: %s' % (proc.returncode,
                                                                   proc.stderr.decode(errors='replace'))))


def ptb_tokenize(captions):
    """pycocoevalcap's PTB tokenization (Stanford PTBTokenizer 3.4.1, lower case, punctuation removed), one java run.
    captions: list of str -> list of str."""
    jar = _package_dir('tokenizer', 'stanford-corenlp-3.4.1.jar')
    with tempfile.NamedTemporaryFile('wb', suffix='.txt', delete=False) as f:
        f.write('\n'.join(c.replace('\n', ' ') for c in captions).encode())
    what = 'the PTB tokenizer (%s)' % os.path.basename(jar)
    try:
        cmd = ['java', '-cp', jar, 'edu.stanford.nlp.process.PTBTokenizer', '-preserveLines', '-lowerCase',
               '-encoding', 'utf-8', f.name]
        timeout = java_timeout('ptb')
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)  # killed on Ctrl-C
    except OSError as e:  # java not executable
        raise SaticError(_java_failed(what, 'cannot start: %s' % e)) from None
    except subprocess.TimeoutExpired:  # (subprocess.run has killed it)
        raise SaticError(_no_answer(what, timeout)) from None
    finally:
        os.remove(f.name)
    if proc.returncode != 0:
        raise SaticError(_java_failed(what, 'exit status %d: %s' % (proc.returncode,
                                                                   proc.stderr.decode(errors='replace'))))
    lines = proc.stdout.decode().split('\n')
    lines += [''] * (len(captions) - len(lines))  # a trailing empty caption yields no line
    return [' '.join(w for w in line.rstrip().split(' ') if w not in PUNCTUATIONS) for line in lines[:len(captions)]]


def _load_references(ref_json):
    """COCO-format json -> {image_id: [caption, ..]} in the file's image order (COCO API order), checked: a dict with
    images[] of {id} and annotations[] of {image_id, caption string}, else one line naming the file."""
    if not os.path.isfile(ref_json):
        raise SaticError('reference file %s not found: build it with python scripts/prepro_reference_json.py '
                         '(or pass --ref_json PATH)' % ref_json)
    what, fix = 'reference json (--ref_json)', 'build it with python scripts/prepro_reference_json.py'
    dataset = read_json(ref_json, what, dict, 'a COCO caption json object {images, annotations}')
    for key, fields in (('images', ('id',)), ('annotations', ('image_id', 'caption'))):
        entries = dataset.get(key)
        check_field(isinstance(entries, list), ref_json, what, f'no {key}[] list (a COCO caption json has '
                    f'images[] and annotations[]): {fix}')
        for n, entry in enumerate(entries):
            missing = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            check_field(not missing, ref_json, what, f'{key}[{n}] has no {"/".join(missing)} '
                        f'({str(entry)[:60]}): {fix}')
            if key == 'annotations':
                check_field(isinstance(entry['caption'], str), ref_json, what, f'annotations[{n}] has a caption '
                            f'that is a {type(entry["caption"]).__name__}, not a string: {fix}')
    refs = {img['id']: [] for img in dataset['images']}
    for ann in dataset['annotations']:
        if ann['image_id'] in refs:
            refs[ann['image_id']].append(ann['caption'])
    refs = {image_id: caps for image_id, caps in refs.items() if caps}
    check_field(refs, ref_json, what, f'no image has a caption: {fix}')
    return refs


class _Meteor:
    """pycocoevalcap's METEOR scorer whose java process is closed explicitly, surely and at once.

    pycocoevalcap's Meteor holds a threading lock during compute_score and takes it again in __del__: after an
    exception inside compute_score (Ctrl-C while java computes) the lock stays held, and __del__ waits for it for
    ever (the program hangs until a second Ctrl-C). close() kills java, closes its pipes and gives the scorer a free
    lock, so that __del__ returns at once. A java that dies (fails to start, crashes) becomes one SaticError line."""

    WHAT = 'METEOR (meteor-1.5.jar)'

    def __init__(self):
        from pycocoevalcap.meteor.meteor import Meteor  # (pycocoevalcap: as _package_dir)
        try:
            self.scorer = Meteor()
        except OSError as e:  # java not executable
            raise SaticError(_java_failed(self.WHAT, 'cannot start: %s' % e)) from None

    def compute_score(self, gts, res):
        """pycocoevalcap's compute_score, with a watchdog: java is killed when it has not answered within
        java_timeout('meteor') seconds (its pipes then end, and the scorer stops reading)."""
        seconds, expired = java_timeout('meteor'), threading.Event()

        def stop():
            expired.set()
            self.scorer.meteor_p.kill()
        watchdog = threading.Timer(seconds, stop)
        watchdog.daemon = True
        watchdog.start()
        try:
            return self.scorer.compute_score(gts, res)
        except (ValueError, OSError):  # java died: an empty line where a score was due, or a broken pipe
            if expired.is_set():
                raise SaticError(_no_answer(self.WHAT, seconds)) from None
            raise SaticError(_java_failed(self.WHAT, self._death())) from None
        finally:
            watchdog.cancel()

    def _death(self):
        """'exit status N: <its stderr>' of the java process, killed if it has not exited within 5 s."""
        proc = self.scorer.meteor_p
        try:
            status = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        try:
            err = proc.stderr.read().decode(errors='replace')
        except (OSError, ValueError):
            err = ''
        return 'exit status %s: %s' % (status, err)

    def close(self):
        scorer = getattr(self, 'scorer', None)
        if scorer is None:
            return
        proc = scorer.meteor_p
        if proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:
                stream.close()
            except (OSError, ValueError):  # stdin's buffered data cannot reach a dead process
                pass
        proc.wait()
        scorer.lock = threading.Lock()  # the interrupted compute_score's lock would block __del__ for ever


def java_major_version(java='java'):
    """The major version of `java` from `java -version` (8 for "1.8.0_101", 17 for "17.0.15"), None if unknown."""
    try:
        proc = subprocess.run([java, '-version'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_java_version(proc.stdout.decode(errors='replace'))


def parse_java_version(text):
    """The major version in `java -version`'s output ('openjdk version "17.0.15" ..' -> 17), None if absent."""
    match = re.search(r'version "(\d+)(?:\.(\d+))?', text)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def _registers_script_engine(jar):
    """True when jar declares a javax.script engine (Rhino's js.jar, rhino-engine-*.jar)."""
    try:
        with zipfile.ZipFile(jar) as z:
            return SCRIPT_ENGINE_SERVICE in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def find_js_jar():
    """A jar with a JavaScript engine for SPICE on Java 15+: one in coco-caption/spice-lib/ (already on SPICE's class
    path), else Debian's librhino-java (/usr/share/java/js.jar); None when there is neither."""
    if os.path.isdir(USER_SPICE_LIB):
        for name in sorted(os.listdir(USER_SPICE_LIB)):
            jar = os.path.join(USER_SPICE_LIB, name)
            if name.endswith('.jar') and _registers_script_engine(jar):
                return jar
    return DEBIAN_JS_JAR if _registers_script_engine(DEBIAN_JS_JAR) else None


def _spice_lib_dirs():
    """The folders whose jars go on SPICE's class path: pycocoevalcap's spice/lib/ (SPICE's own dependencies, and
    CoreNLP if pycocoevalcap downloaded it there) and coco-caption/spice-lib/ (CoreNLP, optionally a JavaScript
    engine)."""
    return [d for d in (_package_dir('spice', 'lib'), USER_SPICE_LIB) if os.path.isdir(d)]


def jar_opens(path):
    """True when path is a zip archive with at least one entry (its central directory read: a zero-byte,
    truncated or HTML-instead-of-jar download is not)."""
    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def spice_setup():
    """(setup, reason): what SPICE needs to run here, or None and one line saying what is missing and what to do.
    setup = {'java_major': int, 'js_jar': path or None (Java < 15 has its own engine, Nashorn)}."""
    if not java_available():
        return None, 'Java not found'
    spice_jar = _package_dir('spice', SPICE_JAR)
    if not os.path.isfile(spice_jar):
        return None, '%s not found: reinstall pycocoevalcap (make setup)' % spice_jar
    if not jar_opens(spice_jar):
        return None, '%s does not open as a jar: reinstall pycocoevalcap (make setup)' % spice_jar
    found = {jar: [os.path.join(d, jar) for d in _spice_lib_dirs() if os.path.isfile(os.path.join(d, jar))]
             for jar in SPICE_JARS}
    missing = [jar for jar in SPICE_JARS if not found[jar]]
    if missing:
        return None, ('Stanford CoreNLP 3.6.0 jars not found (%s): put them in %s/ (from stanford-corenlp-full-'
                      '2015-12-09.zip, Stanford CoreNLP 3.6.0; see coco-caption/README.md)'
                      % (', '.join(missing), USER_SPICE_LIB))
    broken = [path for jar in SPICE_JARS for path in found[jar] if not jar_opens(path)]
    if broken:
        return None, ('%s %s not open as a jar (empty or truncated download): replace %s with the jar from '
                      'stanford-corenlp-full-2015-12-09.zip (see coco-caption/README.md)'
                      % (', '.join(broken), 'does' if len(broken) == 1 else 'do', 'it' if len(broken) == 1 else 'them'))
    java_major = java_major_version()
    if java_major is None:
        return None, 'cannot tell the Java version from `java -version`: check that Java starts'
    js_jar = find_js_jar() if java_major >= 15 else None
    if java_major >= 15 and js_jar is None:
        return None, ('Java %d has no JavaScript engine, which SPICE needs to write its results: install '
                      'librhino-java (Debian: apt-get install librhino-java) or put a Rhino js.jar in %s/'
                      % (java_major, USER_SPICE_LIB))
    return {'java_major': java_major, 'js_jar': js_jar}, None


def spice_status():
    """(available, reason): whether SPICE can run here (Java, the CoreNLP 3.6.0 jars, a JavaScript engine on Java
    15+), and why not or with what."""
    setup, reason = spice_setup()
    if setup is None:
        return False, reason
    return True, 'Java %d, JavaScript engine: %s' % (setup['java_major'], setup['js_jar'] or 'built in (Nashorn)')


def spice_command(in_json, out_json, cache_dir, java_major, js_jar=None):
    """The java command line of one SPICE run (list of str): spice-1.0.jar's main class with the class path given
    explicitly, so that the JavaScript engine's jar can join it.

    pycocoevalcap quirk (spice.py): it runs `java -jar -Xmx8G spice-1.0.jar ...`, which fails on Java 16+ (the FST
    serializer of SPICE's parse cache reflects into java.base: InaccessibleObjectException) and on Java 15+ (SPICE
    pretty-prints its output through the JavaScript engine, Nashorn, removed in JDK 15: NullPointerException), and
    `java -jar` ignores -cp. Here: --add-opens for FST (Java 9+; Java 8 rejects the option), and the jar of a
    JavaScript engine (Rhino) on the class path."""
    class_path = [_package_dir('spice', SPICE_JAR)] + [os.path.join(d, '*') for d in _spice_lib_dirs()]
    if js_jar:
        class_path.append(js_jar)
    cmd = ['java', '-Xmx8G']
    if java_major >= 9:
        for package in SPICE_OPENS:
            cmd += ['--add-opens', 'java.base/%s=ALL-UNNAMED' % package]
    if java_major >= 22:  # lmdbjni loads its native library: Java 24+ warns, later ones will refuse without this
        cmd.append('--enable-native-access=ALL-UNNAMED')
    return cmd + ['-cp', os.pathsep.join(class_path), SPICE_MAIN, in_json, '-cache', cache_dir, '-out', out_json,
                  '-subset', '-silent']


def _java_error_lines(output, count=3):
    """One line of a failed Java program's output: its last `count` lines from the first exception on (or its last
    lines), stack frames left out."""
    lines = [line.strip() for line in output.splitlines()]
    lines = [line for line in lines if line and not line.startswith('at ') and not re.match(r'\.\.\. \d+ more', line)]
    first = next((n for n, line in enumerate(lines) if re.search(r'(Exception|Error)\b', line)), 0)
    return ' | '.join(lines[first:][-count:])[-400:] or 'no error output'


def _spice_float(value):
    """SPICE's null (no tuple in a category) -> nan, as pycocoevalcap's float_convert."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float('nan')


def run_spice(gts, res, setup, cache_dir=None):
    """SPICE of tokenized captions: gts {image_id: [ref, ..]}, res {image_id: [caption]} ->
    (mean F-score of 'All', {image_id: {category: {'pr', 're', 'f', ..}}}), as pycocoevalcap's Spice computes them.
    SPICE's own output is captured; a failure is a SaticError (one line, with SPICE's last error lines).
    cache_dir: SPICE's parse cache, coco-caption/spice-cache/ by default."""
    cache_dir = cache_dir or SPICE_CACHE
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise SaticError('cannot create SPICE\'s cache folder %s: %s' % (cache_dir, e)) from None
    with tempfile.TemporaryDirectory(prefix='spice-') as tmp:
        in_json, out_json = os.path.join(tmp, 'input.json'), os.path.join(tmp, 'output.json')
        with open(in_json, 'w') as f:  # pycocoevalcap's input format, images in sorted id order
            json.dump([{'image_id': i, 'test': res[i][0], 'refs': gts[i]} for i in sorted(gts)], f)
        cmd = spice_command(in_json, out_json, cache_dir, setup['java_major'], setup['js_jar'])
        timeout = java_timeout('spice')
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)  # (Ctrl-C)
        except OSError as e:  # java not executable
            raise SaticError('SPICE could not start java: %s' % e) from None
        except subprocess.TimeoutExpired:  # (subprocess.run has killed it)
            raise SaticError(_no_answer('SPICE (%s)' % SPICE_JAR, timeout)) from None
        output = proc.stdout.decode(errors='replace')
        if proc.returncode != 0 or not os.path.isfile(out_json):
            raise SaticError('SPICE (%s) failed with exit status %d: %s (see coco-caption/README.md)'
                             % (SPICE_JAR, proc.returncode, _java_error_lines(output)))
        try:
            with open(out_json) as f:
                results = json.load(f)
        except ValueError as e:
            raise SaticError('SPICE (%s) wrote no readable results (%s): %s'
                             % (SPICE_JAR, e, _java_error_lines(output))) from None
    per_image = {item['image_id']: {category: {k: _spice_float(v) for k, v in score.items()}
                                    for category, score in item['scores'].items()} for item in results}
    if sorted(per_image) != sorted(gts):
        raise SaticError('SPICE (%s) wrote scores for %d images where %d were asked' % (SPICE_JAR, len(per_image),
                                                                                         len(gts)))
    mean = sum(s['All']['f'] for s in per_image.values()) / len(per_image)
    return mean, per_image


def spice_mode(spice):
    """--spice's value ('auto', '0', '1'; also True = 'auto', False/None/0 = '0', 1 = '1') -> one of SPICE_MODES."""
    if spice is True:
        return 'auto'
    if spice in (False, None):
        return '0'
    mode = str(spice)
    if mode not in SPICE_MODES:
        raise SaticError("--spice %s: use auto (where its jars work), 0 (never) or 1 (required)" % spice)
    return mode


def _spice(gts, res, verbose, mode='auto'):
    """(mean, {image_id: per-category scores}) or None with the reason printed when SPICE cannot run or fails
    (mode 'auto'); mode '1': a SaticError instead."""
    setup, reason = spice_setup()
    if setup is not None:
        try:
            return run_spice(gts, res, setup)
        except SaticError as e:  # SPICE is optional: its failure must not lose the other metrics
            if mode == '1':
                raise
            reason = str(e)
    if mode == '1':
        raise SaticError('--spice 1: SPICE cannot run here: %s (or pass --spice auto)' % reason)
    if verbose:
        print('SPICE: unavailable (%s)' % reason)
    return None


def language_eval(predictions, ref_json, split_name=None, out_path=None, spice='auto', verbose=True,
                  toolkit_verbose=False):
    """COCO caption metrics of predictions ([{"image_id": int, "caption": str}]) against ref_json.

    Only images present in ref_json are scored. spice (--spice, spice_mode): 'auto'/True to compute it when
    available (saying why not), '0'/False to skip, '1' to require it (a SaticError where it cannot run).
    verbose: print the count of predictions used, SPICE's availability and each metric ("CIDEr: 1.234").
    toolkit_verbose: also pycocoevalcap's own debug output (Bleu's {'testlen': ..} and "ratio: .." lines; eval.py
    --verbose 1), silenced otherwise.
    Writes {"overall": .., "imgToEval": ..} to out_path (atomically) when given.
    Returns (overall {metric: float}, img_to_eval {image_id: {"image_id", metrics.., "caption"}})."""
    from pycocoevalcap.bleu.bleu import Bleu  # (pycocoevalcap: as _package_dir)
    from pycocoevalcap.rouge.rouge import Rouge  # (as Bleu)

    spice = spice_mode(spice)
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
    bleu, bleus = Bleu(4).compute_score(gts, res, verbose=int(bool(toolkit_verbose)))
    for n in range(4):
        overall['Bleu_%d' % (n + 1)], per_image['Bleu_%d' % (n + 1)] = bleu[n], bleus[n]
    meteor = _Meteor()
    try:  # on any exception, Ctrl-C included, java is killed at once (see _Meteor)
        overall['METEOR'], per_image['METEOR'] = meteor.compute_score(gts, res)
    finally:
        meteor.close()
    overall['ROUGE_L'], per_image['ROUGE_L'] = Rouge().compute_score(gts, res)
    overall['CIDEr'], per_image['CIDEr'] = corpus_cider_d([res[i][0] for i in image_ids],
                                                          [gts[i] for i in image_ids])
    spice_result = _spice(gts, res, verbose, spice) if spice != '0' else None

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
        write_json({'overall': overall, 'imgToEval': img_to_eval}, out_path)
    return overall, img_to_eval


def check_ready(ref_json, spice='auto'):
    """Fail before decoding, not after, when the COCO metrics cannot run (no or broken Java, no reference file), or
    SPICE with --spice 1."""
    check_java()
    if spice_mode(spice) == '1':
        setup, reason = spice_setup()
        if setup is None:
            raise SaticError('--spice 1: SPICE cannot run here: %s (or pass --spice auto)' % reason)
    if not ref_json or not os.path.isfile(ref_json):
        raise SaticError(f"--ref_json {ref_json}: reference captions not found; build them with "
                         f"python scripts/prepro_reference_json.py (or pass --language_eval 0)")
    _load_references(ref_json)  # read and checked now: a truncated or malformed file fails before any work
