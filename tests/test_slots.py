"""The slot state machine (:mod:`dim.slots`) on its own: no Redis, no threads.

A Hypothesis state machine throws every event at a slot in every state: the events the
transition table allows move it, the others raise and change nothing, and the
invariants of break-before-make hold after every step.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dim.configs import parse
from dim.slots import TRANSITIONS, Slot, State, TransitionError

(CONFIG,) = parse([{"id": 1}], None).configs.values()
(CHANGED,) = parse([{"id": 1, "x": 2}], None).configs.values()


def snapshot(slot: Slot) -> tuple[Any, ...]:
    return attrs.astuple(slot, recurse=False, filter=lambda a, _: a.name != "cancel")


class SlotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.slot = Slot(CONFIG)
        self.tokens: list[int] = []  # every token this slot held, in order
        self.instances = 0  # instances created and not yet stopped

    def _try(self, call: Callable[[], Any], legal: bool) -> Any:
        before = snapshot(self.slot)
        if not legal:
            with pytest.raises(TransitionError):
                call()
            assert snapshot(self.slot) == before  # a refused transition changes nothing
            return None
        return call()

    @rule(step=st.integers(1, 5))
    def claimed(self, step: int) -> None:
        slot = self.slot
        token = (self.tokens[-1] if self.tokens else 0) + step
        legal = slot.state is State.CLAIMING and slot.instance is None
        self._try(lambda: slot.claimed(token, 10.0), legal)
        if legal:
            self.tokens.append(token)

    @rule()
    def created(self) -> None:
        slot = self.slot
        legal = slot.state is State.CREATING
        self._try(lambda: slot.created(object()), legal)
        if legal:
            self.instances += 1

    @rule()
    def gave_up(self) -> None:
        slot = self.slot
        self._try(lambda: slot.gave_up(5.0), slot.state is State.CREATING)

    @rule()
    def take_stop(self) -> None:
        slot = self.slot
        was = slot.state, slot.disconnecting, slot.instance
        took = slot.take_stop()  # never raises: False when there is nothing to take
        # nothing to take: not stopping, taken already, or down (its slot about to go)
        stoppable = was[0] in (State.RUNNING, State.STOPPING) and was[2] is not None
        assert took == (stoppable and not was[1])

    @rule()
    def stopped(self) -> None:
        slot = self.slot
        if slot.state is State.STOPPING:  # the reconciler calls it only when stopping
            if slot.instance is not None:
                self.instances -= 1
            slot.stopped()

    @rule(changed=st.booleans())
    def recreating(self, changed: bool) -> None:
        slot = self.slot
        legal = slot.state is State.STOPPING and slot.instance is None and not slot.disconnecting
        self._try(lambda: slot.recreating(CHANGED if changed else CONFIG), legal)

    @rule(step=st.integers(-2, 3))
    def retokened(self, step: int) -> None:
        slot = self.slot
        token = (slot.token or 0) + step
        legal = slot.state is State.CREATING and slot.token is not None and step > 0
        self._try(lambda: slot.retokened(token, 20.0), legal)
        if legal:
            self.tokens.append(token)

    @invariant()
    def break_before_make(self) -> None:
        slot = self.slot
        assert self.instances in (0, 1)  # never two instances of one slot at once
        if slot.state in (State.CLAIMING, State.CREATING):
            assert slot.instance is None
        if slot.state is State.RUNNING:
            assert slot.instance is not None and not slot.disconnecting

    @invariant()
    def a_token_while_the_claim_is_held(self) -> None:
        slot = self.slot
        if slot.state is State.CLAIMING:
            assert slot.token is None
        else:
            assert slot.token is not None and slot.token == self.tokens[-1]
        assert self.tokens == sorted(set(self.tokens))  # every incarnation a larger one


SlotMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_slot_machine = SlotMachine.TestCase


def test_the_table_lists_exactly_the_documented_transitions() -> None:
    sources = {(a, b) for a, b in TRANSITIONS}
    assert sources == {
        (State.CLAIMING, State.CREATING),
        (State.CREATING, State.RUNNING),
        (State.CREATING, State.CLAIMING),
        (State.RUNNING, State.STOPPING),
        (State.STOPPING, State.CREATING),
    }
    import dim.slots

    doc = dim.slots.__doc__ or ""
    for a, b in TRANSITIONS:
        block = doc.split(f"\n``{a.name}``\n")[1].split("\n\n``")[0]
        assert f"-> ``{b.name}``" in block


def test_a_recreate_waits_for_the_disconnect() -> None:
    slot = Slot(CONFIG)
    slot.claimed(3, 1.0)
    slot.created("instance")
    assert slot.take_stop() and not slot.take_stop()  # one thread owns the disconnect
    with pytest.raises(TransitionError, match="before its disconnect"):
        slot.recreating(CHANGED)
    slot.stopped()
    slot.recreating(CHANGED)
    with pytest.raises(TransitionError):
        slot.retokened(3, 2.0)  # the same token again: not a new incarnation
    slot.retokened(4, 2.0)
    assert (slot.state, slot.token, slot.config) == (State.CREATING, 4, CHANGED)
