"""Hostile guests against a real hypervisor process (issue "Robustness" §1).

Every rejection rule of Xen's (docs/sources.md §6-§8; the labels' §N.M number the
sections of the Xen PV MMU notes the rules were taken from) that a
64-bit PV domU without grants, I/O memory or linear page tables can reach is
sent through the raw client over the real socket, on every path that can carry
it. Then the memfd a guest receives is attacked, and the protocol abused.

After every attack the same things are proved, because a refusal is only
worth something if it left nothing behind: Xen's errno and ``done``; every
byte of the attacker's and of a bystander ("victim") domain's memory
unchanged (the targeted entry included); the trap counters moved by exactly
the one trap taken; the free-frame count unchanged; ``audit()`` clean; and
follow-up probes that Xen would refuse had a type or reference leaked (each
page table still pins as its own level, each frame the refused request named
still maps writable). A probe that succeeds also proves the server is alive.

The attack families, one module each: ``test_rules_mmu_update``,
``test_rules_mmuext_op``, ``test_rules_update_va_mapping``, ``test_rules_ptwr``
and ``test_rules_hypercall`` (the rule tables, run by ``rejection``),
``test_memfd``, ``test_same_uid`` and ``test_protocol_forgery``. ``scene``
holds the attacker, the victim and the checks above; ``conftest`` the
hypervisor process they share.
"""
