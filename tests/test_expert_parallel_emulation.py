"""The low-latency dispatch/combine flag protocol, step by step on CPU (kernels.expert_parallel.emulation):
exact under random interleavings on weak memory in both combine forms (push: owners write the partial
sums into the sources' buffers, the kernel's; pull: sources read them from the owners' buffers), and
each safeguard removed on purpose caught. Integer data: every result is the dense reference or wrong."""

from __future__ import annotations

import pytest

from kernels.expert_parallel.emulation import BREAKS, COMBINE_FORMS, emulate

FORMS = COMBINE_FORMS


@pytest.mark.parametrize("ep", [2, 3, 4])
@pytest.mark.parametrize("combine", [True, False], ids=["dispatch+combine", "dispatch-only"])
def test_protocol_emulation_is_exact_under_random_interleavings(ep, combine):
    for seed in range(12):
        res = emulate(ep, calls=5, seed=seed, combine=combine)
        assert res.ok, (seed, res)


@pytest.mark.parametrize("ep", [2, 3, 4])
def test_pull_combine_is_exact_under_random_interleavings(ep):
    for seed in range(12):
        res = emulate(ep, calls=5, seed=seed, combine_form="pull")
        assert res.ok, (seed, res)


@pytest.mark.parametrize("brk", BREAKS)
def test_protocol_emulation_catches_each_break(brk):
    """Each safeguard removed on purpose gives a wrong result (or a hang) under some interleaving."""
    combine = brk != "one_buffer"  # double buffering matters for exchanges back to back
    caught = [not emulate(4, calls=6, seed=s, breaks=brk, combine=combine).ok for s in range(12)]
    assert any(caught), brk


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("brk", ["no_fence", "reused_epoch", "wrong_slot", "count_twice"])
def test_each_combine_form_catches_its_own_breaks(form, brk):
    """The break in the combine's blocks only (the dispatch intact): the combine form's own safeguards."""
    caught = [
        not emulate(4, calls=6, seed=s, breaks=brk, combine_form=form, break_only_combine=True).ok for s in range(12)
    ]
    assert any(caught), (form, brk)


@pytest.mark.parametrize("form", FORMS)
def test_one_buffer_is_harmless_while_each_combine_follows_its_dispatch(form):
    """What the emulation found (the docs say so): the next dispatch holds a fast peer back a whole exchange."""
    for seed in range(8):
        assert emulate(3, calls=6, seed=seed, breaks="one_buffer", combine_form=form).ok, (form, seed)


def test_emulate_rejects_an_unknown_break_or_form():
    with pytest.raises(ValueError, match="expected breaks in"):
        emulate(2, breaks="no_flags")
    with pytest.raises(ValueError, match=r"expected combine_form in \('push', 'pull'\), got 'both'"):
        emulate(2, combine_form="both")
