"""The reference disk cache: hits, misses, invalid entries, concurrency, records."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import pytest
import torch

from kfac_oracle.catalogue import load_cases
from kfac_oracle.reference.approximations import approximation
from kfac_oracle.runner import diskcache, references
from kfac_oracle.runner.diskcache import DiskCache
from kfac_oracle.runner.references import ReferenceCache
from kfac_oracle.runner.run import Session, run

KEY = {"what": "test", "n": 1}


class Counter:
    def __init__(self, value):
        self.value, self.calls = value, 0

    def __call__(self):
        self.calls += 1
        return self.value


def test_miss_then_hit_returns_the_value_bit_for_bit(tmp_path):
    cache = DiskCache(tmp_path)
    value = {"A": torch.randn(5, 3, dtype=torch.float64).t(), "n": 3, "s": ["x"]}
    compute = Counter(value)
    first = cache.get(KEY, compute)
    second = cache.get(KEY, compute)
    assert compute.calls == 1
    assert (cache.misses, cache.hits, cache.writes) == (1, 1, 1)
    assert first is value
    assert torch.equal(second["A"], value["A"])
    assert second["A"].stride() == value["A"].stride()
    assert second["A"].dtype == torch.float64
    assert second["n"] == 3 and second["s"] == ["x"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _flip_payload_byte(data: bytes) -> bytes:
    k = len(data) - 10
    return data[:k] + bytes([data[k] ^ 0xFF]) + data[k + 1 :]


def _garbage(data: bytes) -> bytes:
    return b"\x00garbage" * 10


def _no_header(data: bytes) -> bytes:
    return diskcache.MAGIC + b"{not json"


@pytest.mark.parametrize(
    "corrupt", [_truncate, _flip_payload_byte, _garbage, _no_header, lambda d: b""]
)
def test_a_corrupt_entry_is_recomputed_and_replaced(tmp_path, corrupt):
    cache = DiskCache(tmp_path)
    compute = Counter(torch.arange(100.0))
    cache.get(KEY, compute)
    path = cache.path(KEY)
    path.write_bytes(corrupt(path.read_bytes()))
    again = cache.get(KEY, compute)
    assert compute.calls == 2 and cache.invalid == 1
    assert torch.equal(again, torch.arange(100.0))
    assert DiskCache(tmp_path).load(KEY)[0]  # rewritten, valid


def test_an_entry_of_another_key_is_not_used(tmp_path):
    cache = DiskCache(tmp_path)
    cache.get(KEY, Counter(torch.zeros(3)))
    other = {"what": "test", "n": 2}
    cache.path(other).write_bytes(cache.path(KEY).read_bytes())
    compute = Counter(torch.ones(3))
    assert torch.equal(cache.get(other, compute), torch.ones(3))
    assert compute.calls == 1 and cache.invalid == 1


def test_a_payload_that_is_not_weights_only_is_rejected_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    payload = pickle.dumps({"A": Evil()}, protocol=2)
    import hashlib

    header = diskcache.canonical(
        {
            "key": KEY,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "size": len(payload),
        }
    )
    cache = DiskCache(tmp_path)
    cache.path(KEY).write_bytes(diskcache.MAGIC + header.encode() + b"\n" + payload)
    with pytest.raises(diskcache.InvalidEntry, match="weights-only"):
        diskcache.decode(KEY, cache.path(KEY).read_bytes())
    compute = Counter(torch.ones(2))
    assert torch.equal(cache.get(KEY, compute), torch.ones(2))
    assert compute.calls == 1 and cache.invalid == 1
    assert not marker.exists()


def test_location(monkeypatch, tmp_path):
    monkeypatch.setenv("KFAC_ORACLE_CACHE", str(tmp_path / "c"))
    assert diskcache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("KFAC_ORACLE_CACHE", "off")
    assert diskcache.cache_dir() is None and diskcache.default_cache() is None
    monkeypatch.delenv("KFAC_ORACLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert diskcache.cache_dir() == tmp_path / "xdg" / "kfac-oracle"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert diskcache.cache_dir() == tmp_path / "home" / ".cache" / "kfac-oracle"
    monkeypatch.setattr(diskcache, "_enabled", False)
    assert diskcache.cache_dir() is None


def test_an_unwritable_cache_warns_once_and_the_value_is_returned(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = DiskCache(blocker / "cache")
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        assert cache.get(KEY, Counter(7)) == 7
    assert cache.get({"n": 3}, Counter(8)) == 8  # no second warning, no error


def _write_many(root: str, worker: int, rounds: int) -> None:
    cache = DiskCache(diskcache.Path(root))
    for k in range(rounds):
        cache.store(KEY, {"worker": worker, "round": k, "A": torch.randn(300, 300)})


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    procs = [
        ctx.Process(target=_write_many, args=(str(tmp_path), w, 40)) for w in (0, 1)
    ]
    for p in procs:
        p.start()
    reader = DiskCache(tmp_path)
    seen = 0
    while any(p.is_alive() for p in procs):
        found, value = reader.load(KEY)
        seen += found
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert reader.invalid == 0  # a reader never saw a partial entry
    found, value = DiskCache(tmp_path).load(KEY)
    assert found and value["round"] == 39 and value["A"].shape == (300, 300)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"{diskcache.digest(KEY)}.kfc"]


CASE = "one_datum_mse_mean"


def test_the_key_follows_the_problem_and_the_environment(tmp_path, monkeypatch):
    (case,) = load_cases(CASE)
    refs = ReferenceCache(approximation("kfac"), disk=DiskCache(tmp_path))
    again = ReferenceCache(approximation("kfac"), disk=DiskCache(tmp_path))
    assert refs.fingerprint(case) == again.fingerprint(case)
    assert refs.fingerprint(case) != refs.fingerprint(case, "shuffle")
    single = ReferenceCache(approximation("kfac"), torch.float32, disk=False)
    assert single.disk is None and single.fingerprint(case) != refs.fingerprint(case)
    problem = case.build()
    before = diskcache.problem_fingerprint(problem, {})
    with torch.no_grad():
        next(problem.model.parameters())[0, 0] += 1e-12
    assert diskcache.problem_fingerprint(problem, {}) != before

    layer = case.layers[0]
    block = refs.exact_block(case, layer, "ggn")
    assert again.exact_block(case, layer, "ggn").equal(block)
    assert (again.disk.hits, again.disk.misses) == (1, 0)

    # Another oracle or torch version: a new key, recomputed.
    env = dict(diskcache.environment())
    env["oracle"] = "0.0.0-other"
    monkeypatch.setattr(diskcache, "_ENVIRONMENT", env)
    stale = ReferenceCache(approximation("kfac"), disk=DiskCache(tmp_path))
    calls = []
    real = references.exact_or_dense
    monkeypatch.setattr(
        references,
        "exact_or_dense",
        lambda *a: calls.append(a) or real(*a),
    )
    assert stale.exact_block(case, layer, "ggn").equal(block)
    assert len(calls) == 1 and (stale.disk.hits, stale.disk.misses) == (0, 1)


def _records(session: Session) -> list[dict]:
    records = run(None, "one_datum_cro_mean,mc_zero_variance_bce_sum", session=session)
    out = []
    for r in records:
        d = r.as_dict()
        d.pop("seconds")
        out.append(d)
    return out


def test_a_cached_run_has_the_records_of_an_uncached_run(tmp_path, monkeypatch):
    monkeypatch.setattr(diskcache, "_enabled", False)
    session = Session.start("reference", isolation="none")
    assert session.references.disk is None
    uncached = _records(session)
    session.close()

    monkeypatch.setattr(diskcache, "_enabled", True)
    monkeypatch.setenv("KFAC_ORACLE_CACHE", str(tmp_path))
    cold = Session.start("reference", isolation="none")
    assert _records(cold) == uncached
    cold.close()
    assert cold.references.disk.writes > 0 and cold.references.disk.hits == 0

    def no_compute(*args, **kwargs):
        raise AssertionError("a warm cache recomputed a reference")

    monkeypatch.setattr(references, "exact_or_dense", no_compute)
    monkeypatch.setattr(references, "reference_draws", no_compute)
    warm = Session.start("reference", isolation="none")
    assert _records(warm) == uncached
    warm.close()
    disk = warm.references.disk
    assert disk.hits == cold.references.disk.writes
    assert disk.misses == disk.writes == disk.invalid == 0
    assert os.listdir(tmp_path)
