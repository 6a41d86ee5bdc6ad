"""misc/eval/coco_eval.py's SPICE launch: the java command line, a real Java run of spice-1.0.jar's cache and output code,
and the one-line messages when the CoreNLP jars or a JavaScript engine are missing."""
import json
import os
import subprocess
import zipfile

import pytest

from misc.eval import coco_eval
from misc.errors import SaticError
from tests.helpers import PREDICTIONS, write_reference_json

needs_java = pytest.mark.skipif(not coco_eval.java_available(), reason='java not installed')

OPENS = ['--add-opens', 'java.base/java.lang=ALL-UNNAMED', '--add-opens', 'java.base/java.util=ALL-UNNAMED',
         '--add-opens', 'java.base/java.math=ALL-UNNAMED', '--add-opens', 'java.base/java.net=ALL-UNNAMED',
         '--add-opens', 'java.base/java.text=ALL-UNNAMED', '--add-opens', 'java.base/java.util.concurrent=ALL-UNNAMED']


def _spice_jar():
    return coco_eval._package_dir('spice', coco_eval.SPICE_JAR)


def _jar(path, engine):
    """An empty jar, declaring a javax.script engine when engine is True."""
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('META-INF/MANIFEST.MF', 'Manifest-Version: 1.0\n')
        if engine:
            z.writestr(coco_eval.SCRIPT_ENGINE_SERVICE, 'org.mozilla.javascript.engine.RhinoScriptEngineFactory\n')
    return str(path)


def test_command_line_java17(monkeypatch, tmp_path):
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path))  # exists: its jars join the class path
    cmd = coco_eval.spice_command('in.json', 'out.json', 'cache', 17, '/usr/share/java/js.jar')
    lib = coco_eval._package_dir('spice', 'lib')
    class_path = os.pathsep.join([_spice_jar(), os.path.join(lib, '*'), os.path.join(str(tmp_path), '*'),
                                  '/usr/share/java/js.jar'])
    assert cmd == ['java', '-Xmx8G'] + OPENS + ['-cp', class_path, 'edu.anu.spice.SpiceScorer', 'in.json',
                                                '-cache', 'cache', '-out', 'out.json', '-subset', '-silent']
    with zipfile.ZipFile(_spice_jar()) as z:  # the main class is the jar's own
        assert 'Main-Class: %s' % coco_eval.SPICE_MAIN in z.read('META-INF/MANIFEST.MF').decode()


def test_command_line_old_and_new_java(monkeypatch, tmp_path):
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path / 'absent'))  # not on the class path
    java8 = coco_eval.spice_command('in.json', 'out.json', 'cache', 8)
    assert java8[:3] == ['java', '-Xmx8G', '-cp'] and not any(a.startswith('--') for a in java8)
    assert java8[3] == os.pathsep.join([_spice_jar(), os.path.join(coco_eval._package_dir('spice', 'lib'), '*')])
    java11 = coco_eval.spice_command('in.json', 'out.json', 'cache', 11)
    assert java11[2:2 + len(OPENS)] == OPENS and '--enable-native-access=ALL-UNNAMED' not in java11
    java25 = coco_eval.spice_command('in.json', 'out.json', 'cache', 25, 'js.jar')
    assert '--enable-native-access=ALL-UNNAMED' in java25 and java25[java25.index('-cp') + 1].endswith(':js.jar')


@pytest.mark.parametrize('text, major', [
    ('openjdk version "17.0.15" 2025-04-15\nOpenJDK Runtime Environment', 17),
    ('java version "1.8.0_101"\nJava(TM) SE Runtime Environment', 8),
    ('openjdk version "21" 2023-09-19', 21),
    ('openjdk version "25.0.3" 2026-04-21 LTS', 25),
    ('Error: could not find libjava.so', None)])
def test_parse_java_version(text, major):
    assert coco_eval.parse_java_version(text) == major


def test_find_js_jar(monkeypatch, tmp_path):
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path))
    monkeypatch.setattr(coco_eval, 'DEBIAN_JS_JAR', _jar(tmp_path / 'debian-js.jar.x', engine=True))
    _jar(tmp_path / 'stanford-corenlp-3.6.0.jar', engine=False)
    assert coco_eval.find_js_jar() == str(tmp_path / 'debian-js.jar.x')  # none in spice-lib: Debian's
    engine = _jar(tmp_path / 'rhino-engine-1.7.14.jar', engine=True)
    assert coco_eval.find_js_jar() == engine
    monkeypatch.setattr(coco_eval, 'DEBIAN_JS_JAR', str(tmp_path / 'absent.jar'))
    os.remove(engine)
    assert coco_eval.find_js_jar() is None


