"""Records in flight at a sink's death, read again with care (sink/careful.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from usertrail.sink.careful import DEAD_AFTER, ONE_BY_ONE, Careful, in_flight
from usertrail.sink.plan import CRASHED, DeadLetter, Record

TP = ("events", 3)


def records(first: int, n: int, partition: int = 3) -> list[Record]:
    return [Record("events", partition, o, b"k", b"v") for o in range(first, first + n)]


def test_a_mark_behind_the_stored_position_was_written() -> None:
    careful = Careful()
    assert not careful.found(TP, 500, (0, 499, 1))
    kept, again, classified = careful.cut(records(500, 100))
    assert len(kept) == 100 and again == {} and classified is None


def test_records_in_flight_are_read_an_eighth_then_one_at_a_time() -> None:
    careful = Careful()
    assert careful.found(TP, 1000, (1000, 4999, 1))
    kept, again, _ = careful.cut(records(1000, 2000) + records(0, 50, partition=4))
    assert [r.offset for r in kept if r.partition == 3] == list(range(1000, 1500))
    # nothing else in the batch: a death counts against partition 3's records only
    assert again == {TP: 1500, ("events", 4): 0}
    assert not [r for r in kept if r.partition == 4]
    careful = Careful()
    assert careful.found(TP, 1000, (1000, 1000 + ONE_BY_ONE - 1, 1))
    kept, again, _ = careful.cut(records(1000, 10))
    assert [r.offset for r in kept] == [1000] and again == {TP: 1001}
    kept, again, _ = careful.cut(records(1000 + ONE_BY_ONE, 10))  # past what was in flight
    assert len(kept) == 10 and again == {}


def test_a_record_a_sink_died_on_alone_twice_is_a_dead_letter_never_decoded() -> None:
    careful = Careful()
    careful.found(TP, 77, (77, 77, DEAD_AFTER - 1))
    *_, classified = careful.cut(records(77, 5))
    assert classified is None, "once alone: tried again"
    careful.found(TP, 77, (77, 77, DEAD_AFTER))
    kept, again, classified = careful.cut(records(77, 5))
    assert [r.offset for r in kept] == [77] and again == {TP: 78}
    assert classified is not None and isinstance(classified[0], DeadLetter)
    assert classified[0].reason == CRASHED


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10_000)), min_size=1))
def test_in_flight_is_each_partitions_first_and_last(pairs: list[tuple[int, int]]) -> None:
    batch = [Record("t", p, o, None, None) for p, o in pairs]
    marks = in_flight(batch)
    for p in {p for p, _ in pairs}:
        offsets = [o for q, o in pairs if q == p]
        assert marks[("t", p)] == (min(offsets), max(offsets))


def test_two_partitions_under_care_are_read_one_at_a_time() -> None:
    """A quiet partition's one record in flight beside a record that kills
    the sink: each is read in a batch of its own, so the quiet one's mark
    never counts the other's deaths."""
    careful = Careful()
    careful.found(TP, 10, (10, 10, 1))
    careful.found(("events", 5), 200, (200, 210, 1))
    kept, again, classified = careful.cut(records(10, 3) + records(200, 11, partition=5))
    assert {r.partition for r in kept} == {3} and [r.offset for r in kept] == [10]
    assert again == {TP: 11, ("events", 5): 200} and classified is None
    kept, again, _ = careful.cut(records(11, 2) + records(200, 11, partition=5))
    assert {r.partition for r in kept} == {5} and len(kept) == 1
    assert again == {TP: 11, ("events", 5): 201}, "the others wait while one is under care"
    kept, again, _ = careful.cut(records(11, 2) + records(211, 4, partition=5))
    assert len(kept) == 6 and again == {}, "none under care: as usual"
