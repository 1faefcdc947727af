"""One explicit configuration for a run: architecture, data and training knobs.

Field names follow NVAE's ``train.py`` flags where NVAE has the knob, so its
commands carry over.  A ``Config`` holds plain Python values only, which keeps
checkpoints loadable with ``torch.load(weights_only=True)``.

    cfg = preset("cifar10", batch_size=16)
    cfg = Config.from_dict(cfg.to_dict())
    cfg = parse_args(["--preset", "mnist", "--num-channels-enc", "16"])
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

from hvae import cli
from hvae.errors import HvaeError

# "auto" (the default of the three performance fields) is resolved for the run's device
# by hvae.runtime.choose_fast_path: the fast path on CUDA, plain fp32 eager steps elsewhere.
AMP_MODES = ("auto", "none", "fp16", "bf16")
FLOW_TYPES = ("nvae", "affine")  # hvae.model.flows.make_flow
COMPILE_MODES = ("auto", "none", "regional", "full")  # see hvae/model/compile.py
CUDA_GRAPHS_MODES = ("auto", "true", "false")


class ConfigError(HvaeError, ValueError):
    """A configuration value that is unknown, of the wrong type or not allowed."""


@dataclass
class Config:
    # ---- run ---------------------------------------------------------------
    preset: str = "demo"
    name: str = ""              # run folder name; defaults to the preset name
    out: str = "runs"           # parent folder of run folders
    seed: int = 1
    deterministic: bool = False  # deterministic kernels (exact-resume tests)

    # ---- data --------------------------------------------------------------
    dataset: str = "mnist_subset"
    data: str = ""              # dataset location on disk (unused for mnist_subset)
    image_size: int = 28        # height = width of the stored images
    in_channels: int = 1
    pad_input: int = 2          # zero pixels added on each side inside the model
    binary: bool = True         # binarised data with a Bernoulli decoder
    num_x_bits: int = 8         # bits per colour value (DML decoder)
    num_workers: int = 0

    # ---- architecture ------------------------------------------------------
    num_channels_enc: int = 16
    num_channels_dec: int = 16
    num_latent_scales: int = 2
    num_groups_per_scale: int = 5
    num_latent_per_group: int = 20
    ada_groups: bool = True
    min_groups_per_scale: int = 1
    num_preprocess_blocks: int = 1
    num_preprocess_cells: int = 2
    num_postprocess_blocks: int = 1
    num_postprocess_cells: int = 2
    num_cell_per_cond_enc: int = 1
    num_cell_per_cond_dec: int = 1
    use_se: bool = True
    dec_cell_expand: int = 6    # channel expansion inside decoder-tower cells (NVAE: 6)
    post_cell_expand: int = 3   # ... inside post-processing cells (NVAE: 3)
    res_dist: bool = True
    num_nf: int = 0             # pairs of IAF cells (opposite orders) after each posterior sample
    flow_type: str = "nvae"     # "nvae": NVAE's shift cell (log-det 0); "affine": context-conditioned IAF
    num_mixture_dec: int = 10
    channels_last: bool = False

    # ---- optimisation ------------------------------------------------------
    batch_size: int = 64        # per process (per GPU) and per micro-batch
    # micro-batches per optimiser step: the global batch is
    # batch_size x grad_accum_steps x processes (BatchNorm statistics stay per micro-batch)
    grad_accum_steps: int = 1
    epochs: int = 400
    max_steps: int = 0          # stop after this many optimiser steps (0: no limit)
    learning_rate: float = 1e-2
    learning_rate_min: float = 1e-4
    warmup_epochs: float = 5.0
    weight_decay: float = 3e-4
    adamax_eps: float = 1e-3
    grad_clip: float = 200.0    # max gradient norm (0: off)
    grad_skip: bool = True      # skip updates with non-finite or outlying norms
    grad_skip_factor: float = 50.0  # skip when norm > factor * recent median norm
    ema_decay: float = 0.9999   # 0: no EMA

    # ---- self-healing (hvae/healing.py) ------------------------------------
    # when the weights become non-finite, updates stall (more than heal_skip_rate of
    # the last heal_window steps skipped) or the training loss stays above
    # heal_loss_limit times a uniform guess's NELBO for heal_window steps (0: that
    # check off), roll back to the last good
    # state and go on with the learning rate times heal_lr_factor; after heal_attempts
    # heals the run stops with an error instead
    heal: bool = True
    heal_attempts: int = 8
    heal_lr_factor: float = 0.5
    heal_skip_rate: float = 0.5
    heal_window: int = 50
    heal_loss_limit: float = 10.0
    # autocast: "bf16", "fp16" (with loss scaling), "none" (fp32); "auto": bf16 on a GPU
    # that has it, else fp16; fp32 off CUDA
    amp: str = "auto"
    sync_bn: bool = False
    # torch.compile of the training model: "none" (eager), "regional" (each repeated
    # cell / latent group compiled once and reused; the fast path on GPUs), "full"
    # (the whole forward, one graph; slow to compile); "auto": regional on CUDA, else
    # none.  See hvae/model/compile.py.
    compile: str = "auto"
    # recompute each residual cell and latent group in backward instead of keeping
    # its activations (torch.utils.checkpoint, non-reentrant): less memory, more time
    activation_checkpointing: bool = False
    # capture the whole training step (forward, backward, Adamax, EMA) in one CUDA graph
    # and replay it; the skip decision moves onto the device.  One GPU or several
    # (torchrun); the run says why when it falls back to eager steps.  See
    # hvae/graphed_step.py.  "auto": on CUDA, "true"/"false" otherwise forced.
    cuda_graphs: str = "auto"

    # ---- objective ---------------------------------------------------------
    kl_anneal_portion: float = 0.3
    kl_const_portion: float = 1e-4
    kl_const_coeff: float = 1e-4
    kl_beta: float = 1.0        # final KL weight (constant-beta ablations)
    kl_balance: bool = True
    kl_free_bits: float = 0.0   # nats per group below which the KL is not penalised
    kl_mc: bool = False         # Monte-Carlo KL even without flows
    weight_decay_norm: float = 1e-2      # lambda of the spectral + BN regulariser
    weight_decay_norm_init: float = 10.0
    weight_decay_norm_anneal: bool = False
    num_power_iter: int = 4

    # ---- logging, checkpoints, evaluation ---------------------------------
    log_every: int = 50          # steps between scalar logs
    eval_every: int = 1          # epochs between validation passes
    checkpoint_every: int = 500  # steps between periodic checkpoints
    num_iw_samples: int = 100    # importance samples of the end-of-training test NLL
    eval_batches: int = 0        # cap on test batches of in-training evaluations, final IW NLL included (0: all)

    # ---------------------------------------------------------------- helpers
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        cfg = cls()
        for key, value in values.items():
            _set_field(cfg, key, value)
        cfg.validate()
        return cfg

    @staticmethod
    def upgrade_saved(values: dict[str, Any]) -> dict[str, Any]:
        """A config dict from an older checkpoint, with the fields added since then
        set to what that checkpoint's model was: runs saved before ``flow_type``
        existed used the affine IAF."""
        values = dict(values)
        if "flow_type" not in values and values.get("num_nf", 0):
            values["flow_type"] = "affine"
        return values

    def replace(self, **overrides: Any) -> "Config":
        return Config.from_dict({**self.to_dict(), **overrides})

    @property
    def run_name(self) -> str:
        return self.name or self.preset

    @property
    def downsample_factor(self) -> int:
        """Total spatial reduction from the padded input to the coarsest latent scale."""
        return 2 ** (self.num_preprocess_blocks + self.num_latent_scales - 1)

    @property
    def padded_size(self) -> int:
        return self.image_size + 2 * self.pad_input

    def groups_per_scale(self) -> list[int]:
        """Latent groups per scale, coarsest (top) scale first.

        With ``ada_groups`` the finest scale keeps ``num_groups_per_scale`` and
        each coarser one has half as many, never fewer than ``min_groups_per_scale``.
        """
        groups, n = [], self.num_groups_per_scale
        for _ in range(self.num_latent_scales):
            groups.append(n)
            if self.ada_groups:
                n = max(self.min_groups_per_scale, n // 2)
        return groups[::-1]

    def validate(self) -> "Config":
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

        for f in fields(self):  # inf / nan would pass the range checks below, or fail them confusingly
            if isinstance(getattr(self, f.name), float):
                need(math.isfinite(getattr(self, f.name)), f.name, "a finite number")
        need(self.name not in (".", "..") and not any(c in self.name for c in "/\\\0"), "name",
             "one folder name (no '/', not '..'): the run folder inside --out")
        need(0 <= self.seed < 2**32, "seed", "an integer from 0 to 4294967295")
        from hvae.data import DATASETS  # the registered datasets (hvae.data.register_dataset)
        need(self.dataset in DATASETS, "dataset", f"one of {', '.join(DATASETS)}")
        need(self.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}")
        need(self.flow_type in FLOW_TYPES, "flow_type", f"one of {', '.join(FLOW_TYPES)}")
        need(self.compile in COMPILE_MODES, "compile", f"one of {', '.join(COMPILE_MODES)}")
        need(self.cuda_graphs in CUDA_GRAPHS_MODES, "cuda_graphs",
             f"one of {', '.join(CUDA_GRAPHS_MODES)}")
        need(1 <= self.num_x_bits <= 8, "num_x_bits", "an integer from 1 to 8")
        need(self.in_channels in (1, 3), "in_channels", "1 or 3")
        need(not (self.binary and self.in_channels != 1), "binary",
             "binary (Bernoulli) data needs in_channels=1")
        positive = ["num_channels_enc", "num_channels_dec", "num_latent_scales",
                    "num_groups_per_scale", "num_latent_per_group", "min_groups_per_scale",
                    "num_cell_per_cond_enc", "num_cell_per_cond_dec", "num_mixture_dec",
                    "dec_cell_expand", "post_cell_expand",
                    "batch_size", "grad_accum_steps", "epochs", "image_size", "log_every", "eval_every",
                    "checkpoint_every", "num_iw_samples", "num_power_iter", "heal_window"]
        for name in positive:
            need(getattr(self, name) >= 1, name, "a positive integer")
        non_negative = ["num_preprocess_blocks", "num_preprocess_cells",
                        "num_postprocess_blocks", "num_postprocess_cells", "num_nf",
                        "max_steps", "pad_input", "num_workers", "eval_batches",
                        "warmup_epochs", "weight_decay", "grad_clip", "kl_free_bits",
                        "weight_decay_norm", "weight_decay_norm_init", "kl_beta",
                        "kl_anneal_portion", "kl_const_portion", "kl_const_coeff",
                        "heal_attempts", "heal_loss_limit"]
        for name in non_negative:
            need(getattr(self, name) >= 0, name, "a value >= 0")
        need(self.num_preprocess_cells >= 1 or self.num_preprocess_blocks == 0,
             "num_preprocess_cells", "at least 1 when there are pre-processing blocks")
        need(self.num_postprocess_cells >= 1 or self.num_postprocess_blocks == 0,
             "num_postprocess_cells", "at least 1 when there are post-processing blocks")
        need(self.learning_rate > 0, "learning_rate", "a value > 0")
        need(0 <= self.learning_rate_min <= self.learning_rate, "learning_rate_min",
             "a value between 0 and learning_rate")
        need(0 <= self.ema_decay < 1, "ema_decay", "a value in [0, 1)")
        need(self.adamax_eps > 0, "adamax_eps", "a value > 0")
        need(self.grad_skip_factor > 1, "grad_skip_factor", "a value > 1")
        need(0 < self.heal_lr_factor < 1, "heal_lr_factor", "a value in (0, 1)")
        need(0 < self.heal_skip_rate <= 1, "heal_skip_rate", "a value in (0, 1]")
        need(self.kl_anneal_portion + self.kl_const_portion <= 1, "kl_anneal_portion",
             "kl_anneal_portion + kl_const_portion <= 1")
        need(self.num_postprocess_blocks == self.num_preprocess_blocks, "num_postprocess_blocks",
             "equal to num_preprocess_blocks (each post-processing block undoes one "
             "pre-processing down-sampling)")
        need(not (self.activation_checkpointing and self.sync_bn), "activation_checkpointing",
             "not with sync_bn (a recomputed SyncBatchNorm would update its statistics twice)")
        factor = self.downsample_factor
        need(self.padded_size % factor == 0, "image_size",
             f"image_size + 2*pad_input ({self.padded_size}) must be divisible by "
             f"{factor} = 2**(num_preprocess_blocks + num_latent_scales - 1)")
        return self


_FIELDS = {f.name: f for f in fields(Config)}


def _set_field(cfg: Config, key: str, value: Any) -> None:
    name = key.replace("-", "_")
    if name not in _FIELDS:
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config field {key!r}{hint}")
    setattr(cfg, name, _coerce(name, value))


def _coerce(name: str, value: Any) -> Any:
    kind = type(getattr(Config(), name))
    if name == "cuda_graphs" and not isinstance(value, str):  # a bool: true or false
        value = _coerce_bool(name, value)
    if name == "cuda_graphs":
        text = str(value).strip().lower()
        return {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false",
                "off": "false"}.get(text, text)
    if kind is bool:
        return _coerce_bool(name, value)
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not allowed: expected {kind.__name__}") from None


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not allowed: true or false")


# Presets: the NVAE paper recipes (DESIGN.md table) and a small CPU demo.  Each
# recipe names the recipe it inherits from and only the fields it changes.
_RECIPES: dict[str, tuple[str | None, dict[str, Any]]] = {
    # A small NVAE for the bundled 4,000-digit MNIST subset: training and its K=20
    # test pass in under 10 minutes on 2 AVX2 CPU cores (the search is in
    # docs/DEMO_PRESET.md).  Where the CPU time goes: no padding (latents 7x7 and
    # 14x14), half NVAE's cell expansions, and a short, hot schedule (4 epochs of
    # batch 32 at learning rate 4e-2) instead of a long one.
    "demo": (None, dict(
        dataset="mnist_subset", image_size=28, in_channels=1, pad_input=0, binary=True,
        num_channels_enc=16, num_channels_dec=16, num_latent_scales=2,
        num_groups_per_scale=5, ada_groups=True, num_latent_per_group=20,
        num_preprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_blocks=1, num_postprocess_cells=2,
        num_cell_per_cond_enc=1, num_cell_per_cond_dec=1, num_nf=0,
        dec_cell_expand=3, post_cell_expand=2,
        channels_last=True, batch_size=32, epochs=4, learning_rate=4e-2, warmup_epochs=0.5,
        ema_decay=0.99, weight_decay_norm=1e-2, kl_anneal_portion=0.3,
        num_iw_samples=20, log_every=10, checkpoint_every=200)),
    # What every paper recipe shares (NVAE's README commands).
    "_paper": (None, dict(
        num_latent_per_group=20, num_cell_per_cond_enc=2, num_cell_per_cond_dec=2,
        use_se=True, res_dist=True, num_mixture_dec=10,
        num_preprocess_blocks=1, num_preprocess_cells=2,
        num_postprocess_blocks=1, num_postprocess_cells=2,
        learning_rate=1e-2, weight_decay_norm=1e-2, num_iw_samples=100)),
    "mnist": ("_paper", dict(
        dataset="mnist", image_size=28, in_channels=1, pad_input=2, binary=True,
        num_channels_enc=32, num_channels_dec=32, num_latent_scales=2,
        num_groups_per_scale=10, ada_groups=True, num_nf=0,
        num_preprocess_blocks=2, num_preprocess_cells=3,
        num_postprocess_blocks=2, num_postprocess_cells=3, batch_size=200, epochs=400)),
    "cifar10": ("_paper", dict(
        dataset="cifar10", image_size=32, in_channels=3, pad_input=0, binary=False,
        num_x_bits=8, num_channels_enc=128, num_channels_dec=128, num_latent_scales=1,
        num_groups_per_scale=30, ada_groups=False, num_nf=1, batch_size=32, epochs=400)),
    "celeba64": ("cifar10", dict(
        dataset="celeba64", image_size=64, num_channels_enc=64, num_channels_dec=64,
        num_latent_scales=3, num_groups_per_scale=20, ada_groups=True,
        weight_decay_norm=1e-1, batch_size=16, epochs=90)),
    "imagenet32": ("cifar10", dict(
        dataset="imagenet32", num_channels_enc=192, num_channels_dec=192,
        num_groups_per_scale=28, weight_decay_norm_init=1.0, weight_decay_norm_anneal=True,
        batch_size=24, epochs=45)),
    "celebahq256": ("cifar10", dict(
        dataset="celebahq256", image_size=256, num_x_bits=5, num_channels_enc=30,
        num_channels_dec=30, num_latent_scales=5, num_groups_per_scale=16, ada_groups=True,
        min_groups_per_scale=4, num_nf=2, weight_decay_norm_init=1.0,
        weight_decay_norm_anneal=True, batch_size=4, epochs=300)),
    "ffhq256": ("celebahq256", dict(
        dataset="ffhq256", weight_decay_norm=1e-1, learning_rate=8e-3, epochs=200)),
}


def _resolve(name: str) -> dict[str, Any]:
    parent, fields_ = _RECIPES[name]
    return {**(_resolve(parent) if parent else {}), **fields_}


PRESETS: dict[str, dict[str, Any]] = {name: _resolve(name) for name in _RECIPES
                                      if not name.startswith("_")}


def preset(name: str, /, **overrides: Any) -> Config:
    """The named recipe with ``overrides`` applied and validated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}: one of {', '.join(PRESETS)}")
    return Config.from_dict({**PRESETS[name], "preset": name, **overrides})


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--preset`` and one flag per Config field (dashes or underscores)."""
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the base recipe (default: demo)")
    group = parser.add_argument_group("config overrides (default: the preset's value)")
    for f in fields(Config):
        if f.name == "preset":
            continue
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        group.add_argument(*flags, dest=f"cfg_{f.name}", default=None, metavar=type(f.default).__name__.upper(),
                           help=f"default {f.default!r}")
    return parser


def explicit_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line (as typed; unset flags are absent)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the Config from parsed ``add_config_args`` flags (unset flags keep the preset)."""
    return preset(args.preset or "demo", **explicit_overrides(args))


