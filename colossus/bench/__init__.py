"""``colossus bench``: benchmarks that print a table and write ``--json PATH``.

Each bench lives in its own module and registers one subcommand here."""

from __future__ import annotations

import argparse


def add_bench_parser(sub, fmt) -> None:
    from colossus.bench import bigmodel, nvme, offload, optim, sp, step, tp

    b = sub.add_parser(
        "bench",
        help="benchmarks (print a table, --json PATH writes the figures)",
        formatter_class=fmt,
        epilog="examples:\n  colossus bench step --model gpt2-124m --batch 4 --seq 128 --json step.json\n"
        "  colossus bench offload --model gpt2-124m --json bench-offload.json\n"
        "  colossus bench bigmodel --params 4e9 --host-budget 12GiB --nvme-dir /nvme\n"
        "  colossus bench nvme --nvme-dir /nvme --json nvme.json\n"
        "  colossus bench tp --json bench-tp.json --plot bench-tp.png\n"
        "  colossus bench sp --json bench-sp.json --plot bench-sp.png\n"
        "  colossus bench optim --json bench-optim.json\n",
    )
    bsub = b.add_subparsers(dest="bench", required=True)
    step.add_parser(bsub, fmt)
    offload.add_parser(bsub, fmt)
    bigmodel.add_parser(bsub, fmt)
    nvme.add_parser(bsub, fmt)
    tp.add_parser(bsub, fmt)
    sp.add_parser(bsub, fmt)
    optim.add_parser(bsub, fmt)


__all__ = ["add_bench_parser", "argparse"]
