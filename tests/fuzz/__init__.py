"""Hypothesis fuzzers for the wire decoder and for hypercall arguments.

Two targets, each built by a factory that takes a hypothesis settings profile,
so the same code runs small in the suite (``tests/test_fuzz.py``) and long
under ``make fuzz`` (``python -m tests.fuzz --min-count 1000000``):

* :func:`wire_fuzzer` feeds streams of valid messages and mutations of them
  (bit flips, truncation, splicing, random bytes, random msgpack objects, valid
  maps with wrong fields, nested containers, huge declared lengths) in random
  chunks to :class:`shared.wire.Connection` in both roles. Only
  ``RemoteProtocolError`` may leave ``next_event``; a server answers every
  rejection and every request, and each reply decodes back through a client.
* :func:`hypercall_fuzzer` drives an in-process :class:`hypervisor.Hypervisor`
  with two booted domains through the same sans-I/O service the server uses
  (wire request, ``HypervisorService.begin``, ``Work`` stepped in random
  slices, reply through a connection pair). An ``internal`` reply (an
  exception inside the hypervisor) is a crash; ``audit()`` stays clean; no
  frame is lost.

Why entropy blobs: a hypothesis draw costs ~25 µs on the 2-core CI machine, so
drawing every field of every message tops out near 1,500 messages/s. Each
example therefore draws ``count`` (1-400 inputs), a small structured corpus
and one ``st.binary`` blob that an :class:`Entropy` reader turns into the
inputs' choices. Hypothesis still generates, replays and shrinks: a smaller
``count`` means fewer inputs, lower blob bytes plainer choices (choice 0 is
always the plainest option).

Modules, one job each:

* ``entropy``: :class:`Entropy`, :class:`FuzzFailure` and the failure helpers.
* ``bookkeeping``: counters, hypothesis profiles, known bugs, run wrappers.
* ``messages``: wire messages, msgpack values and hostile headers from entropy.
* ``wire_oracle``: what a decoded item must produce; reply round trips.
* ``wire_fuzzer``: :class:`WireSession` and :func:`wire_fuzzer`.
* ``hypercall_inputs``: :class:`RequestMaker`, targeted hypercall requests.
* ``hypercall_fuzzer``: :class:`HypercallRun` and :func:`hypercall_fuzzer`.
* ``campaign``: :data:`FUZZERS` and :func:`run_campaign` (the long runner).
* ``cli`` (run as ``python -m tests.fuzz``): the ``make fuzz`` command line.
"""

from tests.fuzz.bookkeeping import (
    COUNTS,
    HYPERCALL,
    KNOWN_BUGS,
    KNOWN_HITS,
    LONG_PROFILE,
    STATS,
    SUITE_PROFILE,
    WIRE,
)
from tests.fuzz.campaign import FUZZERS, Campaign, run_campaign, signature_of
from tests.fuzz.cli import main
from tests.fuzz.entropy import Entropy, FuzzFailure
from tests.fuzz.hypercall_fuzzer import hypercall_fuzzer
from tests.fuzz.wire_fuzzer import wire_fuzzer

__all__ = [
    "WIRE",
    "HYPERCALL",
    "FUZZERS",
    "wire_fuzzer",
    "hypercall_fuzzer",
    "COUNTS",
    "STATS",
    "KNOWN_BUGS",
    "KNOWN_HITS",
    "SUITE_PROFILE",
    "LONG_PROFILE",
    "Entropy",
    "FuzzFailure",
    "Campaign",
    "run_campaign",
    "signature_of",
    "main",
]