# The fields that define the model (and the shape of the data it reads).
ARCHITECTURE = (
    "in_channels", "image_size", "pad_input", "binary", "num_x_bits", "num_channels_enc",
    "num_channels_dec", "num_latent_scales", "num_groups_per_scale", "num_latent_per_group",
    "ada_groups", "min_groups_per_scale", "num_preprocess_blocks", "num_preprocess_cells",
    "num_postprocess_blocks", "num_postprocess_cells", "num_cell_per_cond_enc",
    "num_cell_per_cond_dec", "use_se", "dec_cell_expand", "post_cell_expand", "res_dist",
    "num_nf", "flow_type", "num_mixture_dec")
# What ``train.py --resume`` may change.  How the run runs (not what it computes) ...
RESUME_HOW = ("name", "out", "data", "num_workers", "log_every", "eval_every", "checkpoint_every",
              "eval_batches", "num_iw_samples", "amp", "sync_bn", "compile", "cuda_graphs",
              "activation_checkpointing", "channels_last", "deterministic", "heal", "heal_attempts",
              "heal_lr_factor", "heal_skip_rate", "heal_window", "heal_loss_limit")
# ... and its length; the schedules are then recomputed for the new length (so the
# continued run is not the uninterrupted one).  The rest of the recipe stays.
RESUME_LENGTH = ("epochs", "max_steps", "batch_size", "grad_accum_steps")


