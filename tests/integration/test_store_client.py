"""The store client in one process against a real store: corruption, duplicates, resume."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from pathlib import Path

import pytest

from specctl.errors import RecordError, StoreError, StoreUnavailable
from specctl.store import Client
from specctl.store import control as keys
from specctl.store.leases import Lease
from specctl.store.objects import NOT_FOUND
from tests.conftest import run_cli
from tests.integration.store_worker import (
    check_record,
    make_record,
    prepared,
    running_store,
    tokens,
)

pytestmark = pytest.mark.integration
PROMPTS = 10


def put(client: Client, seq: int, corrupt: bool = False, placed: bool = False):
    rec, epoch, index, T = make_record(client, seq, PROMPTS, placed)
    if corrupt:
        rec[rec.numel() // 2] ^= 0x5A  # inside a section: header intact, section CRC wrong
    return client.put_record(rec, epoch=epoch, index=index, T=T)


def publish(client: Client, n: int) -> None:
    """Set the run's prompt count, then lease and put the next n seqs."""
    client.run_meta("num_prompts", str(PROMPTS))
    lease = client.lease_prompts(n, limit=PROMPTS)
    assert lease is not None and len(lease.seqs) == n
    for seq in lease.seqs:
        assert put(client, seq) is not None
        lease.done(seq)


def leased(st: dict, n: int) -> tuple[Client, Client, Lease]:
    """A producer and a trainer of the store `st`; the producer leased the first n seqs."""
    prod = Client.connect(st["address"], role="producer")
    cons = Client.connect(st["address"], role="trainer")
    prod.run_meta("num_prompts", str(PROMPTS))
    lease = prod.lease_prompts(n, limit=PROMPTS)
    assert lease is not None and lease.seqs == list(range(n))
    return prod, cons, lease


def drain(client: Client, n: int) -> list:
    got = [client.next_record(timeout_s=10) for _ in range(n)]
    assert all(g is not None for g in got)
    return got


def sid_seq(got) -> int:
    return got.descriptor.epoch * PROMPTS + got.descriptor.index


def test_corrupt_records_come_back_and_resume_requeues_the_untrained(tmp_path: Path) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod = Client.connect(st["address"], role="producer")
        cons = Client.connect(st["address"], role="trainer")
        # 1. run facts are set once
        assert prod.run_meta("num_prompts", str(PROMPTS)) == str(PROMPTS)
        with pytest.raises(StoreError, match="num_prompts"):
            cons.run_meta("num_prompts", "11")
        # 2. a corrupted record is dropped by the reader and its sample handed back
        lease = prod.lease_prompts(6, limit=PROMPTS)
        assert lease is not None and lease.seqs == [0, 1, 2, 3, 4, 5]
        for seq in lease.seqs:
            assert put(prod, seq, corrupt=seq == 2) is not None
            lease.done(seq)
        first = drain(cons, 5)
        assert sorted(map(sid_seq, first)) == [0, 1, 3, 4, 5]
        assert cons.next_record(timeout_s=0.3) is None
        assert cons.stats()["corrupt"] == 1
        # 3. the handed-back seq is leased first and arrives intact
        lease = prod.lease_prompts(2, limit=PROMPTS)
        assert lease is not None and lease.seqs == [2, 6]
        for seq in lease.seqs:
            put(prod, seq)
            lease.done(seq)
        second = drain(cons, 2)
        assert sorted(map(sid_seq, second)) == [2, 6]
        for g in first + second:
            check_record(g.record, sid_seq(g))
        # 4. a sample already published is not put again; a wrong header is refused
        assert put(prod, 0) is None
        rec, *_ = make_record(prod, 7, PROMPTS)
        with pytest.raises(RecordError, match="put_record was told"):
            prod.put_record(rec, epoch=0, index=8, T=5)
        # 5. train 3, "crash" the trainer, resume: the 4 others come back, nothing is left
        cons.ack(first[:3])
        trained = {(g.descriptor.epoch, g.descriptor.index) for g in first[:3]}
        resumed = Client.connect(st["address"], role="trainer")
        assert resumed.requeue_untrained(trained) == 4
        status = json.loads(run_cli("store", "status", "--store", st["address"], check=True).stdout)
        assert (status["inflight_bytes"], status["queued"], status["objects"]) == (0, 0, 0)
        lease = prod.lease_prompts(10, limit=PROMPTS)
        assert lease is not None
        untrained = sorted(set(range(7)) - {sid_seq(g) for g in first[:3]})
        assert sorted(lease.seqs) == [*untrained, 7, 8, 9]
        for seq in lease.seqs:
            put(prod, seq)
            lease.done(seq)
        rest = drain(resumed, 7)
        assert sorted(map(sid_seq, rest)) == sorted(lease.seqs)
        resumed.ack(rest)
        assert prod.lease_prompts(4, limit=PROMPTS) is None
        assert resumed.stats()["inflight_bytes"] == 0
        for c in (prod, cons):
            c.close()
    # 6. the store went away under a connected client: a clear error, and close() still works
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable, match="lost the store"):
        resumed.next_record(timeout_s=1)
    resumed.close()
    assert time.monotonic() - t0 < 20


