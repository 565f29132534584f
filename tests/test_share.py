"""A node's copy of its share (dim.share), without Redis: what a read or a hint's delta
leaves it running, and what it keeps outside its share."""

from __future__ import annotations

from dim import share
from dim.configs import decode
from dim.protocol import ConfigPlace, ShareRead
from dim.slots import Slot


def _config(ckey: str, v: int = 0) -> str:
    return f'["{ckey}",{{"v":{v}}}]'


def test_a_delta_adds_changes_and_moves_configs() -> None:
    """Added and changed configs join the share; a removed one leaves it, and where it
    went is known for the configs the node handles (so it stops them)."""
    desired = {c: decode(c, _config(c)) for c in ("a", "b", "c")}
    slots = {c: Slot(cfg) for c, cfg in desired.items() if cfg is not None}
    places = {"z": ConfigPlace("n9", _config("z"))}  # a config no longer handled
    out, where = share.after_delta(
        desired, places, slots, ({"b": _config("b", 1), "d": _config("d")}, {"a": "n2", "c": None})
    )
    assert sorted(out) == ["b", "d"]
    assert out["b"] is not None and out["b"].value == {"v": 1}
    assert where == {"a": ConfigPlace("n2", _config("a")), "c": ConfigPlace(None, None)}


def test_a_config_that_does_not_parse_leaves_the_share_by_delta_as_by_read() -> None:
    """A delta applies what a read of the same version would bring: a changed config
    whose JSON does not parse (foreign data) leaves the share either way."""
    desired = {c: decode(c, _config(c)) for c in ("a", "b")}
    slots = {c: Slot(cfg) for c, cfg in desired.items() if cfg is not None}
    by_delta, _ = share.after_delta(desired, {}, slots, ({"b": "not json"}, {}))
    by_read, _ = share.after_read(desired, {}, slots, ShareRead("2", {"b": "not json"}, {}, ()))
    assert sorted(by_delta) == sorted(by_read) == ["a"]


def test_a_read_replaces_the_share_or_applies_its_delta() -> None:
    desired = {c: decode(c, _config(c)) for c in ("a", "b")}
    slots = {c: Slot(cfg) for c, cfg in desired.items() if cfg is not None}
    whole = ShareRead("2", {"c": _config("c")}, {"a": ConfigPlace("n2", _config("a"))})
    out, where = share.after_read(desired, {}, slots, whole)
    assert sorted(out) == ["c"] and where == {"a": ConfigPlace("n2", _config("a"))}
    delta = ShareRead("2", {"c": _config("c"), "b": None}, {}, removed=("a",))
    out, _ = share.after_read(desired, {}, slots, delta)
    assert sorted(out) == ["c"]  # a removed, b gone, c added


def test_what_a_node_keeps_outside_its_share() -> None:
    """Before any read, everything; then only a config that exists and is assigned to
    nobody (or, in a reset window or a contested entry, any config that exists)."""
    calm, resetting = (lambda: False), (lambda: True)
    here = _config("a")
    assert share.keep(None, None, calm)
    assert not share.keep("1", None, calm)
    assert share.keep("1", ConfigPlace(None, here), calm)
    assert not share.keep("1", ConfigPlace(None, here, waiting=True), calm)
    assert not share.keep("1", ConfigPlace("n2", here), calm)
    assert share.keep("1", ConfigPlace("n2", here), resetting)
    assert share.keep("1", ConfigPlace("n2", here, contested=True), calm)
    assert not share.keep("1", ConfigPlace(None, None), resetting)


def test_share_versions_compare_as_numbers() -> None:
    assert share.newer("10", "9") and not share.newer("9", "10")
    assert not share.newer("x", "1")  # not a version: never newer


def test_a_delta_follows_only_the_share_it_was_computed_from() -> None:
    """A delta applies to the very share version it follows; a "no share before" delta
    only to a node that read none, handles nothing, and read before the write."""
    assert share.follows(5, "9", "5", 0, empty=False)
    assert not share.follows(5, "9", "4", 0, empty=False)
    assert not share.follows(5, "9", None, 0, empty=True)
    assert share.follows(0, "9", None, 8, empty=True)
    assert not share.follows(0, "9", None, 9, empty=True)  # written before the read ran
    assert not share.follows(0, "9", None, 8, empty=False)  # it handles something
    assert not share.follows(0, "9", "3", 8, empty=True)  # it holds another share
