"""Evaluate a checkpoint; prints one JSON line on stdout (progress goes to stderr).

    python evaluate.py --checkpoint runs/demo/checkpoint.pt --mode nll --num-iw-samples 1000
    python evaluate.py --checkpoint CKPT --mode sample --num 64 --temp 0.7 --readjust-bn
    python evaluate.py --checkpoint CKPT --mode recon
    python evaluate.py --checkpoint CKPT --mode fid --temp 0.8 --fid-weights pt_inception.pth
    python evaluate.py --checkpoint CKPT --mode encode --split test
    python evaluate.py --checkpoint CKPT --mode decode --latents eval/latents_test.npz --temp 0.8
    python evaluate.py --checkpoint CKPT --mode report --out runs/demo   # report.html + .json
    torchrun --nproc_per_node 4 evaluate.py --checkpoint CKPT --mode nll

Files go to --out (default: the checkpoint's folder / "eval").  Only ``nll`` is
sharded over torchrun ranks; the other modes run on rank 0.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hvae import cli  # torch is imported inside main: argument errors and Ctrl-C stay one line
from hvae.errors import RunFailed, exhausted

PROG = "evaluate.py"
MODES = ("nll", "sample", "recon", "fid", "encode", "decode", "report")
DEFAULT_NUM = {"sample": 64, "recon": 64, "fid": 50000, "nll": 0, "encode": 0, "decode": 0,
               "report": 0}


def build_parser() -> argparse.ArgumentParser:
    """Flags that only some modes use default to None (their defaults are in DEFAULTS),
    so that ``check_args`` can refuse one given to a mode that would ignore it."""
    p = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    count, count0 = cli.integer(1), cli.integer(0)  # counts; 0 = "all" / "none"

    def add(name: str, **kwargs):
        flags = [f"--{name}"] + ([f"--{name.replace('-', '_')}"] if "-" in name else [])
        p.add_argument(*flags, **kwargs)

    add("checkpoint", required=True, help="checkpoint file written by training")
    add("mode", required=True, choices=MODES)
    add("data", default=None, help="dataset location (default: the checkpoint config's data)")
    add("out", default=None, help="output folder (default: CHECKPOINT_DIR/eval)")
    add("overwrite", action="store_true", help="replace output files that already exist")
    add("batch-size", type=count, default=None, help="default: the config's batch_size")
    add("device", default=None, type=cli.DEVICE,
        help="cpu, cuda, cuda:1, mps ... (default: cuda if available)")
    add("no-ema", action="store_true", help="use the raw weights instead of the EMA")
    add("seed", type=cli.integer(0, 2**63 - 1), default=None, help="default 0")
    # --num-images is the spelling torchrun accepts (it reads --num as its own --numa-binding)
    p.add_argument("--num", "--num-images", "--num_images", dest="num", type=count0, default=None,
                   help="images to use: samples (sample/fid, default 64/50000), inputs (recon, 64), "
                        "images of the split or of --latents (nll/encode/decode, default 0 = all)")
    add("split", default=None, choices=("train", "test"),
        help="split for nll/recon/encode (default test)")
    add("temp", default=None, type=cli.argtype(_checked_temperature),
        help="temperature >= 0, or a comma list with one value per group (top first); default 1")
    add("readjust-bn", action="store_true",
        help="re-estimate BatchNorm statistics from samples at --temp before sampling")
    add("readjust-bn-batches", type=count, default=None, help="default 100")
    add("nrow", type=count, default=None, help="images per row of PNG grids (default 8)")
    add("num-iw-samples", type=count, default=None, help="K for nll (default: the config's)")
    add("iw-chunk", type=count, default=None,
        help="importance samples per image per forward (default: ~256 images per forward)")
    add("sample", action="store_true", help="encode: posterior samples instead of means")
    add("latents", default=None, help="decode: .npz written by --mode encode")
    add("fid-weights", default=None, help="local pytorch-fid Inception weights (.pth)")
    add("fid-cache", default=None, help="folder of cached reference statistics (default: --out)")
    add("fid-ref-num", type=count0, default=None,
        help="training images for FID statistics (0, the default: all)")
    add("no-progress", action="store_true", help="no progress bars")
    return p


# The modes that use each optional flag; given to another mode, a flag is refused
# (it would do nothing).  Flags every mode uses are not listed.
USED_BY = {
    "data": ("nll", "recon", "fid", "encode", "report"),
    "out": ("sample", "recon", "fid", "encode", "decode", "report"),
    "overwrite": ("sample", "recon", "encode", "decode", "report"),
    "seed": ("nll", "sample", "recon", "fid", "encode", "decode", "report"),
    "split": ("nll", "recon", "encode"),
    "temp": ("sample", "fid", "decode"),
    "readjust_bn": ("sample", "fid"),
    "readjust_bn_batches": ("sample", "fid"),
    "nrow": ("sample", "recon", "decode"),
    "num_iw_samples": ("nll", "report",),
    "iw_chunk": ("nll",),
    "sample": ("encode",),
    "latents": ("decode",),
    "fid_weights": ("fid",),
    "fid_cache": ("fid",),
    "fid_ref_num": ("fid",),
}
DEFAULTS = {"seed": 0, "split": "test", "temp": "1.0", "readjust_bn_batches": 100, "nrow": 8,
            "fid_ref_num": 0}


def split_loader(config, split: str, batch: int, num: int, rank: int = 0, world: int = 1):
    """The first ``num`` images of ``split`` (0: all), in order, this rank's share of them."""
    from hvae.data import build_loader
    return build_loader(config, split, distributed=world > 1, rank=rank, world_size=world,
                        batch_size=batch, shuffle=False, drop_last=False, max_images=num)
