"""Import a checkpoint written by NVAE's own train.py (NVlabs/NVAE) as an hvae checkpoint.

    python scripts/import_nvae.py checkpoint.pt --out nvae_cifar10.pt   # --overwrite to replace it
    python evaluate.py --checkpoint nvae_cifar10.pt --mode nll --data DIR
    python evaluate.py --checkpoint nvae_cifar10.pt --mode sample --temp 0.7 --readjust-bn
    python train.py --resume nvae_cifar10.pt --data DIR --name finetune    # fine-tuning

The file is read with ``torch.load(weights_only=True)``, only ``argparse.Namespace``
(NVAE's ``args``) allowed besides tensors, so it cannot run code.  NVAE's flags are
hvae's config fields (same names); flags that older checkpoints lack take NVAE's
evaluate.py defaults (``ada_groups`` false, ``min_groups_per_scale`` 1,
``num_mixture_dec`` 10).  Only NVAE's ``res_mbconv`` architecture (every published
checkpoint) has a counterpart here.

What carries over: the weights and the BatchNorm statistics, nothing else.  NVAE
saves neither an EMA nor its spectral power-iteration vectors, and its Adamax
moments, learning-rate schedule and gradient scaler belong to its own run; so
``train.py --resume`` on an imported checkpoint starts a fresh optimiser, schedule
and gradient-skip history at step 0 (it says so), and the config's warm-up applies.

Layout differences handled: NVAE's ``*.weight_normalized`` entries (aliases of
``*.weight``, checked and dropped), its four factorised-reduce convs (one grouped
conv here), the order of the logistic-mixture head's channels (per colour there,
per parameter kind here), ``prior_ftr0`` (``h0``).  Anything that does not map
(a missing or extra entry, a shape) stops the import with one line naming it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

try:
    from hvae import cli
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hvae import cli
from hvae.errors import HvaeError

PROG = "import_nvae.py"

# NVAE's get_arch_cells('res_mbconv'): the only cell layout mapped here.
RES_MBCONV = {
    "normal_enc": ["res_bnswish", "res_bnswish"], "down_enc": ["res_bnswish", "res_bnswish"],
    "normal_dec": ["mconv_e6k5g0"], "up_dec": ["mconv_e6k5g0"],
    "normal_pre": ["res_bnswish", "res_bnswish"], "down_pre": ["res_bnswish", "res_bnswish"],
    "normal_post": ["mconv_e3k5g0"], "up_post": ["mconv_e3k5g0"], "ar_nn": [""],
}
# NVAE's dataset -> (hvae preset it resembles, hvae config fields); image sizes
# are NVAE's get_input_size (MNIST is stored at 28 and padded to 32 in both).
DATASETS = {
    "mnist": ("mnist", dict(dataset="mnist", image_size=28, pad_input=2, in_channels=1, binary=True)),
    "cifar10": ("cifar10", dict(dataset="cifar10", image_size=32)),
    "celeba_64": ("celeba64", dict(dataset="celeba64", image_size=64)),
    "imagenet_32": ("imagenet32", dict(dataset="imagenet32", image_size=32)),
    "celeba_256": ("celebahq256", dict(dataset="celebahq256", image_size=256)),
    "ffhq": ("ffhq256", dict(dataset="ffhq256", image_size=256)),
    "lsun_bedroom_128": ("cifar10", dict(dataset="lmdb", image_size=128)),
    "lsun_church_64": ("cifar10", dict(dataset="lmdb", image_size=64)),
    "lsun_church_128": ("cifar10", dict(dataset="lmdb", image_size=128)),
}
# NVAE flags copied by name; the value for checkpoints that predate the flag (evaluate.py's).
ARCH_FLAGS = {
    "num_channels_enc": None, "num_channels_dec": None, "num_latent_scales": None,
    "num_groups_per_scale": None, "num_latent_per_group": None, "ada_groups": False,
    "min_groups_per_scale": 1, "num_preprocess_blocks": None, "num_preprocess_cells": None,
    "num_postprocess_blocks": None, "num_postprocess_cells": None,
    "num_cell_per_cond_enc": None, "num_cell_per_cond_dec": None, "use_se": None,
    "res_dist": None, "num_nf": None, "num_mixture_dec": 10, "num_x_bits": None,
}
TRAINING_FLAGS = ("batch_size", "epochs", "learning_rate", "learning_rate_min", "weight_decay",
                  "warmup_epochs", "weight_decay_norm", "weight_decay_norm_init",
                  "weight_decay_norm_anneal", "kl_anneal_portion", "kl_const_portion",
                  "kl_const_coeff", "seed")


class NvaeImportError(HvaeError, ValueError):
    """An NVAE checkpoint that cannot be read, or has no counterpart in hvae."""


# ------------------------------------------------------------------ reading --
def read_nvae(path: str | Path) -> dict[str, Any]:
    """NVAE's checkpoint dict, read without unpickling anything but tensors and a Namespace."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise NvaeImportError(f"NVAE checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise NvaeImportError(f"{str(path)!r} is not a readable NVAE checkpoint "
                              f"({type(err).__name__}: {first})") from err
    for key in ("state_dict", "args"):
        if not isinstance(state, dict) or key not in state:
            raise NvaeImportError(f"{str(path)!r} is not an NVAE checkpoint: it lacks {key!r}")
    if not isinstance(state["args"], argparse.Namespace):
        raise NvaeImportError(f"{str(path)!r}: 'args' is a {type(state['args']).__name__}, "
                              "not NVAE's argparse Namespace")
    return state