def test_mapped_and_tcp_clients_share_one_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod = Client.connect(st["address"], role="producer")  # same host: maps the segment
        monkeypatch.setenv("SPECCTL_STORE_SHM", "0")  # as a client on another host would
        cons = Client.connect(st["address"], role="trainer")
        assert (prod.objects.mapped, cons.objects.mapped) == (True, False)
        prod.run_meta("num_prompts", str(PROMPTS))
        lease = prod.lease_prompts(4, limit=PROMPTS)
        assert lease is not None
        # 1. mapped put -> TCP get, growing the send buffer on the way
        for seq in sorted(lease.seqs, key=tokens):  # growing sizes
            assert put(prod, seq) is not None
            lease.done(seq)
        got = drain(cons, 4)
        for g in got:
            check_record(g.record, sid_seq(g))
        cons.ack(got)
        # 2. TCP put -> mapped get (in place), acked in one batch
        lease = cons.lease_prompts(3, limit=PROMPTS)
        assert lease is not None
        for seq in lease.seqs:
            assert put(cons, seq) is not None
        back = drain(prod, 3)
        for g in back:
            check_record(g.record, sid_seq(g))
        prod.ack(back)
        s = prod.stats()
        assert (s["inflight_bytes"], s["inflight_records"], s["acks"]) == (0, 0, 7)
        for c in (prod, cons):
            c.close()


def test_an_object_handed_out_to_pack_but_never_put_is_taken_back(tmp_path: Path) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod, cons, lease = leased(st, 2)
        first, second = lease.seqs
        make_record(prod, first, PROMPTS, placed=True)  # packed into its object, never put
        assert prod.stats()["inflight_records"] == 1
        assert put(prod, second, placed=True) is not None  # the first is taken back here
        assert prod.stats()["inflight_records"] == 1
        assert put(prod, first, placed=True) is not None  # its claim was dropped: put again
        got = drain(cons, 2)
        assert sorted(map(sid_seq, got)) == [first, second]
        for g in got:
            check_record(g.record, sid_seq(g))
        cons.ack(got)
        make_record(prod, 2, PROMPTS, placed=True)  # close takes back one left handed out
        prod.close()
        s = cons.stats()
        assert (s["inflight_records"], s["inflight_bytes"], s["puts"], s["acks"]) == (0, 0, 2, 2)
        assert cons.next_record(timeout_s=0.5) is None
        cons.close()