def _checked_temperature(text: str) -> str:
    """--temp is kept as text (it names output files); parse_temperature checks it."""
    from hvae import evaluation as ev
    ev.parse_temperature(text)
    return text


MIN_NUM = {"sample": 1, "recon": 1, "fid": 2}  # modes where --num is a count, not "0 = all"


def check_args(args: argparse.Namespace) -> None:
    """Checks that involve several arguments; single values are checked by their types.
    Fills in the defaults of the flags in ``DEFAULTS``."""
    if args.num is not None and args.num < MIN_NUM.get(args.mode, 0):
        least = MIN_NUM[args.mode]
        raise cli.UsageError(f"--num {args.num} is not allowed with --mode {args.mode}: "
                             f"at least {least} image{'s' if least > 1 else ''} (0 means "
                             "'all' only for nll, encode and decode)")
    for dest, modes in USED_BY.items():
        if getattr(args, dest) not in (None, False) and args.mode not in modes:
            raise cli.UsageError(f"--{dest.replace('_', '-')} only applies to --mode "
                                 f"{' or '.join(modes)}, not {args.mode}")
    if args.readjust_bn_batches is not None and not args.readjust_bn:
        raise cli.UsageError("--readjust-bn-batches only applies with --readjust-bn")
    if args.mode == "encode" and args.seed is not None and not args.sample:
        raise cli.UsageError("--seed only applies to --mode encode with --sample (posterior "
                             "means are not random)")
    for dest, value in DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    if args.mode == "decode" and not args.latents:
        raise cli.UsageError("--mode decode needs --latents FILE (from --mode encode)")
    for flag in ("checkpoint", "latents", "fid_weights"):  # fail before loading the model
        if getattr(args, flag):
            cli.check_input_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    cli.check_output_dir(output_dir(args), "--out")
    for path in output_files(args):  # never replace an earlier result unless asked
        cli.check_new_file(path, "--out: output file", args.overwrite)


def output_files(args: argparse.Namespace) -> list[Path]:
    """The files the mode will write (nll writes none, fid only its reusable cache)."""
    out = output_dir(args)
    stem = {"sample": _tag("samples", args), "recon": f"recon_{args.split}",
            "decode": _tag("decoded", args)}.get(args.mode)
    if stem:
        return [out / f"{stem}.png", out / f"{stem}.npz"]
    if args.mode == "report":
        return [out / "report.html", out / "report.json"]
    return [out / f"latents_{args.split}.npz"] if args.mode == "encode" else []


