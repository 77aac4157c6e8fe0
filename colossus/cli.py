"""``colossus`` command line: train | generate | export | bench."""

from __future__ import annotations

import argparse
import sys
import textwrap

from colossus.errors import ColossusError

TRAIN_EXAMPLES = """\
examples:
  colossus train recipes/gpt2-tiny.yaml
  colossus train recipes/gpt2-tiny.yaml --set optim.lr=3e-4 --set train.max_steps=50
  colossus train recipes/bert-tiny-mlm.yaml --run-dir runs/bert --resume latest
  torchrun --nproc_per_node 2 -m colossus.cli train recipes/gpt2-tiny.yaml --set strategy.name=ddp
  ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
      -m colossus.cli train recipes/gpt2-tiny.yaml --set strategy.name=ddp
"""

GENERATE_EXAMPLES = """\
examples:
  colossus generate runs/gpt2-tiny-20261122-101500/checkpoints/step-00000300 --prompt "def main("
  colossus generate CKPT --prompt "import os" --max-new-tokens 100 --temperature 0
"""

EXPORT_EXAMPLES = """\
examples:
  colossus export runs/gpt2-tiny-20261122-101500/checkpoints/step-00000300 exported/gpt2-tiny
  python -c "from transformers import AutoModelForCausalLM as A; A.from_pretrained('exported/gpt2-tiny')"
"""


def _build_parser() -> argparse.ArgumentParser:
    from colossus.bench import add_bench_parser

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog="colossus",
        description="Train models larger than your memory, from one CPU box to a GPU cluster.",
        formatter_class=fmt,
        epilog=textwrap.dedent(
            """\
            examples:
              colossus train recipes/gpt2-tiny.yaml --set train.max_steps=100
              colossus generate RUN_DIR/checkpoints/step-00000300 --prompt "def "
              colossus export RUN_DIR/checkpoints/step-00000300 exported/gpt2-tiny
              colossus plan recipes/gpt2-tiny-chunk.yaml --world-size 2
              colossus bench step --model gpt2-124m --json step.json
            """
        ),
    )
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{train,plan,generate,export,rlhf-data,bench}"
    )

    t = sub.add_parser(
        "train", help="train from a YAML recipe", epilog=TRAIN_EXAMPLES, formatter_class=fmt
    )
    t.add_argument("recipe", help="YAML recipe (see recipes/)")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. optim.lr=3e-4 (repeatable)",
    )
    t.add_argument("--run-dir", help="output directory (default runs/<recipe>-<timestamp>)")
    t.add_argument(
        "--resume",
        metavar="latest|PATH",
        help="resume from a checkpoint (latest = newest under the run dir)",
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")

    pl = sub.add_parser(
        "plan",
        help="where params / grads / optimizer state / activations will live, before running",
        formatter_class=fmt,
        epilog=textwrap.dedent(
            """\
            examples:
              colossus plan recipes/gpt2-tiny-chunk.yaml --world-size 2
              colossus plan recipes/gpt2-tiny.yaml --set strategy.name=chunk \\
                  --set strategy.chunk.host_budget=64MiB
            exit status 2 when the placement cannot fit its budgets (with a fix that would).
            """
        ),
    )
    pl.add_argument("recipe", help="YAML recipe (see recipes/)")
    pl.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--world-size", type=int, default=1, help="data-parallel ranks to plan for")
    pl.add_argument(
        "--disk-gbps", type=float, default=None, help="NVMe bandwidth (default: probe nvme_dir)"
    )

    g = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        epilog=GENERATE_EXAMPLES,
        formatter_class=fmt,
    )
    g.add_argument("checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)

    e = sub.add_parser(
        "export",
        help="write a Hugging Face from_pretrained folder",
        epilog=EXPORT_EXAMPLES,
        formatter_class=fmt,
    )
    e.add_argument("checkpoint")
    e.add_argument("out_dir")
    e.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")

    rd = sub.add_parser(
        "rlhf-data",
        help="write the built-in RLHF demo task's JSONL files (sft / pairs / prompts)",
        formatter_class=fmt,
        epilog="example:\n  colossus rlhf-data data/rlhf-demo --n-examples 3000\n",
    )
    rd.add_argument("out_dir")
    rd.add_argument("--n-examples", type=int, default=3000, help="prompts (default 3000)")
    rd.add_argument("--eval-fraction", type=float, default=0.1)
    rd.add_argument("--seed", type=int, default=0)

    add_bench_parser(sub, fmt)
    return p


def _train(args: argparse.Namespace) -> int:
    from colossus.config import TrainingConfig

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    if args.resume:
        overrides.append(f"checkpoint.resume_from={args.resume}")
    cfg = TrainingConfig.from_yaml(args.recipe, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    from colossus.recipe import run_recipe

    run_recipe(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "plan":
            from colossus.config import TrainingConfig
            from colossus.plan import run_plan

            cfg = TrainingConfig.from_yaml(args.recipe, args.overrides)
            return run_plan(cfg, args.world_size, args.disk_gbps)
        if args.command == "generate":
            from colossus.export import generate_text

            print(
                generate_text(
                    args.checkpoint,
                    args.prompt,
                    args.max_new_tokens,
                    args.temperature,
                    args.top_k,
                    args.seed,
                )
            )
            return 0
        if args.command == "export":
            from colossus.export import export_checkpoint

            out = export_checkpoint(args.checkpoint, args.out_dir, force=args.force)
            print(f"exported to {out}")
            return 0
        if args.command == "rlhf-data":
            from colossus.rlhf.data import write_demo_data

            files = write_demo_data(args.out_dir, args.n_examples, args.eval_fraction, args.seed)
            for name, path in files.items():
                n = sum(1 for _ in open(path, encoding="utf-8"))
                print(f"{name:15s} {n:6d} records  {path}")
            return 0
        if args.command == "bench":
            return args.bench_fn(args)
    except ColossusError as e:
        print(f"colossus: error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