def resume_config(saved: dict[str, Any], explicit: dict[str, Any], preset_name: str | None,
                  path: str, imported: bool = False) -> Config:
    """The config of a resumed run: the checkpoint's, with the flags given now.

    A flag may change only what ``RESUME_HOW`` and ``RESUME_LENGTH`` list; from imported
    weights (a fresh optimiser at step 0) anything but the architecture.  Any other
    flag that differs from the checkpoint's value is an error naming both values."""
    old = Config.from_dict(saved)
    new = Config.from_dict({**saved, **explicit})
    differ = [k for k in explicit if getattr(old, k) != getattr(new, k)]
    if preset_name is not None and preset_name != old.preset:
        differ.insert(0, "preset")
        new.preset = preset_name
    if imported:
        refused = [k for k in differ if k in ARCHITECTURE or k == "preset"]
    else:
        refused = [k for k in differ if k not in RESUME_HOW + RESUME_LENGTH]
    if refused:
        shown = ", ".join(f"{k} (checkpoint {getattr(old, k)!r}, now {getattr(new, k)!r})"
                          for k in refused)
        raise ConfigError(
            f"--resume {path}: the flags differ from the checkpoint's config in {shown}; "
            + ("imported weights keep their architecture" if imported else
               "a resumed run keeps its recipe and may change only its length (--epochs, "
               "--max_steps, --batch_size, --grad_accum_steps) and how it runs (--data, "
               "--amp, --num_workers, --name, ...)")
            + ": drop those flags, or start a new run")
    new.preset = old.preset
    return new