def check_arch(state: dict[str, Any]) -> None:
    """Refuse every NVAE cell layout but res_mbconv (by name and by content)."""
    name = getattr(state["args"], "arch_instance", "res_mbconv")
    cells = state.get("arch_instance", RES_MBCONV)
    if name != "res_mbconv" or cells != RES_MBCONV:
        raise NvaeImportError(f"arch_instance {name!r} is not supported: only NVAE's "
                              "'res_mbconv' cells (used by all its published checkpoints) map to hvae")


def config_from_args(args: argparse.Namespace):
    """hvae's Config for NVAE's ``args`` (flag names are shared)."""
    from hvae.config import PRESETS, Config, ConfigError

    dataset = getattr(args, "dataset", None)
    if dataset not in DATASETS:
        raise NvaeImportError(f"NVAE dataset {dataset!r} has no hvae counterpart "
                              f"(supported: {', '.join(DATASETS)})")
    base, data_fields = DATASETS[dataset]
    values: dict[str, Any] = {**PRESETS[base], "preset": base, "name": f"nvae_{dataset}",
                              "flow_type": "nvae", "channels_last": False}
    if base != "mnist":
        values.update(in_channels=3, pad_input=0, binary=False)
    values.update(data_fields)
    for flag, default in ARCH_FLAGS.items():
        value = getattr(args, flag, default)
        if value is None:
            raise NvaeImportError(f"NVAE args lack {flag!r}, which has no default")
        values[flag] = value
    values.update({f: getattr(args, f) for f in TRAINING_FLAGS if hasattr(args, f)})
    if values["num_latent_scales"] == 1 and values["num_groups_per_scale"] == 1:
        raise NvaeImportError("NVAE's vanilla VAE (num_latent_scales 1, num_groups_per_scale 1) "
                              "is not supported")
    if not values["binary"] and values["num_mixture_dec"] == 1:
        raise NvaeImportError("num_mixture_dec 1 (NVAE's Normal decoder) is not supported")
    try:
        return Config.from_dict(values)
    except ConfigError as err:
        raise NvaeImportError(f"NVAE args do not make an hvae config: {err}") from err


