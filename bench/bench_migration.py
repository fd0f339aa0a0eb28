"""Plain QEMU against dwcp, live migrations of the same guest measured in the same run.

Usage (as root, after scripts/setup.sh):

    .venv/bin/python bench/bench_migration.py [--write-doc] [--links lan,wan,wanloss]
        [--memory 1024] [--working-set 512] [--dirty 8] [--plain-timeout 120]
        [--repeats 3] [--loss-repeats 1]

For each link (LAN; WAN 50 ms RTT, 1 Gbit/s; the same WAN with 0.1% loss) a two-host bed
with stock host TCP settings (cubic, 4 MiB send buffer) is built, and the bare-metal test
guest (1 GiB RAM, 512 MiB working set dirtying 8 MiB/s) is migrated by:
- plain QEMU direct (one TCP connection),
- plain QEMU multifd (4 channels) + zstd,
- plain QEMU xbzrle,
- dwcp: plain QEMU on both hosts, the stream carried by the agents (unix sockets), with the
  default configuration (mutual TLS; on the LAN the passthrough bytes go over the TLS lane);
  on the LAN also through the session (``transport.tls_lane: false``, the default before the
  TLS lane) and with ``transport.direct_lane`` (the passthrough bytes spliced over a plain TCP
  connection, opt-in).
Bytes on the wire are counted by the WAN emulator (both directions, IP packets), so every
row is measured the same way; on the LAN, QEMU's own ram.transferred (plain) and the agents'
wire bytes (dwcp) are reported. Agent CPU is user+system seconds of both agent processes.
Every run checks RAM identity at switchover and the guest's verification afterwards.
Total time and downtime are end to end (QMP events: ``migrate`` -> the destination's
MIGRATION completed; source STOP -> the same), QEMU's own source-side figures beside them.
Every run lifts QEMU's default 128 MiB/s throttle (max-bandwidth), as libvirt does. On the
LAN and the WAN each configuration runs ``--repeats`` times (a fresh bed each round) and the
run with the median total time is reported: single runs on this 2-core machine spread widely.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dwcp_migrate.testbed.benchdoc import write_section  # noqa: E402
from dwcp_migrate.testbed.compare import (  # noqa: E402
    ALL_PLAIN,
    Row,
    format_rows,
    median_rows,
    run_comparison,
    summarize,
)
from dwcp_migrate.testbed.guests import WorkloadSpec  # noqa: E402
from dwcp_migrate.testbed.scenario import GuestSetup  # noqa: E402
from dwcp_migrate.testbed.wan import WanSpec  # noqa: E402

DOC = REPO / "docs" / "BENCHMARKS.md"
LANE_LABEL = "dwcp, direct lane (opt-in, plaintext)"
SESSION_LABEL = "dwcp, through the session (tls_lane off)"
LINKS = {"lan": None, "wan": WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000),
         "wanloss": WanSpec.from_rtt(rtt_ms=50, rate_mbit=1000, loss=0.001)}


def write_doc(section: str) -> None:
    write_section("bench_migration", section, DOC)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default="lan,wan,wanloss")
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--working-set", type=int, default=512)
    parser.add_argument("--dirty", type=float, default=8)
    parser.add_argument("--plain-timeout", type=float, default=120)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per configuration on lan and wan (median reported)")
    parser.add_argument("--loss-repeats", type=int, default=1,
                        help="runs per configuration on wanloss (plain runs time out there)")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    setup = GuestSetup("baremetal", args.memory, WorkloadSpec(
        working_set_mib=args.working_set, dirty_mib_per_s=args.dirty))
    rows: list[Row] = []
    for link in args.links.split(","):
        for _ in range(args.loss_repeats if link == "wanloss" else args.repeats):
            rows += run_comparison(link, LINKS[link], setup, ALL_PLAIN,
                                   timeout_s=args.plain_timeout)
            if link == "lan":  # the opt-in plaintext lane for passthrough (agent/lane.py)
                rows += run_comparison(link, None, setup, (), timeout_s=args.plain_timeout,
                                       agent_settings={"transport": {"direct_lane": True}},
                                       dwcp_label=LANE_LABEL)
                # passthrough through the session, as before the TLS lane (agent/tlslane.py)
                rows += run_comparison(link, None, setup, (), timeout_s=args.plain_timeout,
                                       agent_settings={"transport": {"tls_lane": False}},
                                       dwcp_label=SESSION_LABEL)
            print(format_rows([r for r in rows if r.link == link]), flush=True)
    medians = median_rows(rows)
    table = format_rows(medians)
    summary = "\n".join(summarize(medians, args.plain_timeout))
    print(table)
    print(summary)
    if args.write_doc:
        cmd = "sudo .venv/bin/python bench/bench_migration.py --write-doc" + \
            ("" if args.links == "lan,wan,wanloss" else f" --links {args.links}") + \
            ("" if args.repeats == 3 else f" --repeats {args.repeats}") + \
            ("" if args.loss_repeats == 1 else f" --loss-repeats {args.loss_repeats}")
        section = (
            "## Live migration: plain QEMU against dwcp (bench/bench_migration.py)\n\n"
            f"Command: `{cmd}`  \n"
            f"Measured {datetime.date.today()} on {platform.node()}, "
            f"{os.cpu_count()} CPUs, QEMU 10.0 (TCG), bare-metal test guest: {args.memory} MiB "
            f"RAM, {args.working_set} MiB working set dirtying {args.dirty:g} MiB/s. Stock "
            "host TCP settings (cubic, 4 MiB send buffer) on both hosts; the agents tune their "
            "own sockets by path mode (1 cubic connection on the LAN, 8 bbr on the WAN). "
            "QEMU's default 128 MiB/s throttle (max-bandwidth) is lifted "
            "in every run, as libvirt does. Medians of "
            f"{args.repeats} runs on lan and wan (each round on a fresh bed; every run's time "
            f"in the note), {args.loss_repeats} on wanloss. Plain runs are given "
            f"{args.plain_timeout:.0f} s. Bytes on the wire: counted by the WAN emulator "
            "(IP packets, both directions); on the LAN, QEMU's ram.transferred (plain) and "
            "the agents' message bytes (dwcp). Agent CPU: user+system seconds of both agents. "
            "Total time and downtime are end to end, from QMP event timestamps (both QEMUs "
            "on this machine's clock): total time from `migrate` to the destination's "
            "MIGRATION completed event (it has loaded the whole stream), downtime from the "
            "source's STOP event to that same moment. QEMU's own figures (source "
            "query-migrate) stop when the source has written its last byte, before what is "
            "still on the way (socket buffers, the agents' queues, the link) has arrived; "
            "they are shown beside."
            f"\n\n{table}\n\n{summary}\n")
        write_doc(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