@pytest.fixture
def corenlp_in_spice_lib(monkeypatch, tmp_path):
    """coco-caption/spice-lib/ = an empty folder holding (empty) CoreNLP jars; Java's version is whatever is set."""
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path))
    monkeypatch.setattr(coco_eval, 'java_available', lambda: True)
    for jar in coco_eval.SPICE_JARS:
        _jar(tmp_path / jar, engine=False)
    return tmp_path


def test_java17_without_javascript_engine(monkeypatch, corenlp_in_spice_lib):
    monkeypatch.setattr(coco_eval, 'java_major_version', lambda: 17)
    monkeypatch.setattr(coco_eval, 'DEBIAN_JS_JAR', str(corenlp_in_spice_lib / 'absent.jar'))
    available, reason = coco_eval.spice_status()
    assert not available
    assert reason == ('Java 17 has no JavaScript engine, which SPICE needs to write its results: install '
                      'librhino-java (Debian: apt-get install librhino-java) or put a Rhino js.jar in %s/'
                      % corenlp_in_spice_lib)
    engine = _jar(corenlp_in_spice_lib / 'js.jar', engine=True)
    assert coco_eval.spice_setup() == ({'java_major': 17, 'js_jar': engine}, None)


def test_java11_uses_its_own_javascript_engine(monkeypatch, corenlp_in_spice_lib):
    monkeypatch.setattr(coco_eval, 'java_major_version', lambda: 11)
    monkeypatch.setattr(coco_eval, 'DEBIAN_JS_JAR', _jar(corenlp_in_spice_lib / 'js.jar.x', engine=True))
    assert coco_eval.spice_setup() == ({'java_major': 11, 'js_jar': None}, None)  # Nashorn
    assert coco_eval.spice_status() == (True, 'Java 11, JavaScript engine: built in (Nashorn)')


@needs_java
def test_missing_corenlp_is_one_line_and_the_other_metrics_stand(monkeypatch, tmp_path, capsys):
    class FakeMeteor:
        def compute_score(self, gts, res):
            return 0.25, [0.25] * len(gts)

        def close(self):
            pass

    lib = coco_eval._package_dir('spice', 'lib')
    if any(os.path.isfile(os.path.join(lib, jar)) for jar in coco_eval.SPICE_JARS):
        pytest.skip('CoreNLP jars are installed in pycocoevalcap/spice/lib/ here')
    monkeypatch.setattr(coco_eval, 'USER_SPICE_LIB', str(tmp_path / 'spice-lib'))
    monkeypatch.setattr(coco_eval, '_Meteor', FakeMeteor)
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    overall, img_to_eval = coco_eval.language_eval(PREDICTIONS, ref_json)
    spice_lines = [line for line in capsys.readouterr().out.splitlines() if 'SPICE' in line]
    assert spice_lines == [
        'SPICE: unavailable (Stanford CoreNLP 3.6.0 jars not found (stanford-corenlp-3.6.0.jar, '
        'stanford-corenlp-3.6.0-models.jar): put them in %s/ (from stanford-corenlp-full-2015-12-09.zip, Stanford '
        'CoreNLP 3.6.0; see coco-caption/README.md))' % (tmp_path / 'spice-lib')]
    assert list(overall) == ['Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr']
    assert overall['CIDEr'] > 0 and all('SPICE' not in scores for scores in img_to_eval.values())


def _real_spice_setup():
    """The setup of this machine's Java, CoreNLP jars or not; skips when SPICE's Java parts cannot run here."""
    if not coco_eval.java_available():
        pytest.skip('java not installed')
    if not os.path.isfile(_spice_jar()):
        pytest.skip('%s not found' % _spice_jar())
    major = coco_eval.java_major_version()
    if major is None:
        pytest.skip('`java -version` gives no version')
    js_jar = coco_eval.find_js_jar() if major >= 15 else None
    if major >= 15 and js_jar is None:
        pytest.skip('Java %d without a JavaScript engine: apt-get install librhino-java' % major)
    return {'java_major': major, 'js_jar': js_jar}


