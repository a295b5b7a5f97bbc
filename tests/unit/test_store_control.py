"""Control plane, leases and the supervisor against a real in-process TCPStore."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from specctl.protocol import Descriptor
from specctl.store import control as keys
from specctl.store.address import bind_listener
from specctl.store.control import Control
from specctl.store.leases import LeaseBook
from specctl.store.ledger import Ledger
from specctl.store.supervisor import Supervisor

pytestmark = pytest.mark.unit


@pytest.fixture
def ctl() -> Iterator[Control]:
    listener = bind_listener("127.0.0.1", 0)
    port = listener.getsockname()[1]
    host = Control.host(listener)
    yield Control.connect("127.0.0.1", port, 5.0)
    del host


def register(ctl: Control, role: str, cid: str) -> None:
    ctl.register(role, cid)


def pending_put(
    ctl: Control, cid: str, epoch: int, index: int, nbytes: int, ledger: Ledger | None = None
) -> Descriptor:
    """A put as `put_record` leaves it mid-way: claimed and counted in the ledger (by
    default one with two earlier puts, acked)."""
    put = f"{cid}/{index}"
    desc = Descriptor(v=1, key=f"r1/{epoch}/{index}/{put}", run="r1", epoch=epoch, index=index,
                      nbytes=nbytes, T=4, crc=7, producer="h:1", put=put)  # fmt: skip
    ctl.claim(keys.pub(epoch, index), desc.put)
    if ledger is None:
        ledger = Ledger(2, 3000)
        ctl.count("drained_bytes", 3000)
        ctl.count("drained_records", 2)
    ctl.set(keys.acct(cid), ledger.begin([(desc.put, nbytes, desc.to_json())]).dumps())
    return desc


def dead_producer(ctl: Control, remove: Callable[[str], int]) -> Supervisor:
    """A supervisor (TTL 0.2 s) of a run of 10 prompts with a producer "dead" that never beats."""
    register(ctl, "producer", "dead")
    ctl.set("run/num_prompts", "10")
    return Supervisor(ttl_s=0.2, run="r1", remove=remove)


def tick_until(sup: Supervisor, ctl: Control, done: Callable[[], bool]) -> None:
    t0 = time.monotonic()
    while not done():
        assert time.monotonic() - t0 < 5
        sup.tick(ctl)
        time.sleep(0.05)


def test_claim_is_won_once(ctl: Control) -> None:
    assert ctl.claim(keys.pub(0, 3), "a") == "a"
    assert ctl.claim(keys.pub(0, 3), "b") == "a"
    ctl.delete(keys.pub(0, 3))
    assert ctl.claim(keys.pub(0, 3), "b") == "b"


def test_queue_is_fifo_and_pop_wait_times_out(ctl: Control) -> None:
    for i in range(3):
        ctl.push("q/t", f"item{i}")
    assert ctl.qlen("q/t") == 3
    assert ctl.pop("q/t") == "item0"
    assert ctl.pop_all("q/t") == ["item1", "item2"]
    t0 = time.monotonic()
    assert ctl.pop_wait("q/t", 0.2) is None
    assert 0.15 < time.monotonic() - t0 < 2
    threading.Timer(0.1, lambda: ctl.clone().push("q/t", "late")).start()
    assert ctl.pop_wait("q/t", 5) == "late"


def test_leases_hand_out_each_seq_once_and_respect_limit(ctl: Control) -> None:
    a, b = LeaseBook(ctl, "a"), LeaseBook(ctl.clone(), "b")
    register(ctl, "producer", "a")
    register(ctl, "producer", "b")
    got = a.take(4, limit=10) + b.take(4, limit=10) + a.take(4, limit=10)
    assert sorted(got) == list(range(10))
    assert json.loads(ctl.get(keys.lease("a")) or "[]") == [0, 1, 2, 3, 8, 9]
    a.finish([0, 1, 2, 3, 8, 9])
    assert ctl.get(keys.lease("a")) is None
    b.give_back([5, 6])  # 4 and 7 still held by b
    assert sorted(a.take(4, limit=10)) == [5, 6]  # returned seqs first


def test_take_waits_for_other_producers_then_ends(ctl: Control) -> None:
    a, b = LeaseBook(ctl, "a"), LeaseBook(ctl.clone(), "b")
    register(ctl, "producer", "a")
    register(ctl, "producer", "b")
    assert b.take(3, limit=3) == [0, 1, 2]
    threading.Timer(0.3, lambda: b.give_back([1])).start()
    threading.Timer(0.6, lambda: b.finish([0, 2])).start()
    t0 = time.monotonic()
    assert a.take(5, limit=3) == [1]  # waited for b's hand-back
    a.finish([1])
    assert a.take(5, limit=3) == []  # nothing left once b finished
    assert time.monotonic() - t0 >= 0.5


def test_concurrent_takers_never_share_a_seq(ctl: Control) -> None:
    books = [LeaseBook(ctl.clone(), f"p{i}") for i in range(4)]
    for b in books:
        register(ctl, "producer", b.client_id)
    got: list[list[int]] = [[] for _ in books]

    def run(i: int) -> None:
        while seqs := books[i].take(3, limit=200):
            got[i] += seqs
            books[i].finish(seqs)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(books))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert sorted(s for seqs in got for s in seqs) == list(range(200))
    assert ctl.cursor()[0] == 200


def test_supervisor_reaps_a_silent_producer(ctl: Control) -> None:
    sup = Supervisor(ttl_s=0.3)
    dead, live = LeaseBook(ctl, "dead"), LeaseBook(ctl.clone(), "live")
    register(ctl, "producer", "dead")
    register(ctl, "producer", "live")
    ctl.set("run/num_prompts", "2")
    assert dead.take(3, limit=None) == [0, 1, 2]
    dead.finish([1])
    ctl.claim(keys.pub(0, 0), "dead/7")  # claimed, died before publishing
    ctl.claim(keys.pub(1, 0), "dead/8!")  # seq 2: published, died before done(): kept
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0:
        ctl.add(keys.hb("live"), 1)
        sup.tick(ctl)
        time.sleep(0.05)
    assert ctl.get(keys.lease("dead")) is None
    assert sorted(ctl.pop_all(keys.RETURNED)) == ["0", "2"]
    assert ctl.get(keys.pub(0, 0)) is None and ctl.get(keys.pub(1, 0)) == "dead/8!"
    assert ctl.count("requeued", 0) == 2
    assert json.loads(ctl.get("stats/alive") or "{}") == {"producer": 1}
    assert float(ctl.get("stats/puts_per_s") or -1) == 0.0
    del live


def test_supervisor_undoes_a_put_that_died_before_publishing(ctl: Control) -> None:
    removed: list[str] = []
    codes = iter([-703, -703, 0])  # half-written at first, gone on the third try

    def remove(key: str) -> int:
        removed.append(key)
        return next(codes)

    sup = dead_producer(ctl, remove)
    desc = pending_put(ctl, "dead", 0, 4, 1000)
    ctl.set(keys.lease("dead"), "[4, 5]")
    assert ctl.counters()["inflight_bytes"] == 1000
    tick_until(sup, ctl, lambda: bool(removed))
    assert ctl.pop_all(keys.RETURNED) == ["5"]
    assert ctl.get(keys.lease("dead")) == "[4]"  # held while its key is half-written
    for _ in range(3):
        sup.tick(ctl)
    assert removed == [desc.key] * 3 and desc.key == "r1/0/4/dead/4"
    assert ctl.get(keys.lease("dead")) is None
    assert ctl.pop_all(keys.RETURNED) == ["4"]  # once its key was gone
    assert ctl.get(keys.pub(0, 4)) is None
    c = ctl.counters()
    got = (c["inflight_bytes"], c["inflight_records"], c["puts"], c["put_bytes"])
    assert got == (0, 0, 2, 3000)  # the ledger's earlier puts stay, the dead one is undone
    assert ctl.ledger("dead") == Ledger(2, 3000)


def test_supervisor_publishes_a_put_whose_object_was_whole(ctl: Control) -> None:
    removed: list[str] = []
    sup = dead_producer(ctl, lambda key: removed.append(key) or 0)
    desc = pending_put(ctl, "dead", 0, 6, 500)
    ctl.set(keys.acct("dead"), ctl.ledger("dead").written(desc.put).dumps())  # died publishing
    ctl.set(keys.lease("dead"), "[6]")
    tick_until(sup, ctl, lambda: ctl.get(keys.lease("dead")) is None)
    assert ctl.pop_all(keys.RECORDS) == [desc.to_json()]  # published for it, not removed
    assert removed == [] and ctl.get(keys.pub(0, 6)) == desc.put + keys.PUBLISHED
    assert ctl.pop_all(keys.RETURNED) == ["6"]  # re-leased, it loses the marked claim
    assert ctl.ledger("dead") == Ledger(3, 3500)
    assert (ctl.counters()["inflight_records"], ctl.counters()["inflight_bytes"]) == (1, 500)


def test_supervisor_settles_each_of_a_prepared_batch(ctl: Control) -> None:
    """A producer that died with a prepared batch open: the whole one is published, the
    written-to and the untouched ones taken back (a half-written one held until removable)."""
    codes = {"r1/0/1/dead/1": iter([-703, 0]), "r1/0/2/dead/2": iter([0])}  # by object key
    removed: list[str] = []

    def remove(key: str) -> int:
        removed.append(key)
        return next(codes[key])

    sup = dead_producer(ctl, remove)
    whole = pending_put(ctl, "dead", 0, 0, 100)
    half = pending_put(ctl, "dead", 0, 1, 200, ctl.ledger("dead"))
    untouched = pending_put(ctl, "dead", 0, 2, 400, ctl.ledger("dead"))
    ctl.set(keys.acct("dead"), ctl.ledger("dead").written(whole.put).dumps())
    assert [o.phase for o in ctl.ledger("dead").open] == ["p", "w", "w"]
    ctl.set(keys.lease("dead"), "[0, 1, 2]")
    tick_until(sup, ctl, lambda: ctl.get(keys.lease("dead")) is None)
    assert ctl.pop_all(keys.RECORDS) == [whole.to_json()]
    assert ctl.get(keys.pub(0, 0)) == whole.put + keys.PUBLISHED
    assert ctl.get(keys.pub(0, 1)) is None and ctl.get(keys.pub(0, 2)) is None
    assert removed == [half.key, untouched.key, half.key]
    assert sorted(ctl.pop_all(keys.RETURNED)) == ["0", "1", "2"]  # 1 once it was removed
    assert ctl.ledger("dead") == Ledger(3, 3100)
    assert (ctl.counters()["inflight_records"], ctl.counters()["inflight_bytes"]) == (1, 100)


def test_get_never_waits_for_a_key_deleted_while_it_reads(ctl: Control) -> None:
    """A key deleted between an existence check and TCPStore's `get` made that get wait
    for it (a producer's lease scan timed out in CI) or, here, answer '' for a value that
    was never set: `Control.get` reads in one step."""
    churn = ctl.clone()
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            churn.set("lease/other", "[1]")
            churn.delete("lease/other")

    t = threading.Thread(target=flip)
    t.start()
    try:
        seen = {ctl.get("lease/other", "gone") for _ in range(3000)}
    finally:
        stop.set()
        t.join()
    assert seen <= {"[1]", "gone"}
    assert ctl.get("never/set") is None and ctl.get("never/set", "x") == "x"
    ctl.set("empty", "")
    assert ctl.get("empty") == ""
