"""Which free NBD index an attach asks CONNECT for: rotation after the last one
connected, claims of attaches in flight, the cooldown after a detach, and devices whose
hardware queue count already fits first. Plain Python state, so it runs on any host."""

from __future__ import annotations

import time

import pytest

from zerofs_csi.nbd.index_choice import COOLDOWN_S, NAMED_INDEX_TRIES, IndexChooser
from zerofs_csi.nbd.tuning import hardware_queues_for

FREE = list(range(8))


@pytest.mark.parametrize(
    ("last", "free", "expected"),
    [
        (None, FREE, [0, 1, 2]),  # nothing connected yet: from the lowest
        (3, FREE, [4, 5, 6]),  # after the last one connected
        (6, FREE, [7, 0, 1]),  # wrapping around
        (2, [0, 5, 9], [5, 9, 0]),  # the rotor need not be free itself
        (0, [1], [1]),  # fewer free than tries
        (0, [], []),  # none free: the kernel's choice alone
    ],
)
def test_named_candidates_rotate_after_the_last_index_connected(
    last: int | None, free: list[int], expected: list[int]
) -> None:
    chooser = IndexChooser()
    if last is not None:
        chooser.connected(last, 1)
    assert NAMED_INDEX_TRIES == 3
    assert chooser.candidates(free, 1) == [*expected, None]


def test_claimed_indexes_go_to_no_other_attach_until_released() -> None:
    chooser = IndexChooser()
    first = chooser.candidates(FREE, 1)
    second = chooser.candidates(FREE, 1)
    assert first == [0, 1, 2, None]
    assert second == [3, 4, 5, None]
    chooser.release(first)
    assert chooser.candidates(FREE, 1) == [0, 1, 2, None]


def test_a_detached_index_is_skipped_until_its_cooldown_ends() -> None:
    chooser = IndexChooser()
    chooser.detached(1)
    candidates = chooser.candidates(FREE, 1)
    assert candidates == [0, 2, 3, None]
    chooser.release(candidates)
    time.sleep(COOLDOWN_S + 0.1)
    assert chooser.candidates(FREE, 1) == [0, 1, 2, None]


def test_devices_with_the_same_hardware_queue_count_come_first() -> None:
    four = hardware_queues_for(4)
    if four == 1:
        pytest.skip("one possible CPU: every device has one hardware queue")
    chooser = IndexChooser()
    chooser.connected(6, 4)
    chooser.connected(2, 4)  # the rotor is now 2
    # Four connections: the two devices left with that many queues first, in rotation.
    candidates = chooser.candidates(FREE, 4)
    assert candidates == [6, 2, 3, None]
    chooser.release(candidates)
    # One connection: the devices that have one queue (never connected: one) first.
    assert chooser.candidates(FREE, 1) == [3, 4, 5, None]


def test_connection_count_of_an_index_defaults_when_never_connected_here() -> None:
    chooser = IndexChooser()
    assert chooser.connections_of(5, 1) == 1
    chooser.connected(5, 4)
    assert chooser.connections_of(5, 1) == 4