# Our own Java program, run with SPICE's command line in place of its main class: what SpiceScorer does with its
# cache (LmdbTupleDB: FST serialization into LMDB) and with its output (JSON pretty-printed by the "JavaScript"
# engine), without the CoreNLP parser this machine may lack.
PROBE = r'''
import java.io.FileWriter;
import java.util.*;
import javax.script.ScriptEngine;
import javax.script.ScriptEngineManager;

public class SpiceProbe {
    public static void main(String[] args) throws Exception {
        edu.anu.spice.LmdbTupleDB db = new edu.anu.spice.LmdbTupleDB(args[0]);
        Map<String, ArrayList<ArrayList<String>>> tuples = new HashMap<>();
        tuples.put("a man riding a horse", new ArrayList<>(List.of(new ArrayList<>(List.of("man")),
            new ArrayList<>(List.of("horse")), new ArrayList<>(List.of("man", "ride", "horse")))));
        db.putTransaction(tuples);
        Map<String, ArrayList<ArrayList<String>>> cached = db.getTransaction(List.of("a man riding a horse"));
        ScriptEngine engine = new ScriptEngineManager().getEngineByName("JavaScript");
        engine.put("jsonString", org.json.simple.JSONValue.toJSONString(cached));
        engine.eval("result = JSON.stringify(JSON.parse(jsonString), null, 2)");  // SpiceScorer's own line
        try (FileWriter out = new FileWriter(args[1])) {
            out.write((String) engine.get("result"));
        }
    }
}
'''