def test_a_prepared_batch_reserves_its_objects_at_once_and_takes_back_the_unused(
    tmp_path: Path,
) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod, cons, _ = leased(st, 9)
        starts = []
        session_start = prod.objects._store.batch_put_session_start

        def counted(*a):
            starts.append(len(a[0]))
            return session_start(*a)

        prod.objects._store = _Proxy(prod.objects._store, batch_put_session_start=counted)
        assert prepared(prod, [0, 1, 2, 3], PROMPTS) == 4
        assert prod.stats()["inflight_records"] == 4  # counted before they are packed
        for seq in (0, 1):
            assert put(prod, seq, placed=True) is not None
        assert starts == [4]  # one reservation for the batch, none per record
        # the next batch takes back the two prepared and never used: claims free again
        assert prepared(prod, [4, 5], PROMPTS) == 2
        assert prod.stats()["inflight_records"] == 2 + 2
        for seq in (5, 4, 2, 3):  # any order; 2 and 3 one by one
            assert put(prod, seq, placed=True) is not None
        assert starts == [4, 2, 1, 1]
        assert prepared(prod, [6, 7, 8], PROMPTS) == 3
        assert put(prod, 6) is not None  # packed elsewhere: its prepared object is let go
        left = [(p.desc.key, p.nbytes) for p in prod._prepared.values()]
        assert len(left) == 2
        prod.close()  # takes back what is prepared: objects removed, counts down
        assert cons.objects.views(*map(list, zip(*left, strict=True))) == [NOT_FOUND] * 2
        got = drain(cons, 7)
        assert sorted(map(sid_seq, got)) == list(range(7))
        for g in got:
            check_record(g.record, sid_seq(g))
        cons.ack(got)
        s = cons.stats()
        sizes = sum(make_record(None, seq, PROMPTS)[0].numel() for seq in range(7))
        assert (s["inflight_records"], s["puts"], s["put_bytes"]) == (0, 7, sizes)
        assert cons.next_record(timeout_s=0.5) is None
        assert all(cons.ctl.get(keys.pub(0, seq)) is None for seq in (7, 8))
        cons.close()


class _Proxy:
    """`target` with some of its methods replaced."""

    def __init__(self, target: object, **methods: object) -> None:
        self._target, self._methods = target, methods

    def __getattr__(self, name: str) -> object:
        return self._methods.get(name) or getattr(self._target, name)


def test_a_repeat_from_a_producer_presumed_dead_leaves_the_record_in_training_intact(
    tmp_path: Path,
) -> None:
    """Trainers read records in place: dropping a repeat must free only its own object."""
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        slow, fresh = (Client.connect(st["address"], role="producer") for _ in range(2))
        first, second = (Client.connect(st["address"], role="trainer") for _ in range(2))
        slow.run_meta("num_prompts", str(PROMPTS))
        rec, epoch, index, T = make_record(slow, 0, PROMPTS, placed=True)
        slow.ctl.delete(keys.pub(epoch, index))  # presumed dead: the reaper drops its claim
        assert put(fresh, 0, placed=True) is not None  # re-produced and published
        got = first.next_record(timeout_s=10)  # in training, read in place
        assert got is not None and sid_seq(got) == 0
        assert slow.put_record(rec, epoch=epoch, index=index, T=T) is not None  # after all
        assert second.next_record(timeout_s=2) is None  # the repeat is dropped, and freed
        for seq in range(1, 5):  # new records take the memory freed so far
            assert put(fresh, seq, placed=True) is not None
        check_record(got.record, 0)
        first.ack([got])
        rest = drain(second, 4)
        second.ack(rest)
        s = second.stats()
        assert (s["inflight_records"], s["inflight_bytes"], s["puts"], s["repeats"]) == (0, 0, 6, 1)
        for c in (slow, fresh, first, second):
            c.close()


def test_records_fetched_ahead_are_queued_again_when_their_consumer_closes(
    tmp_path: Path,
) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod = Client.connect(st["address"], role="producer")
        first = Client.connect(st["address"], role="trainer")
        second = Client.connect(st["address"], role="trainer")
        publish(prod, 6)
        # 1. one call fetches a batch (one Mooncake round trip) but hands out one record;
        #    it takes at most half of what is left queued (5 -> 2)
        one = first.next_record(timeout_s=10)
        assert one is not None and len(first._ahead) == 2
        assert prod.stats()["queued"] == 3
        first.ack([one])
        # 2. closing hands the unclaimed ones back: another consumer gets all the others
        first.close()
        rest = drain(second, 5)
        assert sorted(map(sid_seq, rest)) == sorted(set(range(6)) - {sid_seq(one)})
        for g in rest:
            check_record(g.record, sid_seq(g))
        second.ack(rest)
        assert second.next_record(timeout_s=0.3) is None
        # 3. a twin descriptor (the reaper's, for a producer killed while publishing) in the
        #    same batch: the record arrives intact once, the twin is dropped, counts exact
        lease = prod.lease_prompts(1, limit=PROMPTS)
        assert lease is not None and lease.seqs == [6]
        desc = put(prod, 6)
        assert desc is not None
        prod.ctl.push(keys.RECORDS, desc.to_json())
        got = second.next_record(timeout_s=10)
        assert got is not None and sid_seq(got) == 6
        check_record(got.record, 6)
        second.ack([got])
        assert second.next_record(timeout_s=0.3) is None
        s = second.stats()
        assert (s["inflight_records"], s["gets"], s["acks"], s["repeats"]) == (0, 7, 7, 1)
        # 4. a corrupt record with a twin: its sample goes back to the producers once
        lease = prod.lease_prompts(1, limit=PROMPTS)
        assert lease is not None and lease.seqs == [7]
        desc = put(prod, 7, corrupt=True)
        assert desc is not None
        prod.ctl.push(keys.RECORDS, desc.to_json())
        assert second.next_record(timeout_s=0.5) is None
        s = second.stats()
        assert (s["inflight_records"], s["inflight_bytes"]) == (0, 0), s
        assert (s["corrupt"], s["requeued"], s["repeats"], s["returned"]) == (1, 1, 2, 1), s
        for c in (prod, second):
            c.close()


