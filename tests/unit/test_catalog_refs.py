"""Backup ids: DISK@N, @latest (any case), @-K, @YYYY-MM-DD; malformed ids are usage errors."""

import time

import pytest

from engine.catalog import BackupRecord
from engine.errors import NotFoundError, UsageError
from engine.vsphere.vmcatalog import VmBackupRecord, VmCatalog


def _local(day: str, hour: int) -> float:
    y, m, d = map(int, day.split("-"))
    return time.mktime((y, m, d, hour, 30, 0, 0, 0, -1))


@pytest.fixture
def chains(repo):
    """d: 8 points over three days; d2 (d's name plus a character): 3 points, later."""
    points = {"d": [("2026-11-28", 22), ("2026-11-29", 1), ("2026-11-29", 22), ("2026-11-30", 0),
                    ("2026-11-30", 12), ("2026-11-30", 23), ("2026-12-02", 9), ("2026-12-02", 10)],
              "d2": [("2026-12-03", 1), ("2026-12-03", 2), ("2026-12-04", 3)]}
    with repo.store.env.begin(write=True) as txn:
        for disk, times in points.items():
            for seq, (day, hour) in enumerate(times, 1):
                repo.catalog.put(txn, BackupRecord(disk, seq, _local(day, hour), "full", None, 1, 65536))
    return repo


def _resolve(repo, ref):
    with repo.store.read_txn() as txn:
        return repo.catalog.resolve(txn, ref).id


@pytest.mark.parametrize("ref,expected", [
    ("d@3", "d@3"), ("d@03", "d@3"), ("d@latest", "d@8"), ("d@LATEST", "d@8"), ("d@Latest", "d@8"),
    ("d@-1", "d@7"), ("d@-7", "d@1"), ("d@2026-11-30", "d@6"), ("d@2026-11-29", "d@3"), ("d@2026-11-28", "d@1"),
    ("d2@latest", "d2@3"), ("d2@-2", "d2@1"), ("d2@2026-12-03", "d2@2"),
])
def test_every_form_resolves_within_its_own_chain(chains, ref, expected):
    assert _resolve(chains, ref) == expected


@pytest.mark.parametrize("ref,needle", [
    ("d@9", "d has 8 backups; the newest: d@8 (2026-12-02 10:30), d@7 (2026-12-02 09:30), d@6"),
    ("d@-8", "and 3 older"),
    ("d@2026-12-01", "d@4 (2026-11-30 00:30), and 3 older"),
    ("d2@2026-11-30", "d2 has 3 backups; the newest: d2@3"),   # d's points are not d2's
    ("d2@4", "see 'blockvault list STORE --disk d2'"),
    ("nope@latest", "there are no backups of 'nope'"),
    ("d@4294967295", "no backup d@4294967295"),  # the largest number a catalog key holds
])
def test_unknown_points_list_the_newest_and_count_the_older(chains, ref, needle):
    with pytest.raises(NotFoundError) as info:
        _resolve(chains, ref)
    assert str(info.value).startswith(f"no backup {ref}; ") and needle in str(info.value)
    assert info.value.exit_code == 1


@pytest.mark.parametrize("ref", ["d", "d@", "@3", "d@0", "d@-0", "d@+1", "d@1.5", "d@x", "d@last",
                                 "d@2026-13-01", "d@2026-02-30", "d@26-11-30", "a b@1", "d@١", "d@²", "d@-²"])
def test_malformed_ids_are_usage_errors_with_the_syntax(chains, ref):
    with pytest.raises(UsageError) as info:
        _resolve(chains, ref)
    assert info.value.exit_code == 2
    assert "not a backup id" in str(info.value) or "is not a date" in str(info.value)


@pytest.mark.parametrize("ref,needle", [
    ("d@4294967296", "4294967296 is past the largest point number there can be, 4294967295"),
    ("d@99999999999999999999", "is past the largest point number"),
    ("d@-4294967296", "-4294967296 goes back further than the largest point number there can be"),
])
def test_numbers_past_32_bits_are_usage_errors(chains, ref, needle):
    """Catalog keys hold 32-bit sequence numbers: no point can be numbered beyond them (issue 9 item 16)."""
    with pytest.raises(UsageError) as info:
        _resolve(chains, ref)
    assert info.value.exit_code == 2 and needle in str(info.value)


def test_vm_ids_take_the_same_forms(repo):
    vms = VmCatalog(repo.store)
    with repo.store.env.begin(write=True) as txn:
        for seq, day in enumerate(["2026-11-29", "2026-11-30", "2026-11-30"], 1):
            vms.put(txn, VmBackupRecord("web01", seq, _local(day, 8 + seq), "full", None, [], {}, {}))
    with repo.store.read_txn() as txn:
        assert vms.resolve(txn, "web01@LATEST").seq == 3
        assert vms.resolve(txn, "web01@-2").seq == 1
        assert vms.resolve(txn, "web01@2026-11-29").seq == 1
        with pytest.raises(NotFoundError, match="web01 has 3 VM backups; the newest: web01@3"):
            vms.resolve(txn, "web01@7")
        with pytest.raises(UsageError, match="not a VM backup id; write web01@3"):
            vms.resolve(txn, "web01@yesterday")