# ------------------------------------------------------------------ mapping --
class _Map:
    """hvae state-dict key -> (NVAE keys, concatenated on dim 0, and a transform)."""

    def __init__(self, our_keys):
        self.our_keys = list(our_keys)
        self.entries: dict[str, tuple[list[str], Callable | None]] = {}

    def module(self, ours: str, nvae: str) -> None:
        """Every leaf tensor of module ``ours`` from the same leaf of ``nvae``."""
        for key in self.our_keys:
            leaf = key[len(ours) + 1:]
            if key.startswith(ours + ".") and "." not in leaf:
                self.entries[key] = ([f"{nvae}.{leaf}"], None)

    def tensor(self, ours: str, nvae: list[str], fn: Callable | None = None) -> None:
        if ours in self.our_keys:
            self.entries[ours] = (nvae, fn)

    def enc_cell(self, ours: str, nvae: str, down: bool) -> None:
        for a, b in [("bn0", "_ops.0.bn_act"), ("conv0", "_ops.0.conv_0"), ("bn1", "_ops.1.bn_act"),
                     ("conv1", "_ops.1.conv_0"), ("se.fc1", "se.se.0"), ("se.fc2", "se.se.2")]:
            self.module(f"{ours}.{a}", f"{nvae}.{b}")
        if down:  # four stride-2 1x1 convs there; one grouped conv (or four) here
            for leaf in ("weight", "bias", "log_weight_norm"):
                self.tensor(f"{ours}.skip.conv.{leaf}", [f"{nvae}.skip.conv_{j}.{leaf}" for j in range(1, 5)])
            for j in range(4):
                self.module(f"{ours}.skip.convs.{j}", f"{nvae}.skip.conv_{j + 1}")

    def dec_cell(self, ours: str, nvae: str, up: bool) -> None:
        u, c = int(up), f"{nvae}._ops.0.conv"  # an up cell starts with a parameter-free up-sampling
        for a, b in [("bn0", f"{u}.bn"), ("conv0", f"{u + 1}.conv.0"), ("bn1", f"{u + 1}.conv.1"),
                     ("conv1", f"{u + 2}.conv.0"), ("bn2", f"{u + 2}.conv.1"), ("conv2", f"{u + 3}"),
                     ("bn3", f"{u + 4}.bn")]:
            self.module(f"{ours}.{a}", f"{c}.{b}")
        self.module(f"{ours}.se.fc1", f"{nvae}.se.se.0")
        self.module(f"{ours}.se.fc2", f"{nvae}.se.se.2")
        if up:
            self.module(f"{ours}.skip.conv", f"{nvae}.skip.1")

    def shift_cell(self, ours: str, nvae: str) -> None:
        self.module(f"{ours}.inp", f"{nvae}.conv.convz.0")
        self.module(f"{ours}.mid", f"{nvae}.conv.convz.2")
        self.module(f"{ours}.out", f"{nvae}.mu.conv_0")


def head_permutation(num_mix: int):
    """Row j of hvae's mixture head = row perm[j] of NVAE's.

    Both start with the M logits.  NVAE then has, per colour c, [means, log
    scales, coeffs] (M each); hvae has, per kind, the three colours (M each)."""
    import torch

    m = num_mix
    perm = list(range(m))
    for kind in range(3):
        for colour in range(3):
            start = m + colour * 3 * m + kind * m
            perm += range(start, start + m)
    return torch.tensor(perm)


def build_map(model) -> _Map:
    """Where each of ``model``'s state-dict entries lives in NVAE's (same config)."""
    cfg = model.config
    mp = _Map(model.state_dict().keys())
    S, gps, G = cfg.num_latent_scales, cfg.groups_per_scale(), model.num_groups  # gps coarsest first
    mp.module("stem", "stem")
    cells = cfg.num_preprocess_cells
    for k in range(cfg.num_preprocess_blocks * cells):
        mp.enc_cell(f"pre.{k}", f"pre_process.{k}", down=k % cells == cells - 1)
    # encoder tower, NVAE's order: finest scale first; per group its cells, then its combiner
    idx, flat = 0, 0
    for s, n in enumerate(gps[::-1]):
        for g in range(n):
            i = G - 1 - flat  # hvae's group index (top first)
            for c in range(cfg.num_cell_per_cond_enc):
                mp.enc_cell(f"enc_cells.{i}.{c}", f"enc_tower.{idx}", down=False)
                idx += 1
            if i > 0:
                mp.module(f"groups.{i}.enc_combiner.conv", f"enc_tower.{idx}.conv")
                idx += 1
            flat += 1
        if s < S - 1:
            mp.enc_cell(f"enc_down.{S - 2 - s}", f"enc_tower.{idx}", down=True)
            idx += 1
    mp.module("enc0.1", "enc0.1")
    # decoder tower: coarsest scale first; per group its cells, then its combiner
    idx, d = 0, 0
    for s, n in enumerate(gps):
        for _ in range(n):
            if d > 0:
                for c in range(cfg.num_cell_per_cond_dec):
                    mp.dec_cell(f"groups.{d}.dec_cells.{c}", f"dec_tower.{idx}", up=False)
                    idx += 1
                mp.module(f"groups.{d}.prior.1", f"dec_sampler.{d - 1}.1")
            mp.module(f"groups.{d}.combiner.conv", f"dec_tower.{idx}.conv")
            idx += 1
            mp.module(f"groups.{d}.posterior", f"enc_sampler.{d}")
            for f in range(cfg.num_nf):
                mp.shift_cell(f"groups.{d}.flow.cells.{2 * f}", f"nf_cells.{d * cfg.num_nf + f}.cell1")
                mp.shift_cell(f"groups.{d}.flow.cells.{2 * f + 1}", f"nf_cells.{d * cfg.num_nf + f}.cell2")
            d += 1
        if s < S - 1:
            mp.dec_cell(f"groups.{d}.up", f"dec_tower.{idx}", up=True)
            idx += 1
    cells = cfg.num_postprocess_cells
    for k in range(cfg.num_postprocess_blocks * cells):
        mp.dec_cell(f"post.{k}", f"post_process.{k}", up=k % cells == 0)
    perm = None if cfg.binary else head_permutation(cfg.num_mixture_dec)
    for leaf in ("weight", "bias", "log_weight_norm"):
        mp.tensor(f"head.1.{leaf}", [f"image_conditional.1.{leaf}"],
                  None if perm is None else (lambda t, p=perm: t[p]))
    mp.tensor("h0", ["prior_ftr0"], lambda t: t.unsqueeze(0))
    return mp


