import json

import pytest

from engine.changes import extents_to_runs, load_changed_areas, merge_runs
from engine.errors import BadInputError

CS = 65536


def test_unaligned_extents_cover_whole_chunks():
    assert extents_to_runs([(100, 10)], CS, 10 * CS) == [(0, 1)]
    assert extents_to_runs([(CS - 1, 2)], CS, 10 * CS) == [(0, 2)]
    assert extents_to_runs([(3 * CS, CS), (4 * CS, 1), (9 * CS, 5 * CS)], CS, 10 * CS) == [(3, 5), (9, 10)]
    assert extents_to_runs([(0, 0)], CS, CS) == []


def test_merge_runs():
    assert merge_runs([(0, 2), (5, 6)], [(1, 3)], [(6, 8)]) == [(0, 3), (5, 8)]


def _write(tmp_path, doc):
    p = tmp_path / "cbt.json"
    p.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return str(p)


def test_valid_file(tmp_path):
    p = _write(tmp_path, {"startOffset": 0, "length": 10 * CS,
                          "changedArea": [{"start": 5, "length": 10}, {"start": CS, "length": 0}]})
    assert load_changed_areas(p, 10 * CS) == [(5, 10)]


@pytest.mark.parametrize("doc,needle", [
    ("{not json", "not valid JSON"),
    ({"changedArea": "x"}, "no 'changedArea' list"),
    ({"changedArea": [{"start": -1, "length": 5}]}, "changedArea[0]"),
    ({"changedArea": [{"start": 0}]}, "changedArea[0]"),
    ({"changedArea": [{"start": 9 * CS, "length": 2 * CS}]}, "outside the covered range"),
    ({"startOffset": 0, "length": 20 * CS, "changedArea": []}, "past the end of the disk"),
    ({"changedArea": [{"start": True, "length": 1}]}, "changedArea[0]"),
])
def test_bad_files_name_the_problem(tmp_path, doc, needle):
    with pytest.raises(BadInputError) as e:
        load_changed_areas(_write(tmp_path, doc), 10 * CS)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_changed_areas(str(tmp_path / "none.json"), CS)
