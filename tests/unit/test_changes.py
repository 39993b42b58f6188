import json

import pytest

from engine.changes import ChangeList, check_cover, extents_to_runs, load_changed_areas, merge_runs
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
    changes = load_changed_areas(p, 10 * CS)
    assert changes.extents == [(5, 10)] and (changes.start, changes.end) == (0, 10 * CS)
    assert changes.origin == f"changed-areas file {p}"


def test_unsorted_and_overlapping_extents_are_merged(tmp_path):
    """DiskChangeInfo promises sorted, disjoint extents; a hand-made file may not keep it.
    Every byte any extent names must still be read, once."""
    doc = {"startOffset": 0, "length": 10 * CS, "changedArea": [
        {"start": 7 * CS + 5, "length": 10}, {"start": 100, "length": 2 * CS},
        {"start": CS, "length": 10}, {"start": 7 * CS, "length": CS}, {"start": 9 * CS + 1, "length": 1}]}
    changes = load_changed_areas(_write(tmp_path, doc), 10 * CS)
    assert extents_to_runs(changes.extents, CS, 10 * CS) == [(0, 3), (7, 8), (9, 10)]


@pytest.mark.parametrize("doc,needle", [
    ("{not json", "not valid JSON"),
    ({"changedArea": "x"}, "no 'changedArea' list"),
    ({"length": 10 * CS, "changedArea": [{"start": -1, "length": 5}]}, "changedArea[0]"),
    ({"length": 10 * CS, "changedArea": [{"start": 0}]}, "changedArea[0]"),
    ({"length": 10 * CS, "changedArea": [{"start": 9 * CS, "length": 2 * CS}]}, "outside the covered range"),
    ({"startOffset": 0, "length": 20 * CS, "changedArea": []}, "past the end of the disk"),
    ({"length": 10 * CS, "changedArea": [{"start": True, "length": 1}]}, "changedArea[0]"),
    ({"changedArea": [{"start": 0, "length": 5}]}, "no 'length'"),
    ({"startOffset": 0, "length": 1.5, "changedArea": []}, "'length' must be a non-negative integer"),
    ({"startOffset": 3 * CS, "length": 7 * CS, "changedArea": [{"start": CS, "length": 5}]},
     "outside the covered range [196608, 655360)"),
])
def test_bad_files_name_the_problem(tmp_path, doc, needle):
    with pytest.raises(BadInputError) as e:
        load_changed_areas(_write(tmp_path, doc), 10 * CS)
    assert needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_changed_areas(str(tmp_path / "none.json"), CS)


@pytest.mark.parametrize("start,end,needle", [
    (0, 5 * CS, "its length 327680 is not the disk's size 655360: is it the change list of another disk?"),
    (0, 0, "its length 0 is not the disk's size 655360"),        # a list that covers nothing
    (CS, 10 * CS, "the first 65536 bytes are not covered (startOffset 65536)"),
    (CS, 4 * CS, "the first 65536 bytes are not covered"),
])
def test_a_list_that_does_not_cover_the_disk_is_refused(start, end, needle):
    with pytest.raises(BadInputError) as e:
        check_cover(ChangeList([], start, end, "changed-areas file x.json"), 10 * CS, "web01")
    text = str(e.value)
    assert needle in text
    assert text.startswith(f"changed-areas file x.json covers bytes [{start}, {end}) of disk web01, which is "
                           f"{10 * CS} bytes")
    assert f"startOffset 0 and length {10 * CS}" in text and "leave out --changed-areas" in text


def test_a_list_that_covers_the_disk_is_used():
    check_cover(ChangeList([(5, 5)], 0, 10 * CS, "f"), 10 * CS, "web01")
    check_cover(ChangeList.whole([], 0), 0, "empty")