def output_dir(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"


def run(args: argparse.Namespace) -> dict:
    from hvae.runtime import runtime_session

    with runtime_session(args.device) as runtime:
        return evaluate(args, runtime)


def evaluate(args: argparse.Namespace, runtime) -> dict:
    """The mode's work on this process: every rank takes its shard of ``nll``; the
    other modes run on rank 0 alone."""
    from hvae import evaluation as ev
    from hvae.checkpoint import load_checkpoint, load_model

    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    state = load_checkpoint(args.checkpoint)
    has_ema = state.get("ema") is not None
    step = state.get("step")
    if args.no_ema and not has_ema:
        raise cli.UsageError("--no-ema does nothing: the checkpoint has no EMA weights")
    model, config = load_model(args.checkpoint, use_ema=not args.no_ema, device=device,
                               state=state)
    del state
    if args.data is not None:
        if config.dataset == "mnist_subset":
            raise cli.UsageError("--data is not used: the checkpoint's dataset is the bundled "
                                 "'mnist_subset', which reads no files")
        config = config.replace(data=args.data)
    out = output_dir(args)
    batch = args.batch_size or config.batch_size
    num = DEFAULT_NUM[args.mode] if args.num is None else args.num
    t = ev.parse_temperature(args.temp)
    groups = sum(config.groups_per_scale())
    if isinstance(t, list) and len(t) != groups:
        raise ev.EvaluationError(f"--temp has {len(t)} values but the model has {groups} "
                                 "latent groups: give one value, or one per group (top first)")
    progress = not args.no_progress and rank == 0
    result = {"mode": args.mode, "checkpoint": str(args.checkpoint),
              "ema": has_ema and not args.no_ema}

    if args.mode == "nll":
        k = args.num_iw_samples or config.num_iw_samples
        loader = split_loader(config, args.split, batch, num, rank, world)
        result["split"] = args.split
        # --seed fixes the importance samples too (each rank its own stream)
        result.update(ev.iw_log_likelihood(model, loader, k, args.iw_chunk, device, progress,
                                            distributed=world > 1, seed=args.seed + rank))
        return result if rank == 0 else {}  # every rank holds the all-reduced sums; one reports
    if rank != 0:
        return {}

    if args.mode in ("sample", "fid") and args.readjust_bn:
        model = ev.readjust_bn(model, t, args.readjust_bn_batches, batch, seed=args.seed)
    result.update(temp=t, readjust_bn=args.readjust_bn)
    if args.mode == "sample":
        images = ev.generate(model, num, t, batch, seed=args.seed)
        result.update(num=num, files=ev.save_images(images, out, _tag("samples", args), args.nrow))
    elif args.mode == "recon":
        result.update(recon(model, config, args, num, batch, out))
    elif args.mode == "fid":
        result.update(fid(model, config, args, num, batch, t, out, device, progress))
    elif args.mode == "encode":
        loader = split_loader(config, args.split, batch, num)
        with ev.seeded(args.seed if args.sample else None, device):
            latents = ev.encode_dataset(model, loader, use_mean=not args.sample, progress=progress)
        path = ev.save_latents(out / f"latents_{args.split}.npz", latents)
        result.update(num_images=int(latents[0].shape[0]), num_groups=len(latents),
                      shapes=[list(z.shape[1:]) for z in latents], files={"npz": path},
                      posterior="sample" if args.sample else "mean")
    elif args.mode == "report":
        from hvae.report import build_report, write_report
        k = args.num_iw_samples or config.num_iw_samples
        report, images = build_report(
            model, config, split_loader(config, "test", batch, num), num_iw_samples=k,
            metrics_file=Path(args.checkpoint).resolve().parent / "metrics.jsonl",
            seed=args.seed, step=step, progress=progress)
        page, data = write_report(out, report, images)
        result.update(files={"html": str(page), "json": str(data)}, test=report["test"],
                      iw=report["iw"])
    elif args.mode == "decode":
        latents = [z[:num] if num else z for z in ev.load_latents(args.latents, model.latent_shapes)]
        images = ev.decode_latents(model, latents, t, batch, seed=args.seed)
        result.update(num=int(images.shape[0]), num_groups_given=len(latents),
                      files=ev.save_images(images, out, _tag("decoded", args), args.nrow))
    return result


def _tag(name: str, args: argparse.Namespace) -> str:
    temp = args.temp.replace(",", "_")
    return f"{name}_t{temp}" + ("_bn" if args.readjust_bn else "")


def recon(model, config, args, num, batch, out) -> dict:
    """Reconstruction grid and mean errors over ``num`` images of the split."""
    import torch
    from hvae import evaluation as ev

    loader = split_loader(config, args.split, batch, num)
    device = ev.model_device(model)
    inputs, recons, mse, nats = [], [], [], []
    with ev.seeded(args.seed, device):
        for batch in loader:
            x = ev.images_of(batch)
            r = ev.reconstruct(model, x.to(device))
            inputs.append(x.float())
            recons.append(r["recons"].cpu())
            mse.append(r["mse"].cpu())
            nats.append(r["recon_nats"].cpu())
    inputs, recons = torch.cat(inputs), torch.cat(recons)
    grid = ev.interleave_rows(inputs, recons, args.nrow)
    files = ev.save_images(grid, out, f"recon_{args.split}", args.nrow)
    return dict(num_images=int(inputs.shape[0]), mse=torch.cat(mse).mean().item(),
                recon_nats=torch.cat(nats).mean().item(), files=files)


def fid(model, config, args, num, batch, t, out, device, progress) -> dict:
    """FID of ``num`` samples at temperature ``t`` against the training set."""
    from hvae import evaluation as ev
    from hvae.data import build_loader

    extractor = ev.inception_extractor(args.fid_weights, device)
    weights = Path(args.fid_weights)
    key = dict(dataset=config.dataset, data=str(config.data), image_size=config.image_size,
               channels=config.in_channels, binary=config.binary, bits=config.num_x_bits,
               ref_num=args.fid_ref_num, extractor="pytorch-fid-inception-2048",
               weights=weights.name, weights_size=weights.stat().st_size)
    cache = ev.stats_cache_path(args.fid_cache or out, key)

    def train_loader():
        return build_loader(config, "train", batch_size=batch, shuffle=False, drop_last=False)

    ref = ev.reference_stats(extractor, train_loader, cache, key, args.fid_ref_num,
                             device, progress)
    score = ev.fid(model, extractor, ref, num, t, batch, args.seed, progress)
    return dict(fid=score, num_samples=num, reference_cache=str(cache))


def resource_failure(err: BaseException, args: argparse.Namespace) -> RunFailed | None:
    """``err`` as one line when memory or disk ran out: which, in which pass, what to try."""
    resource = exhausted(err)
    if resource is None or isinstance(err, RunFailed):
        return None
    if resource == "disk space":
        return RunFailed(f"no space left on device while writing to {output_dir(args)}: free "
                         "space there or give another --out")
    if resource == "device memory":
        resource = f"GPU memory ({args.device or 'cuda'})"
    if args.mode == "nll":
        return RunFailed(f"out of {resource} in the importance-weighted pass (--batch-size "
                         f"{args.batch_size or 'of the config'}, --iw-chunk "
                         f"{args.iw_chunk or 'default'}): try a smaller --iw-chunk (importance "
                         "samples per image in one forward pass) or --batch-size")
    return RunFailed(f"out of {resource} in --mode {args.mode}: try a smaller --batch-size")


@cli.entry_point(PROG)  # bad input (arguments, checkpoint, data ...): one line, exit code 2
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    try:
        result = run(args)
    except Exception as err:
        failure = resource_failure(err, args)
        if failure is None:
            raise
        raise failure from err
    if result:
        print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
