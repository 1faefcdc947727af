"""Config: the paper presets, plain-dict round trips, and errors that name the field."""
from __future__ import annotations

import json

import pytest
import torch

from hvae.config import PRESETS, Config, ConfigError, parse_args, preset

# DESIGN.md's table: channels, scales, groups, ada, latents, pre/post blocks x cells,
# cells per conditional, flows, lambda, batch per GPU, epochs.
PAPER = {
    "mnist": (32, 2, 10, True, 20, 2, 3, 2, 0, 1e-2, 200, 400),
    "cifar10": (128, 1, 30, False, 20, 1, 2, 2, 1, 1e-2, 32, 400),
    "celeba64": (64, 3, 20, True, 20, 1, 2, 2, 1, 1e-1, 16, 90),
    "imagenet32": (192, 1, 28, False, 20, 1, 2, 2, 1, 1e-2, 24, 45),
    "celebahq256": (30, 5, 16, True, 20, 1, 2, 2, 2, 1e-2, 4, 300),
    "ffhq256": (30, 5, 16, True, 20, 1, 2, 2, 2, 1e-1, 4, 200),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_reproduce_the_paper_table(name):
    c = preset(name)
    ch, scales, groups, ada, latents, blocks, cells, per_cond, nf, lam, batch, epochs = PAPER[name]
    assert (c.num_channels_enc, c.num_channels_dec) == (ch, ch)
    assert (c.num_latent_scales, c.num_groups_per_scale, c.ada_groups) == (scales, groups, ada)
    assert c.num_latent_per_group == latents
    assert (c.num_preprocess_blocks, c.num_preprocess_cells) == (blocks, cells)
    assert (c.num_postprocess_blocks, c.num_postprocess_cells) == (blocks, cells)
    assert (c.num_cell_per_cond_enc, c.num_cell_per_cond_dec) == (per_cond, per_cond)
    assert c.num_nf == nf and c.weight_decay_norm == lam
    assert (c.batch_size, c.epochs) == (batch, epochs)
    assert c.learning_rate == (8e-3 if name == "ffhq256" else 1e-2)
    assert (c.weight_decay, c.adamax_eps, c.learning_rate_min) == (3e-4, 1e-3, 1e-4)


def test_group_counts_and_bit_depths():
    assert preset("mnist").groups_per_scale() == [5, 10]          # coarsest scale first
    assert preset("celeba64").groups_per_scale() == [5, 10, 20]
    assert preset("celebahq256").groups_per_scale() == [4, 4, 4, 8, 16]  # min 4 per scale
    assert preset("cifar10").groups_per_scale() == [30]
    assert preset("celebahq256").num_x_bits == preset("ffhq256").num_x_bits == 5
    assert preset("cifar10").num_x_bits == 8 and preset("mnist").binary
    for name in ("imagenet32", "celebahq256", "ffhq256"):   # lambda annealed from 1
        c = preset(name)
        assert c.weight_decay_norm_anneal and c.weight_decay_norm_init == 1.0


def test_round_trip_through_plain_types_and_weights_only_load(tmp_path):
    for name in PRESETS:
        c = preset(name, batch_size=7)
        d = c.to_dict()
        json.dumps(d)  # plain types only
        torch.save({"config": d}, tmp_path / "c.pt")
        loaded = torch.load(tmp_path / "c.pt", weights_only=True)["config"]
        assert Config.from_dict(loaded) == c


def test_flow_type_defaults_to_nvae_and_older_saved_configs_keep_the_affine_iaf(tmp_path):
    from hvae.checkpoint import load_checkpoint, save_checkpoint

    assert preset("cifar10").flow_type == "nvae"
    assert Config.from_dict(preset("cifar10", flow_type="affine").to_dict()).flow_type == "affine"
    old = preset("cifar10").to_dict()
    del old["flow_type"]  # a checkpoint written before flow_type existed
    save_checkpoint(tmp_path / "old.pt", {"config": old, "model": {}})
    assert load_checkpoint(tmp_path / "old.pt")["config"]["flow_type"] == "affine"
    no_flows = {k: v for k, v in preset("demo").to_dict().items() if k != "flow_type"}
    assert Config.from_dict(Config.upgrade_saved(no_flows)).flow_type == "nvae"  # nothing to keep


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"num_chanels_enc.*did you mean 'num_channels_enc'"):
        preset("demo", num_chanels_enc=3)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("cifar100")