# Fields only a real training run reads (its data, length, run folder, logs and
# evaluations): a tool that times or checks steps on synthetic data ignores them.
RUN_ONLY = ("data", "dataset", "num_workers", "epochs", "max_steps", "name", "out", "log_every",
            "eval_every", "checkpoint_every", "num_iw_samples", "eval_batches", "heal",
            "heal_attempts", "heal_lr_factor", "heal_skip_rate", "heal_window", "heal_loss_limit")


def inert_fields(config: Config) -> dict[str, str]:
    """Fields whose value changes nothing in ``config``, with the reason."""
    why = {}
    if config.dataset == "mnist_subset":
        why["data"] = "the bundled dataset 'mnist_subset' reads no files"
    if not config.num_nf:
        why["flow_type"] = "there are no flows (--num_nf 0)"
    if not config.ada_groups:
        why["min_groups_per_scale"] = "it applies with --ada_groups true"
    if config.binary:
        why["num_x_bits"] = why["num_mixture_dec"] = "binary data has a Bernoulli decoder"
    if not config.grad_skip:
        why["grad_skip_factor"] = "gradient skipping is off (--grad_skip false)"
    if not config.heal:
        for name in ("heal_attempts", "heal_lr_factor", "heal_skip_rate", "heal_window",
                     "heal_loss_limit"):
            why[name] = "self-healing is off (--heal false)"
    if not config.weight_decay_norm_anneal:
        why["weight_decay_norm_init"] = "it applies with --weight_decay_norm_anneal true"
    if config.compile == "full":
        why["activation_checkpointing"] = "with --compile full the compiler decides what to recompute"
    return why


def check_flags_matter(config: Config, explicit: dict[str, Any], base: Config,
                       unused: dict[str, str] | None = None) -> None:
    """Refuse a flag that would do nothing: one that sets an inert field (``inert_fields``)
    to a value other than ``base``'s (the preset's, or the checkpoint's), or one in
    ``unused`` (field -> why this program ignores it)."""
    for name in explicit:
        if unused and name in unused:
            raise ConfigError(f"--{name} is not used: {unused[name]}")
        why = inert_fields(config).get(name)
        if why and getattr(config, name) != getattr(base, name):
            raise ConfigError(f"--{name} {explicit[name]} does nothing: {why}")


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
               ) -> tuple[Config, argparse.Namespace]:
    """Parse a command line into (Config, namespace).  ``parser`` (default: a new one)
    is an ``hvae.cli.ArgumentParser``: flags are spelt in full, typos exit with a
    'did you mean'."""
    parser = add_config_args(parser or cli.ArgumentParser())
    if not isinstance(parser, cli.ArgumentParser):
        raise TypeError("parse_args needs an hvae.cli.ArgumentParser (flags spelt in full)")
    args = parser.parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as err:
        parser.error(str(err))
