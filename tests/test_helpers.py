"""tests/helpers.py's guard on the reference fixtures: skip without ../shared, fail loudly when one is missing."""
import pytest

from tests import helpers


def test_shared_fixtures_skip_when_shared_is_absent_and_fail_when_one_is_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers, 'SHARED', str(tmp_path / 'absent'))
    mark = helpers.needs_shared('conformance', 'tensors.pt')
    assert mark.args == (True,) and 'absent' in mark.kwargs['reason']
    monkeypatch.setattr(helpers, 'SHARED', str(tmp_path))
    (tmp_path / 'conformance').mkdir()
    (tmp_path / 'conformance' / 'tensors.pt').write_bytes(b'')
    assert helpers.needs_shared('conformance', 'tensors.pt').args == (False,)
    with pytest.raises(FileNotFoundError, match='expected.json is missing although ../shared is there'):
        helpers.shared_path('conformance', 'expected.json')