def test_async_puts_pack_beside_the_copy_and_publish_every_record(tmp_path: Path) -> None:
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod, cons, lease = leased(st, 5)
        seqs = sorted(lease.seqs, key=tokens)  # growing sizes: the buffers grow on the way
        # 1. each record is packed into the buffer the put in flight is not copying from
        puts, ptrs = [], []
        for seq in seqs:
            rec, epoch, index, T = make_record(prod, seq, PROMPTS)
            ptrs.append(rec.data_ptr())
            puts.append(prod.put_record_async(rec, epoch=epoch, index=index, T=T))
        assert all(a != b for a, b in pairwise(ptrs)), ptrs
        prod.flush()
        assert all(p.done() and p.result() is not None for p in puts)
        for seq in seqs:
            lease.done(seq)
        # 2. a sample already published: a finished future holding None
        rec, epoch, index, T = make_record(prod, seqs[0], PROMPTS)
        again = prod.put_record_async(rec, epoch=epoch, index=index, T=T)
        assert again.done() and again.result() is None
        # 3. a record packed outside the client's buffers is staged through one of them
        lease = prod.lease_prompts(2, limit=PROMPTS)
        assert lease is not None and lease.seqs == [5, 6]
        rec, epoch, index, T = make_record(None, 5, PROMPTS)
        assert prod._registered(rec, rec.numel()) is None
        assert prod.put_record_async(rec, epoch=epoch, index=index, T=T).result() is not None
        # 4. close() publishes the put still in flight before it leaves
        rec, epoch, index, T = make_record(prod, 6, PROMPTS)
        last = prod.put_record_async(rec, epoch=epoch, index=index, T=T)
        prod.close()
        assert last.result() is not None
        got = drain(cons, 7)
        assert sorted(map(sid_seq, got)) == [0, 1, 2, 3, 4, 5, 6]
        for g in got:
            check_record(g.record, sid_seq(g))
        cons.ack(got)
        s = cons.stats()
        assert (s["inflight_records"], s["inflight_bytes"], s["acks"]) == (0, 0, 7)
        cons.close()


def test_a_consumer_reading_ahead_leaves_records_for_another_at_the_end(
    tmp_path: Path,
) -> None:
    """Two trainer ranks, three records left: one rank must not hold all of them while
    the other waits for its micro-batch (the demo's last step once waited --max-wait)."""
    with running_store(tmp_path, "--capacity", "64MiB") as st:
        prod = Client.connect(st["address"], role="producer")
        ranks = [Client.connect(st["address"], role="trainer") for _ in range(2)]
        publish(prod, 3)
        got = [ranks[0].next_record(timeout_s=10), ranks[1].next_record(timeout_s=1)]
        assert all(g is not None for g in got), "the second rank found nothing left"
        last = ranks[0].next_record(timeout_s=1) or ranks[1].next_record(timeout_s=1)
        assert last is not None
        assert sorted(map(sid_seq, [*got, last])) == [0, 1, 2]
        for c in (prod, *ranks):
            c.close()