@pytest.mark.parametrize("field, value, needle", [
    ("num_x_bits", 9, "1 to 8"), ("num_x_bits", 0, "1 to 8"),
    ("num_groups_per_scale", -1, "positive"), ("num_channels_enc", 0, "positive"),
    ("image_size", 30, "divisible"), ("dataset", "svhn", "one of"), ("amp", "fp8", "one of"),
    ("learning_rate_min", 1.0, "between"), ("ema_decay", 1.0, r"\[0, 1\)"),
    ("num_postprocess_blocks", 2, "num_preprocess_blocks"),
    ("batch_size", "many", "expected int"), ("use_se", "maybe", "true or false"),
    ("flow_type", "afine", "nvae, affine"),
])
def test_invalid_values_name_the_field(field, value, needle):
    with pytest.raises(ConfigError, match=field) as err:
        preset("demo", **{field: value})
    assert err.match(needle)


def test_command_line_overrides_with_dashes_or_underscores():
    c, _ = parse_args(["--preset", "cifar10", "--num-channels-enc", "64", "--num_nf", "0",
                       "--use_se", "false", "--learning-rate", "3e-3"])
    assert (c.preset, c.num_channels_enc, c.num_nf, c.use_se) == ("cifar10", 64, 0, False)
    assert c.learning_rate == 3e-3 and c.num_channels_dec == 128  # the rest from the preset
    default, _ = parse_args([])
    assert default == preset("demo")


def test_every_field_is_a_flag():
    for name, value in Config().to_dict().items():
        if name == "preset":
            continue
        flag = f"--{name.replace('_', '-')}"
        c, _ = parse_args([flag, str(value)])
        assert getattr(c, name) == getattr(preset("demo"), name) or getattr(c, name) == value


def test_command_line_typo_exits_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--num_chanels_enc", "8"])
    assert exit_info.value.code == 2
    assert "did you mean --num_channels_enc" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--num_x_bits", "9"])
    assert "num_x_bits" in capsys.readouterr().err
    # a prefix is not the flag: argparse's abbreviations would take it silently
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--eval_batche", "5", "--learning-rate-m", "0.001"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert ("--eval_batche (did you mean --eval_batches?), "
            "--learning-rate-m (did you mean --learning_rate_min?)") in err


def test_auto_performance_fields_take_the_fast_path_on_cuda_only(monkeypatch):
    """"auto" (the default) is bf16 + regional compile + the captured step on a CUDA GPU
    with bf16, fp16 on one without, and plain fp32 eager steps off CUDA; set values stay."""
    import torch
    import torch.utils._triton
    from hvae.runtime import choose_fast_path
    cfg = preset("cifar10")
    assert (cfg.amp, cfg.compile, cfg.cuda_graphs) == ("auto", "auto", "auto")
    fields = lambda c: (c.amp, c.compile, c.cuda_graphs)  # noqa: E731
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    chosen, line = choose_fast_path(cfg, cuda)
    assert fields(chosen) == ("bf16", "regional", "true")
    assert line.startswith("cuda: --amp auto -> bf16 (") and "--cuda_graphs auto -> true" in line
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert fields(choose_fast_path(cfg, cuda)[0]) == ("fp16", "regional", "true")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert fields(choose_fast_path(cfg, cuda)[0]) == ("fp16", "none", "true")
    assert fields(choose_fast_path(cfg, torch.device("cpu"))[0]) == ("none", "none", "false")
    fixed = cfg.replace(amp="none", compile="full", cuda_graphs=False)
    assert fields(choose_fast_path(fixed, cuda)[0]) == ("none", "full", "false")
    assert cfg.replace(cuda_graphs=True).cuda_graphs == "true"  # booleans of older checkpoints
    with pytest.raises(ConfigError, match="cuda_graphs='maybe'"):
        cfg.replace(cuda_graphs="maybe")
