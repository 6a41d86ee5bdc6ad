"""The layers point down (docs/architecture.md, "Layers"): every import of the project's own modules, read with ast
(module level and inside functions alike), goes to its own layer or one below; no import cycles; entry scripts
never import each other.

  misc/            the library's ground floor: imports only misc
  models/          imports misc and models
  dataloader.py    imports misc
  application      opts.py, evaluator.py, captioner.py: import the layers above and each other
  entry scripts    train.py, eval*.py, hubconf.py, scripts/, bench/: import anything below, never a top-level entry
                   script (scripts/ and bench/ compose their own steps: a script there may import a sibling)
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APPLICATION = {'opts', 'evaluator', 'captioner'}
ENTRY_SCRIPTS = {'train', 'eval', 'eval_cocotest', 'eval_ensemble', 'hubconf'}
ALLOWED = {'misc': {'misc'}, 'models': {'misc', 'models'}, 'dataloader': {'misc'},
           'application': {'misc', 'models', 'dataloader', 'application'},
           'entry': {'misc', 'models', 'dataloader', 'application'}}


def module_files():
    """{module name: path} of the project's modules (tests excepted)."""
    files = [p for p in REPO.glob('*.py')]
    for folder in ('misc', 'models', 'scripts', 'bench'):
        files += sorted((REPO / folder).rglob('*.py'))
    names = {}
    for path in files:
        parts = list(path.relative_to(REPO).with_suffix('').parts)
        if parts[0] == 'bench':  # bench's scripts put bench/ on sys.path: its helpers are top-level names there
            parts = ['bench'] + parts[1:]
        if parts[-1] == '__init__':
            parts = parts[:-1]
        names['.'.join(parts)] = path
    return names


def layer(name):
    top = name.split('.')[0]
    if top in ('misc', 'models', 'dataloader'):
        return top
    if name in APPLICATION:
        return 'application'
    return 'entry'


def imports(path, modules):
    """The project modules path imports (most specific module that exists: `from misc.files import atomic` is
    misc.files.atomic), with bench's own helpers named bench.<name>."""
    found = set()
    bench = path.parent.name == 'bench'

    def add(dotted):
        parts = dotted.split('.')
        if bench and f'bench.{parts[0]}' in modules:
            parts = ['bench'] + parts
        while parts and '.'.join(parts) not in modules:
            parts = parts[:-1]
        if parts:
            found.add('.'.join(parts))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                add(f'{node.module}.{alias.name}')
    return found


def graph():
    modules = module_files()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def is_entry_script(name, path):
    return layer(name) == 'entry' and (name in ENTRY_SCRIPTS or "__name__ == '__main__'" in path.read_text())


def test_every_import_points_down():
    modules = module_files()
    upward = [f'{name} ({layer(name)}) imports {target} ({layer(target)})'
              for name, targets in graph().items() for target in sorted(targets)
              if layer(target) not in ALLOWED[layer(name)] and layer(target) != 'entry'
              or layer(target) == 'entry' and layer(name) != 'entry']
    assert upward == []
    entry = {name for name, path in modules.items() if is_entry_script(name, path)}
    assert {'train', 'eval', 'eval_ensemble', 'scripts.prepro_labels', 'bench.compare'} <= entry
    crossing = [f'{name} imports {target}' for name, targets in graph().items() if name in entry
                for target in sorted(targets) if target in ENTRY_SCRIPTS]
    assert crossing == []


def strongly_connected(edges):
    """Tarjan's strongly connected components with more than one module (an import cycle each)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def package_edges(edges):
    """The edges without those between a package and its own submodules (models/__init__.py re-exporting
    models.sat, whose submodules import models: Python's own package mechanics, not a cycle between jobs)."""
    def related(a, b):
        return a.startswith(b + '.') or b.startswith(a + '.')
    return {v: {w for w in ws if not related(v, w)} for v, ws in edges.items()}


def test_no_import_cycles():
    assert strongly_connected(package_edges(graph())) == []


def test_the_walk_sees_an_upward_import_and_a_cycle():
    assert layer('misc.run.checkpoint') == 'misc' and 'models' not in ALLOWED['misc']
    assert strongly_connected({'a': {'b'}, 'b': {'a'}, 'c': {'a'}}) == [['a', 'b']]
    assert strongly_connected({'a': {'b'}, 'b': set()}) == []