def test_real_java_runs_spice_cache_and_output_code(tmp_path):
    """SPICE's command line (flags and class path) runs spice-1.0.jar's parse cache and its JavaScript output step on
    this Java: fails with InaccessibleObjectException without the --add-opens, NullPointerException without js.jar."""
    setup = _real_spice_setup()
    if setup['java_major'] < 11:
        pytest.skip('Java %d cannot run a source file (java Probe.java needs Java 11+)' % setup['java_major'])
    modules = subprocess.run(['java', '--list-modules'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout
    if b'jdk.compiler@' not in modules:
        pytest.skip('this Java runtime has no jdk.compiler module (java Probe.java needs it)')
    probe = tmp_path / 'SpiceProbe.java'
    probe.write_text(PROBE)
    cache, out_json = tmp_path / 'cache', tmp_path / 'out.json'
    cache.mkdir()
    cmd = coco_eval.spice_command('in.json', str(out_json), str(cache), setup['java_major'], setup['js_jar'])
    main = cmd.index(coco_eval.SPICE_MAIN)
    proc = subprocess.run(cmd[:main] + [str(probe), str(cache), str(out_json)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=300)
    output = proc.stdout.decode(errors='replace')
    assert proc.returncode == 0, coco_eval._java_error_lines(output)
    text = out_json.read_text()
    assert json.loads(text) == {'a man riding a horse': [['man'], ['horse'], ['man', 'ride', 'horse']]}
    assert text.startswith('{\n  "a man riding a horse": [\n    [\n      "man"')  # JSON.stringify(.., null, 2)
    assert os.listdir(cache)  # LMDB's files


def test_real_spice_run(tmp_path, capfd):
    """The real launch of spice-1.0.jar on this Java: a score where CoreNLP is installed; elsewhere one SaticError
    line naming the missing CoreNLP classes (not Java 17's reflection or JavaScript failures), SPICE's output kept
    off the terminal."""
    setup = _real_spice_setup()
    gts = {7: ['a man riding a horse', 'a person on a horse'], 3: ['two dogs on the grass']}
    res = {7: ['a man rides a horse'], 3: ['a dog on grass']}
    if coco_eval.spice_status()[0]:
        mean, per_image = coco_eval.run_spice(gts, res, setup, cache_dir=str(tmp_path / 'cache'))
        assert sorted(per_image) == [3, 7] and 0 < mean <= 1
        assert mean == pytest.approx((per_image[3]['All']['f'] + per_image[7]['All']['f']) / 2)
        assert 'Object' in per_image[7]  # -subset
    else:
        with pytest.raises(SaticError) as error:
            coco_eval.run_spice(gts, res, setup, cache_dir=str(tmp_path / 'cache'))
        message = str(error.value)
        assert '\n' not in message and message.startswith('SPICE (spice-1.0.jar) failed with exit status 1: ')
        assert 'NoClassDefFoundError: edu/stanford/nlp/' in message, message
        assert 'InaccessibleObjectException' not in message and 'NullPointerException' not in message
    out, err = capfd.readouterr()
    assert out == '' and err == ''


def test_unusable_cache_folder_is_one_line(tmp_path):
    (tmp_path / 'file').write_text('')
    with pytest.raises(SaticError, match="cannot create SPICE's cache folder .*file/cache"):
        coco_eval.run_spice({1: ['a dog']}, {1: ['a dog']}, {'java_major': 17, 'js_jar': None},
                            cache_dir=str(tmp_path / 'file' / 'cache'))


# ---- --spice auto|0|1 and the jar check (issue 29) -------------------------------------------------------------
def test_zero_byte_or_truncated_jars_fail_the_check(monkeypatch, corenlp_in_spice_lib):
    """A jar that does not open (a failed download) is named, before any SPICE run; whole jars pass."""
    monkeypatch.setattr(coco_eval, 'java_major_version', lambda: 11)
    assert coco_eval.spice_status()[0]
    empty = corenlp_in_spice_lib / coco_eval.SPICE_JARS[1]
    empty.write_bytes(b'')
    available, reason = coco_eval.spice_status()
    assert not available and '\n' not in reason
    assert reason.startswith('%s does not open as a jar (empty or truncated download): replace it' % empty)
    whole = (corenlp_in_spice_lib / coco_eval.SPICE_JARS[0]).read_bytes()
    empty.write_bytes(whole[:len(whole) // 2])  # truncated: no central directory
    assert not coco_eval.jar_opens(str(empty))
    assert coco_eval.jar_opens(str(corenlp_in_spice_lib / coco_eval.SPICE_JARS[0]))
    assert not coco_eval.spice_status()[0]


@pytest.mark.parametrize('value, mode', [('auto', 'auto'), ('0', '0'), ('1', '1'), (True, 'auto'), (False, '0'),
                                         (None, '0'), (1, '1')])
def test_spice_mode(value, mode):
    assert coco_eval.spice_mode(value) == mode


def test_spice_mode_refuses_other_values():
    with pytest.raises(SaticError, match='--spice yes: use auto'):
        coco_eval.spice_mode('yes')


def test_spice_1_fails_before_decoding_where_it_cannot_run(monkeypatch, tmp_path):
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    monkeypatch.setattr(coco_eval, 'check_java', lambda: None)
    monkeypatch.setattr(coco_eval, 'spice_setup', lambda: (None, 'Stanford CoreNLP 3.6.0 jars not found'))
    for mode in ('auto', '0'):
        coco_eval.check_ready(ref_json, mode)  # SPICE optional: nothing to say yet
    with pytest.raises(SaticError) as error:
        coco_eval.check_ready(ref_json, '1')
    assert str(error.value) == ('--spice 1: SPICE cannot run here: Stanford CoreNLP 3.6.0 jars not found '
                                '(or pass --spice auto)')


@needs_java
@pytest.mark.parametrize('mode', ['auto', '0', '1'])
def test_spice_modes_in_language_eval(monkeypatch, tmp_path, capsys, mode):
    """auto: one line saying why not, the other metrics stand; 0: not a word about SPICE; 1: an error."""
    from tests.test_coco_eval import FakeMeteor
    monkeypatch.setattr(coco_eval, '_Meteor', FakeMeteor)
    monkeypatch.setattr(coco_eval, 'spice_setup', lambda: (None, 'CoreNLP jars are not installed'))
    ref_json = str(tmp_path / 'refs.json')
    write_reference_json(ref_json)
    if mode == '1':
        with pytest.raises(SaticError, match=r'^--spice 1: SPICE cannot run here: CoreNLP jars are not installed'):
            coco_eval.language_eval(PREDICTIONS, ref_json, spice=mode)
        return
    overall, _ = coco_eval.language_eval(PREDICTIONS, ref_json, spice=mode)
    spice_lines = [line for line in capsys.readouterr().out.splitlines() if 'SPICE' in line]
    assert spice_lines == (['SPICE: unavailable (CoreNLP jars are not installed)'] if mode == 'auto' else [])
    assert 'CIDEr' in overall and 'SPICE' not in overall


def test_validation_computes_spice_only_with_spice_1():
    import argparse
    import train
    assert [train.spice_at_validation(argparse.Namespace(spice=m)) for m in ('auto', '0', '1')] == ['0', '0', '1']
