"""Train an NVAE.  ``python train.py`` trains the ``demo`` preset on the bundled MNIST subset.

Every Config field is a flag (``--num_channels_enc 64`` or ``--num-channels-enc 64``);
``--preset NAME`` picks the base recipe.  Multi-GPU / multi-node: launch with torchrun.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hvae import cli
from hvae.config import (Config, check_flags_matter, explicit_overrides, parse_args, preset,
                         resume_config)

PROG = "train.py"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue a run exactly where it stopped (default: the run "
                             "folder's checkpoint.pt); flags given now may change only the "
                             "run's length and how it runs (README: Training)")
    parser.add_argument("--overwrite", nargs="?", const=True, default=False, type=cli.boolean,
                        metavar="BOOL", help="start a new run in a run folder that holds "
                        "another run, removing its checkpoints, metrics and images first")
    parser.add_argument("--device", default=None, type=cli.DEVICE,
                        help="e.g. cpu, cuda, cuda:1 (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def resolve_config(config: Config, args: argparse.Namespace) -> tuple[Config, Path | None]:
    """With --resume, the checkpoint's config with the flags given now, which may change
    only what ``resume_config`` allows.  A flag that would do nothing is refused."""
    explicit = explicit_overrides(args)
    if not args.resume:
        check_flags_matter(config, explicit, preset(config.preset))
        return config, None
    from hvae.checkpoint import load_checkpoint  # torch: imported after the argument checks
    path = Path(config.out) / config.run_name / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
    state = load_checkpoint(path)
    resumed = resume_config(state["config"], explicit, args.preset, str(path),
                            imported=bool(state.get("imported")))
    check_flags_matter(resumed, explicit, Config.from_dict(state["config"]))
    return resumed, path


@cli.entry_point(PROG)  # bad input (config, data, checkpoint, device): one line, exit code 2
def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv, build_parser())
    config, resume = resolve_config(config, args)
    cli.check_output_dir(Path(config.out) / config.run_name, "--out")
    from hvae.runtime import Interrupted  # after argument errors, which are instant
    from hvae.training import train

    try:
        summary = train(config, resume=resume, progress=not args.no_progress, device=args.device,
                        overwrite=args.overwrite)
    except Interrupted as stop:  # SIGTERM / Ctrl-C: the checkpoint is already saved
        return stop.exit_code
    if summary and "test_nelbo" in summary:  # rank 0 holds the results
        print(f"test NELBO {summary['test_nelbo']:.2f} nats ({summary['test_bpd']:.4f} bits/dim); "
              f"IW test NLL (K={config.num_iw_samples}) {summary['iw_nll_nats']:.2f} nats "
              f"({summary['iw_nll_bpd']:.4f} bits/dim)", file=sys.stderr)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
