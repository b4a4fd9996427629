"""CreateVolume names to volume ids: every CSI-valid name gets a safe, stable id."""

from __future__ import annotations

import random

import grpc
import pytest

from zerofs_csi import errors
from zerofs_csi.volume.id import (
    MAX_NAME_BYTES,
    MAX_VOLUME_ID_LENGTH,
    validate_volume_id,
    volume_id_for_name,
)


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "pvc-1",
        "pvc-5d1c9a64-0f1e-4c55-9b7e-2d1f3c4b5a69",
        "fake-vol-id-0a1b2c3d4e",
        "x" * MAX_VOLUME_ID_LENGTH,
    ],
)
def test_a_name_that_is_a_valid_id_is_its_own_id(name: str) -> None:
    # Volumes created before names were mapped were named so: they keep their ids.
    assert volume_id_for_name(name) == name


# Pinned: a volume's id is where its data and objects live, so the mapping of a name
# must never change from one release to the next.
@pytest.mark.parametrize(
    ("name", "volume_id"),
    [
        (
            "sanity-controller-create-volume-921D6592-4BB15A64",
            "sanity-controller-create-volume-527ba6a58a001420",
        ),
        ("Data Volume", "data-volume-5eb49e72f083bfb3"),
        ("données été", "donnees-ete-e8943a575bd362f8"),
        ("数据卷", "2a4e5b8b71dc5020"),
        ("x" * 50, "x" * 32 + "-77cf12060d47183e"),
    ],
)
def test_other_names_get_a_readable_slug_and_a_stable_hash(name: str, volume_id: str) -> None:
    assert volume_id_for_name(name) == volume_id
    assert validate_volume_id(volume_id) == volume_id


def test_names_up_to_the_spec_limit_map_to_valid_ids() -> None:
    rng = random.Random(20260601)
    alphabet = "abcXYZ019 -_./:é数\t\n" + "\u00a0\u2028"
    seen: dict[str, str] = {}
    for _ in range(5000):
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        while len(name.encode()) > MAX_NAME_BYTES:
            name = name[:-1]
        volume_id = volume_id_for_name(name)
        assert validate_volume_id(volume_id) == volume_id
        assert volume_id_for_name(name) == volume_id
        assert seen.setdefault(volume_id, name) == name, "two names share an id"
    longest = "sanity-controller-create-maxlen-" + "A" * (MAX_NAME_BYTES - 32)
    assert len(longest.encode()) == MAX_NAME_BYTES
    assert len(volume_id_for_name(longest)) <= MAX_VOLUME_ID_LENGTH


def test_names_differing_only_in_case_or_punctuation_get_different_ids() -> None:
    ids = {volume_id_for_name(n) for n in ("Data", "DATA", "data!", "data?", "d-a-t-a.")}
    assert len(ids) == 5
    assert volume_id_for_name("data") == "data"


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("", "name is required"),
        ("a" * (MAX_NAME_BYTES + 1), "129 bytes"),
        ("é" * 65, "130 bytes"),
        ("pvc\x00", "U+0000"),
        ("pvc\x08x", "U+0008"),
        ("pvc\x0b", "U+000B"),
        ("pvc\x0c", "U+000C"),
        ("\x1fpvc", "U+001F"),
        ("pvc\x7f", "U+007F"),
        ("pvc\x9f", "U+009F"),
    ],
)
def test_names_the_spec_does_not_allow_are_invalid_argument(name: str, needle: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        volume_id_for_name(name)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.message


@pytest.mark.parametrize("name", ["tab\there", "two\nlines", "cr\rlf", "\u00a0", "é" * 64])
def test_common_whitespace_and_any_other_unicode_are_allowed(name: str) -> None:
    assert validate_volume_id(volume_id_for_name(name))