def drop_aliases(state_dict: dict[str, Any]) -> dict[str, Any]:
    """NVAE's ``X.weight_normalized`` entries: convs without weight norm register their
    weight a second time under that name.  Check each is ``X.weight`` and drop it."""
    import torch

    out = {}
    for key, value in state_dict.items():
        if key.endswith(".weight_normalized"):
            base = key[:-len("_normalized")]
            if base not in state_dict or not torch.equal(state_dict[base], value):
                raise NvaeImportError(f"NVAE entry {key!r} is not an alias of {base!r}")
            continue
        out[key] = value
    return out


def convert(nvae_state: dict[str, Any], model) -> dict[str, Any]:
    """hvae state dict for ``model`` from NVAE's; one line naming the first problem."""
    import torch

    source = drop_aliases(nvae_state)
    mp, used, out = build_map(model), set(), {}
    for key, target in model.state_dict().items():
        if key not in mp.entries:
            raise NvaeImportError(f"hvae's {key!r} has no counterpart in NVAE's layout")
        names, fn = mp.entries[key]
        absent = [n for n in names if n not in source]
        if absent:
            raise NvaeImportError(f"the NVAE checkpoint lacks {absent[0]!r} (needed for hvae's {key!r})")
        value = torch.cat([source[n] for n in names]) if len(names) > 1 else source[names[0]]
        value = fn(value) if fn is not None else value
        if value.shape != target.shape:
            raise NvaeImportError(f"NVAE's {names[0]!r} has shape {list(value.shape)} but hvae's {key!r} "
                                  f"needs {list(target.shape)}")
        out[key] = value.to(target.dtype).clone()
        used.update(names)
    extra = [k for k in source if k not in used]
    if extra:
        more = f" ({len(extra) - 1} more)" if len(extra) > 1 else ""
        raise NvaeImportError(f"the NVAE checkpoint has {extra[0]!r}{more}, which has no counterpart "
                              "in hvae's model for its args")
    return out


def import_checkpoint(path: str | Path, out: str | Path) -> dict[str, Any]:
    """Read NVAE's checkpoint at ``path`` and write the hvae checkpoint ``out``; returns a summary."""
    from hvae.checkpoint import save_checkpoint
    from hvae.model import NVAE

    state = read_nvae(path)
    check_arch(state)
    config = config_from_args(state["args"])
    model = NVAE(config)
    weights = convert(state["state_dict"], model)
    model.load_state_dict(weights)  # strict: every entry and shape already checked
    save_checkpoint(out, {"config": config.to_dict(), "model": weights, "ema": None, "step": 0,
                          "epoch": 0, "imported": {"from": "NVAE", "file": str(path),
                                                   "epoch": int(state.get("epoch", 0)),
                                                   "global_step": int(state.get("global_step", 0))}})
    return {"out": str(out), "dataset": config.dataset, "groups": model.num_groups,
            "num_nf": config.num_nf, "parameters": sum(p.numel() for p in model.parameters())}


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="checkpoint.pt written by NVAE's train.py")
    parser.add_argument("--out", required=True, help="hvae checkpoint to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out when it exists (default: refuse)")
    return parser.parse_args(argv)


@cli.entry_point(PROG)
def main(argv=None) -> int:
    args = parse_args(argv)
    out = cli.check_new_file(args.out, "--out", args.overwrite)
    if out.exists() and out.resolve() == Path(args.checkpoint).resolve():
        raise cli.UsageError(f"--out {args.out} is the NVAE checkpoint being imported; "
                             "give another path")
    import json

    print(json.dumps(import_checkpoint(args.checkpoint, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
