"""``pvemu guest``: boot one guest against a running hypervisor and run the
canonical mprotect workload in one pv-ops mode."""

from __future__ import annotations

import argparse
import json
import sys

from guest.pvops import MODES, UNSAFE_MODES

EPILOG = """\
modes: native (bare metal, no hypervisor), trap (unbatched traps), ptwr
(writable page tables), xen (Linux's multicall batching), batched (a whole PTE
page per hypercall) and naive (UNSAFE: commits without PRESERVE_AD and loses
A/D bits; only for showing the race).

example (two terminals):
  pvemu hypervisor --socket /tmp/hv.sock
  pvemu guest --socket /tmp/hv.sock --mode xen --pages 4096
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--socket", metavar="PATH", help="the hypervisor's socket (not for native)")
    parser.add_argument("--workload", choices=("mprotect",), default="mprotect")
    parser.add_argument("--mode", choices=MODES, default="xen", help="pv-ops mode (default xen)")
    parser.add_argument("--pages", type=_positive, default=4096, help="region size (default 4096)")
    parser.add_argument("--vcpus", type=_positive, default=2, help="vCPUs (default 2)")
    parser.add_argument("--memory-mib", type=_positive, default=None, help="guest memory")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def memory_for(pages: int) -> int:
    """Guest memory for a region: the pages, their tables, and headroom."""
    return max(16, (pages * 4096 * 5 // 4) // (1 << 20) + 16)


def run(args: argparse.Namespace) -> int:
    import trio

    from guest.client import HypervisorError
    from guest.kernel import boot
    from guest.workload import run_mprotect_workload

    if args.mode != "native" and not args.socket:
        print("pvemu guest: --socket is required for every mode but native", file=sys.stderr)
        return 2

    async def main() -> dict[str, object]:
        async with boot(
            args.socket,
            mode=args.mode,
            memory_mib=args.memory_mib or memory_for(args.pages),
            vcpus=args.vcpus,
        ) as kernel:
            result = await run_mprotect_workload(kernel, args.pages)
        return result.as_dict()

    try:
        result = trio.run(main)
    except (OSError, HypervisorError) as exc:
        print(f"pvemu guest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        from scripts.report import print_table

        print_table(args.pages, [result])
        if args.mode in UNSAFE_MODES:
            print(f"note: mode {args.mode} is UNSAFE (loses A/D bits)")
    return 0 if result["counts_agree"] and result["audit_clean"] else 3
