"""Bad input ends every command with ONE line on stderr, ``prog: error: ...``, exit code 2,
and no traceback (issue #14).

Most cases call the entry points' ``main(argv)`` in this process (the same code path as
``python train.py ...``, without paying a torch import per case); ``test_end_to_end``
runs a few of them as real subprocesses.  Every case also names a piece of text the
message must contain, so that it stays specific (the flag or field, or the file).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # train.py and evaluate.py live at the repo root

import evaluate as evaluate_cli  # noqa: E402
import train as train_cli  # noqa: E402

torch.set_num_threads(2)

TINY = dict(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2,
            num_latent_per_group=4, num_preprocess_cells=1, num_postprocess_cells=1,
            batch_size=16, num_iw_samples=1, eval_batches=1, ema_decay=0.0,
            warmup_epochs=0.0, checkpoint_every=1, weight_decay_norm=0.0)  # no spectral: fast


@functools.cache
def load_script(name: str):
    """scripts/NAME.py (or tools/NAME.py) as module NAME (registered, so a worker pool can pickle its functions)."""
    path = ROOT / "scripts" / f"{name}.py"
    if not path.exists():  # the development tools
        path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_pngs(folder: Path, names, size=28) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / name)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the cases point at: one tiny checkpoint trained for 2 steps, broken
    copies of it, latents files, image folders with a corrupt image, plain files."""
    from hvae.checkpoint import load_checkpoint, load_model, save_checkpoint
    from hvae.config import preset
    from hvae.data import LMDB_LENGTH_KEY, lmdb_key, open_lmdb
    from hvae.training import train

    tmp = tmp_path_factory.mktemp("bad_input")
    config = preset("demo", out=str(tmp / "runs"), name="tiny", max_steps=2, **TINY)
    train(config, progress=False)
    ckpt = tmp / "runs" / "tiny" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    mismatch = tmp / "mismatch.pt"  # config says 16 channels, the weights have 8
    save_checkpoint(mismatch, {**{k: v for k, v in state.items() if k != "format"},
                               "config": {**state["config"], "num_channels_enc": 16}})
    corrupt = tmp / "corrupt.pt"
    corrupt.write_bytes(ckpt.read_bytes()[:2000])
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder\n")
    (tmp / "empty").mkdir()
    (tmp / "eval_out").mkdir()
    (tmp / "eval_out" / "samples_t0.7.png").write_bytes(b"an earlier result")

    shapes = load_model(ckpt)[0].latent_shapes  # [(4, 8, 8), (4, 16, 16), (4, 16, 16)]
    z = [np.zeros((2, *s), np.float32) for s in shapes]
    latents = {
        "wrong_keys": dict(foo=z[0]),
        "wrong_shape": dict(group_00=np.zeros((2, 4, 9, 9), np.float32)),
        "too_many": {f"group_{g:02d}": z[g % 3] for g in range(4)},
        "mixed_n": dict(group_00=z[0], group_01=np.zeros((3, *shapes[1]), np.float32)),
        "nan": dict(group_00=np.full_like(z[0], np.nan)),
        "empty": dict(group_00=z[0][:0]),
        "ints": dict(group_00=z[0].astype(np.int64)),
    }
    for name, arrays in latents.items():
        np.savez(tmp / f"{name}.npz", **arrays)
    (tmp / "not_npz.npz").write_text("these are not latents\n")

    # Image folders: make_lmdb sources, and folder datasets for train.py.
    names = [f"{i:03d}.png" for i in range(20)]
    write_pngs(tmp / "images", names)
    write_pngs(tmp / "bad_images", names)
    (tmp / "bad_images" / "005.png").write_bytes(b"\x89PNG truncated")
    write_pngs(tmp / "bad_test_image", names)
    (tmp / "bad_test_image" / "019.png").write_bytes(b"\x89PNG truncated")  # the last: test
    for split in ("train", "test"):
        write_pngs(tmp / "bad_first" / split, names)
        write_pngs(tmp / "bad_later" / split, names)
    (tmp / "bad_first" / "test" / "000.png").write_bytes(b"not an image")
    (tmp / "bad_later" / "test" / "003.png").write_bytes(b"not an image")
    (tmp / "bad_cifar" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp / "bad_cifar" / "cifar-10-batches-py" / name).write_bytes(b"truncated")
    for split in ("train", "test"):
        (tmp / "bad_lmdb" / split).mkdir(parents=True)
        env = open_lmdb(tmp / "bad_lmdb" / split, write=True, map_size=1 << 24)
        with env.begin(write=True) as txn:
            txn.put(lmdb_key(0), b"\x89PNG truncated")
            txn.put(LMDB_LENGTH_KEY, b"1")
        env.close()
    write_pngs(tmp / "lmdb_done", names[:4])
    load_script("make_lmdb").main(["--src", str(tmp / "lmdb_done"), "--dst", str(tmp / "lmdb_done_out"),
                                   "--test-fraction", "0.5"])
    return {"tmp": tmp, "ckpt": ckpt, "mismatch": mismatch, "corrupt": corrupt,
            "file": a_file, "empty": tmp / "empty", "runs": tmp / "runs",
            "eval_out": tmp / "eval_out"}


# ------------------------------------------------------------------ the cases
# (argv, text the one-line message must contain); {name} is a path from `files`.
TRAIN = [
    # config values
    ("--warmup_epochs inf", "warmup_epochs=inf"),
    ("--learning_rate nan", "learning_rate=nan"),
    ("--kl_beta=-inf", "kl_beta=-inf"),
    ("--epochs 0", "epochs=0"),
    ("--batch_size 0", "batch_size=0"),
    ("--batch_size abc", "batch_size='abc'"),
    ("--num_x_bits 9", "num_x_bits=9"),
    ("--amp fp8", "amp='fp8'"),
    ("--flow_type afine", "flow_type='afine'"),
    ("--compile fast", "compile='fast'"),
    ("--in_channels 3", "binary"),
    ("--ema_decay 1", "ema_decay=1.0"),
    ("--max_steps -1", "max_steps=-1"),
    ("--channels_last maybe", "channels_last='maybe'"),
    ("--kl_anneal_portion 0.8 --kl_const_portion 0.5", "kl_anneal_portion"),
    ("--grad_accum_steps 0", "grad_accum_steps=0"),
    ("--grad_accum_steps -2", "grad_accum_steps=-2"),
    ("--grad_accum_steps 1.5", "grad_accum_steps='1.5'"),
    ("--grad_accum_steps 100000", "grad_accum_steps=100000 needs at least"),
    ("--activation_checkpointing maybe", "activation_checkpointing='maybe'"),
    ("--image_size 30", "image_size"),
    ("--num_chanels_enc 8", "did you mean --num_channels_enc"),
    # a prefix of a flag is a typo, not the flag (argparse's abbreviations are off)
    ("--eval_batche 5", "unknown option: --eval_batche (did you mean --eval_batches?)"),
    ("--eval-batche=5", "--eval-batche (did you mean --eval_batches?)"),
    ("--learning_rate_m 0.001 --eval_batche 5",
     "--learning_rate_m (did you mean --learning_rate_min?), --eval_batche"),
    ("--num_latent 4", "did you mean --num_latent_scales or --num_latent_per_group?"),
    ("--resum", "did you mean --resume?"),
    ("--no-prog", "did you mean --no-progress?"),
    ("--max_steps 2 extra", "unrecognized arguments: extra"),
    ("--preset nope", "--preset"),
    ("--seed -1", "seed=-1"),
    ("--seed 18446744073709551616", "seed=18446744073709551616"),
    # the run folder stays inside --out
    ("--name ../../escaped", "name='../../escaped'"),
    ("--name a/b", "name='a/b'"),
    ("--name ..", "name='..'"),
    # devices and output folders
    ("--device foo", "'foo' is not a device"),
    ("--device meta", "'meta' is not supported"),
    ("--device cuda:99", "'cuda:99'"),
    ("--out {file}", "is a file"),
    ("--out {tmp} --name a_file.txt", "is an existing file"),
    # data
    ("--dataset mnist --data /nonexistent", "--data /nonexistent"),
    ("--dataset cifar10", "needs --data DIR"),
    ("--dataset folder --data {empty}", "no usable data"),
    ("--dataset folder --data {tmp}/bad_first --batch_size 8", "000.png"),
    ("--dataset folder --data {tmp}/bad_later --batch_size 8 --num_workers 1", "003.png"),
    ("--dataset cifar10 --data {tmp}/bad_cifar", "data_batch_1"),
    ("--dataset lmdb --data {tmp}/bad_lmdb --binary false", "train key 00000000"),
    ("--batch_size 100000", "smaller than one batch"),
    ("--image_size 32 --pad_input 0", "image_size=32"),
    # checkpoints
    ("--resume {tmp}/missing.pt", "does not exist"),
    ("--resume {corrupt}", "corrupt"),
    ("--resume --out {empty}", "does not exist"),
    ("--resume {ckpt} --num_channels_enc 16",
     "num_channels_enc (checkpoint 8, now 16)"),
    # every flag is honoured or refused: a resumed run keeps its recipe ...
    ("--resume {ckpt} --preset mnist --data {empty}", "preset (checkpoint 'demo', now 'mnist')"),
    ("--resume {ckpt} --learning_rate 0.5", "learning_rate (checkpoint 0.04, now 0.5)"),
    ("--resume {ckpt} --res_dist false", "res_dist (checkpoint True, now False)"),
    ("--resume {ckpt} --seed 7 --kl_beta 2", "seed (checkpoint 1, now 7), kl_beta"),
    ("--resume {ckpt} --dataset mnist --data {empty}", "dataset (checkpoint 'mnist_subset'"),
    ("--resume {ckpt} --batch_size 48", "not a whole number of batches of --batch_size 48"),
    # ... and a flag that would do nothing is refused
    ("--resume {ckpt} --data {empty}", "--data {empty} does nothing: the bundled"),
    ("--data {empty}", "does nothing: the bundled dataset 'mnist_subset' reads no files"),
    ("--flow_type affine", "--flow_type affine does nothing: there are no flows"),
    ("--ada_groups false --min_groups_per_scale 2", "--min_groups_per_scale 2 does nothing"),
    ("--grad_skip false --grad_skip_factor 10", "--grad_skip_factor 10 does nothing"),
    ("--num_mixture_dec 5", "Bernoulli"),
    ("--compile full --activation_checkpointing true", "--activation_checkpointing true does nothing"),
    ("--overwrite maybe", "argument --overwrite: 'maybe'"),
    ("--overwrite --resume {ckpt}", "--overwrite starts a new run and --resume continues one"),
]
EVALUATE = [
    ("--checkpoint {ckpt} --mode sample --temp abc", "temperature 'abc'"),
    ("--checkpoint {ckpt} --mode sample --temp nan", "temperature 'nan'"),
    ("--checkpoint {ckpt} --mode sample --temp inf", "temperature 'inf'"),
    ("--checkpoint {ckpt} --mode sample --temp -1", "temperature '-1'"),
    ("--checkpoint {ckpt} --mode sample --temp 1,-0.5,1", "temperature '-0.5'"),
    ("--checkpoint {ckpt} --mode sample --temp ,", "has no value"),
    ("--checkpoint {ckpt} --mode sample --temp 1,1", "latent groups"),
    ("--checkpoint {ckpt} --mode sample --num 0", "--num 0"),
    ("--checkpoint {ckpt} --mode recon --num 0", "--num 0"),
    ("--checkpoint {ckpt} --mode fid --num 1", "--num 1"),
    ("--checkpoint {ckpt} --mode nll --num -3", "argument --num"),
    ("--checkpoint {ckpt} --mode sample --num abc", "argument --num"),
    ("--checkpoint {ckpt} --mode sample --nrow 0", "argument --nrow"),
    ("--checkpoint {ckpt} --mode nll --num-iw-samples -3", "argument --num-iw-samples"),
    ("--checkpoint {ckpt} --mode nll --num-iw-samples 0", "argument --num-iw-samples"),
    ("--checkpoint {ckpt} --mode nll --batch-size 0", "argument --batch-size"),
    ("--checkpoint {ckpt} --mode nll --iw-chunk 0", "argument --iw-chunk"),
    ("--checkpoint {ckpt} --mode sample --readjust-bn --readjust-bn-batches 0",
     "argument --readjust-bn-batches"),
    ("--checkpoint {ckpt} --mode recon --readjust-bn", "--readjust-bn only applies"),
    ("--checkpoint {ckpt} --mode sample --seed -1", "argument --seed"),
    ("--checkpoint {ckpt} --mode fid --fid-ref-num -1", "argument --fid-ref-num"),
    ("--checkpoint {ckpt} --mode bogus", "argument --mode"),
    ("--checkpoint {ckpt} --mode nll --num-iw 5", "did you mean --num-iw-samples?"),
    ("--checkpoint {ckpt} --mode sample --readjust-bn-batch 5",
     "did you mean --readjust-bn-batches?"),
    ("--checkpoint {ckpt} --mod sample", "did you mean --mode?"),
    ("--checkpoint {ckpt}", "--mode"),
    ("--mode sample", "--checkpoint"),
    ("--checkpoint {tmp}/missing.pt --mode sample", "--checkpoint"),
    ("--checkpoint {empty} --mode sample", "is a folder"),
    ("--checkpoint {corrupt} --mode sample", "corrupt"),
    ("--checkpoint {file} --mode sample", "not an hvae checkpoint"),
    ("--checkpoint {mismatch} --mode sample", "has shape [8, 1, 3, 3] in the checkpoint"),
    ("--checkpoint {ckpt} --mode sample --out {file}", "is an existing file"),
    ("--checkpoint {ckpt} --mode sample --device foo", "'foo' is not a device"),
    ("--checkpoint {ckpt} --mode sample --device cuda:99", "'cuda:99'"),
    ("--checkpoint {ckpt} --mode fid", "--fid-weights"),
    ("--checkpoint {ckpt} --mode fid --fid-weights {tmp}/missing.pth", "--fid-weights"),
    ("--checkpoint {ckpt} --mode decode", "needs --latents"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/missing.npz", "--latents"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/not_npz.npz", "not an .npz archive"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/wrong_keys.npz", "group_00"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/wrong_shape.npz", "needs floats of shape [2, 4, 7, 7]"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/too_many.npz", "4 latent groups"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/mixed_n.npz", "group_01"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/nan.npz", "non-finite"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/empty.npz", "no images"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/ints.npz", "int64"),
    # a flag the mode would ignore, or a file it would replace
    ("--checkpoint {ckpt} --mode nll --temp 0.5", "--temp only applies to --mode sample"),
    ("--checkpoint {ckpt} --mode nll --out {eval_out}", "--out only applies"),
    ("--checkpoint {ckpt} --mode nll --data {empty}", "bundled 'mnist_subset'"),
    ("--checkpoint {ckpt} --mode sample --split train", "--split only applies"),
    ("--checkpoint {ckpt} --mode sample --data {empty}", "--data only applies"),
    ("--checkpoint {ckpt} --mode fid --split train", "--split only applies"),
    ("--checkpoint {ckpt} --mode recon --num-iw-samples 5", "--num-iw-samples only applies"),
    ("--checkpoint {ckpt} --mode recon --latents {tmp}/nan.npz", "--latents only applies"),
    ("--checkpoint {ckpt} --mode decode --latents {tmp}/nan.npz --sample", "--sample only"),
    ("--checkpoint {ckpt} --mode sample --readjust-bn-batches 5", "only applies with --readjust-bn"),
    ("--checkpoint {ckpt} --mode encode --seed 3", "--seed only applies"),
    ("--checkpoint {ckpt} --mode nll --overwrite", "--overwrite only applies"),
    ("--checkpoint {ckpt} --mode nll --no-ema", "--no-ema does nothing: the checkpoint has no EMA"),
    ("--checkpoint {ckpt} --mode sample --nrow 4 --temp 0.7", "samples_t0.7.png' already exists"),
]
MAKE_LMDB = [
    ("--src {tmp}/missing --dst {tmp}/l1", "--src"),
    ("--src {file} --dst {tmp}/l2", "is not a folder"),
    ("--src {empty} --dst {tmp}/l3", "no train images"),
    ("--src {tmp}/images --dst {tmp}/l4 --split", "train"),
    ("--src {tmp}/bad_images --dst {tmp}/l5", "005.png"),
    ("--src {tmp}/bad_images --dst {tmp}/l6 --workers 2", "005.png"),
    ("--src {tmp}/images --dst {tmp}/l7 --size -5", "argument --size"),
    ("--src {tmp}/images --dst {tmp}/l8 --size 0", "argument --size"),
    ("--src {tmp}/images --dst {tmp}/l9 --size abc", "argument --size"),
    ("--src {tmp}/images --dst {file}", "--dst"),
    ("--src {tmp}/images --dst {file}/sub", "is a file"),
    ("--src {tmp}/images --dst {tmp}/lmdb_done_out", "--overwrite to replace it"),
    ("--src {tmp}/images --dst {tmp}/l10 --workers 0", "argument --workers"),
    ("--src {tmp}/images --dst {tmp}/l11 --test-fraction 1.5", "--test-fraction"),
    ("--src {tmp}/images --dst {tmp}/l12 --test-fraction nan", "--test-fraction"),
    ("--src {tmp}/images --dst {tmp}/l13 --format jpg", "argument --format"),
    ("--dst {tmp}/l14", "--src"),
    ("--src {tmp}/images --dst {tmp}/l15 --siz 8", "did you mean --size?"),
]
IMPORT_NVAE = [  # {nvae}: NVAE's rgb8 fixture; {broken}/NAME.pt: copies with one defect each
    ("{tmp}/missing.pt --out {tmp}/i1.pt", "does not exist"),
    ("{corrupt} --out {tmp}/i2.pt", "not a readable NVAE checkpoint"),
    ("{ckpt} --out {tmp}/i3.pt", "lacks 'state_dict'"),
    ("{broken}/pickled.pt --out {tmp}/i4.pt", "not a readable NVAE checkpoint"),
    ("{broken}/arch.pt --out {tmp}/i5.pt", "arch_instance 'res_elu' is not supported"),
    ("{broken}/dataset.pt --out {tmp}/i6.pt", "NVAE dataset 'omniglot'"),
    ("{broken}/no_flag.pt --out {tmp}/i7.pt", "'num_channels_enc'"),
    ("{broken}/missing_key.pt --out {tmp}/i8.pt", "lacks 'stem.bias'"),
    ("{broken}/extra_key.pt --out {tmp}/i9.pt", "'extra.weight'"),
    ("{broken}/shape.pt --out {tmp}/i10.pt", "'enc0.1.weight' has shape [3, 3, 1, 1]"),
    ("{broken}/alias.pt --out {tmp}/i11.pt", "not an alias"),
    ("{nvae} --out {empty}", "--out"),
    ("{nvae} --out {ckpt}", "already exists"),  # a training checkpoint is never replaced
    ("{nvae} --out {nvae} --overwrite", "is the NVAE checkpoint being imported"),
    ("{nvae}", "--out"),
    ("{nvae} --ou {tmp}/i12.pt", "did you mean --out?"),
]
SCRIPTS = [  # the other two entry points share the same plumbing
    ("bench", "--device foo", "'foo' is not a device"),
    ("bench", "--steps 0", "argument --steps"),
    ("bench", "--warmup_epochs inf", "warmup_epochs=inf"),
    ("ablate_kl", "--seeds 0", "argument --seeds"),
    ("ablate_kl", "--device foo --max-steps 2 --out {tmp}/sweep", "'foo' is not a device"),
    ("ablate_kl", "--variants nope --out {tmp}/sweep", "unknown variant"),
    ("ablate_kl", "--budget-minutes nan --out {tmp}/sweep", "argument --budget-minutes"),
    ("bench", "--step 3", "did you mean --steps?"),
    ("bench", "--eval_batche 3", "did you mean --eval_batches?"),
    ("ablate_kl", "--budget 5 --out {tmp}/sweep", "did you mean --budget-minutes?"),
    ("bench_table", "--timeou 5", "did you mean --timeout?"),
    ("check_cuda_graphs", "--step 3", "did you mean --steps?"),
    ("mutation_check", "--lis", "did you mean --list?"),
    # a flag the tool would ignore
    ("bench", "--backend nope --compile regional", "--backend 'nope' is not a torch.compile backend"),
    ("bench", "--backend aot_eager", "--backend does nothing without --compile"),
    ("bench", "--memory-only --steps 3", "--steps does nothing with --memory-only"),
    ("bench", "--data {empty}", "--data is not used: bench.py times the step on synthetic data"),
    ("bench", "--flow_type affine", "--flow_type affine does nothing"),
    ("check_cuda_graphs", "--cuda_graphs true", "--cuda_graphs is not used"),
    ("ablate_kl", "--name x --out {tmp}/sweep", "--name is not used"),
    ("ablate_kl", "--budget-minutes 1 --max-steps 2 --out {tmp}/sweep", "not both"),
    ("bench_table", "--json {file}", "--json '{file}' already exists"),
    ("bench_table", "--overwrite", "--overwrite does nothing without --json"),
]
# Appended before each train.py case (a case's own flags come later and win): if a bad
# input were accepted, the run would stay tiny instead of training the demo.
TRAIN_SAFETY = "--no-progress --out {runs} --max_steps 2 --eval_batches 1 --num_iw_samples 1"


def argv_of(text: str, files: dict) -> list[str]:
    return text.format(**files).split()


def check_one_line_error(prog: str, code, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith(f"{prog}: error: "), err[-2000:]
    assert sum(": error: " in line for line in lines) == 1, err[-2000:]
    assert needle in lines[-1], (needle, lines[-1])


def run_in_process(main, argv, capsys) -> tuple[object, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case,needle", TRAIN, ids=[c for c, _ in TRAIN])
def test_train_py(case, needle, files, capsys):
    code, err = run_in_process(train_cli.main, argv_of(f"{TRAIN_SAFETY} {case}", files), capsys)
    check_one_line_error("train.py", code, err, needle.format(**files))


@pytest.mark.parametrize("case,needle", EVALUATE, ids=[c for c, _ in EVALUATE])
def test_evaluate_py(case, needle, files, capsys):
    out = "" if "--mode nll" in case else "--out {eval_out} "  # nll writes no files
    argv = argv_of(out + case, files)
    code, err = run_in_process(evaluate_cli.main, argv, capsys)
    check_one_line_error("evaluate.py", code, err, needle.format(**files))


@pytest.mark.parametrize("case,needle", MAKE_LMDB, ids=[c for c, _ in MAKE_LMDB])
def test_make_lmdb_py(case, needle, files, capsys):
    code, err = run_in_process(load_script("make_lmdb").main, argv_of(case, files), capsys)
    check_one_line_error("make_lmdb.py", code, err, needle.format(**files))


@pytest.fixture(scope="module")
def nvae_files(files):
    """NVAE's rgb8 fixture and broken copies of it (one defect each)."""
    import argparse
    import copy
    import types

    nvae = ROOT / "tests" / "fixtures" / "nvae" / "nvae_rgb8_flow1.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(nvae, weights_only=True)
    broken = files["tmp"] / "nvae_broken"
    broken.mkdir()

    def save(name, change):
        copied = copy.deepcopy(state)
        change(copied)
        torch.save(copied, broken / f"{name}.pt")

    save("pickled", lambda s: s.update(args=types.SimpleNamespace(**vars(s["args"]))))
    save("arch", lambda s: setattr(s["args"], "arch_instance", "res_elu"))
    save("dataset", lambda s: setattr(s["args"], "dataset", "omniglot"))
    save("no_flag", lambda s: delattr(s["args"], "num_channels_enc"))
    save("missing_key", lambda s: s["state_dict"].pop("stem.bias"))
    save("extra_key", lambda s: s["state_dict"].update({"extra.weight": torch.zeros(1)}))
    save("shape", lambda s: s["state_dict"].update({"enc0.1.weight": torch.zeros(3, 3, 1, 1)}))
    alias = next(k for k in state["state_dict"] if k.endswith(".weight_normalized"))
    save("alias", lambda s: s["state_dict"].update({alias: s["state_dict"][alias] + 1.0}))
    return {**files, "nvae": nvae, "broken": broken}


@pytest.mark.parametrize("case,needle", IMPORT_NVAE, ids=[c for c, _ in IMPORT_NVAE])
def test_import_nvae_py(case, needle, nvae_files, capsys):
    code, err = run_in_process(load_script("import_nvae").main, argv_of(case, nvae_files), capsys)
    check_one_line_error("import_nvae.py", code, err, needle.format(**nvae_files))


@pytest.mark.parametrize("script,case,needle", SCRIPTS, ids=[f"{s} {c}" for s, c, _ in SCRIPTS])
def test_other_scripts(script, case, needle, files, capsys):
    code, err = run_in_process(load_script(script).main, argv_of(case, files), capsys)
    check_one_line_error(f"{script}.py", code, err, needle.format(**files))


def test_make_lmdb_removes_what_it_wrote_so_the_command_can_be_rerun(files, capsys):
    for src in ("bad_images", "bad_test_image"):  # fails in the train split / the test split
        dst = files["tmp"] / f"partial_{src}"
        code, err = run_in_process(load_script("make_lmdb").main,
                                   argv_of(f"--src {{tmp}}/{src} --dst {dst}", files), capsys)
        assert code == 2 and "cannot read image" in err
        assert not list(dst.glob("*/*.mdb"))


def test_architecture_mismatch_names_parameter_shapes_and_config_fields(files):
    from hvae.checkpoint import CheckpointError, load_checkpoint
    from hvae.config import Config
    from hvae.runtime import Runtime
    from hvae.training import Trainer

    wider = Config.from_dict({**load_checkpoint(files["ckpt"])["config"], "num_channels_enc": 16})
    with pytest.raises(CheckpointError) as err:
        Trainer(wider, Runtime(), progress=False, resume=files["ckpt"])
    line = str(err.value)
    assert "\n" not in line and len(line) < 600, line  # not a 270-line size-mismatch dump
    assert "parameter 'stem." in line and "[8, 1, 3, 3] in the checkpoint but [16, 1, 3, 3]" in line
    assert "configs differ in num_channels_enc (checkpoint 8, now 16)" in line


def test_unexpected_errors_keep_their_traceback(capsys):
    from hvae import cli

    @cli.entry_point("prog.py")
    def main(argv=None):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main([])


# Real processes: exit code 2, one line, no traceback, end to end.
END_TO_END = [
    ("train.py", "--warmup_epochs inf", "warmup_epochs=inf"),
    ("train.py", "--no-progress --dataset mnist --data /nonexistent", "--data /nonexistent"),
    ("train.py", "--no-progress --out {runs} --resume {ckpt} --num_channels_enc 16",
     "num_channels_enc (checkpoint 8, now 16)"),
    ("evaluate.py", "--checkpoint {ckpt} --mode sample --temp nan", "temperature 'nan'"),
    ("evaluate.py", "--checkpoint {ckpt} --mode decode --latents {tmp}/not_npz.npz",
     "not an .npz archive"),
    ("scripts/make_lmdb.py", "--src {tmp}/bad_images --dst {tmp}/e2e", "005.png"),
    # a misspelt prefix of a flag (argparse alone would take it for the flag)
    ("train.py", "--eval_batche 5", "did you mean --eval_batches?"),
    ("evaluate.py", "--checkpoint {ckpt} --mode nll --num-iw 5", "did you mean --num-iw-samples?"),
    ("scripts/make_lmdb.py", "--src {tmp}/images --dst {tmp}/e2e_abbrev --siz 8",
     "did you mean --size?"),
    ("scripts/import_nvae.py", "{ckpt} --out {tmp}/e2e.pt", "lacks 'state_dict'"),
]


def test_end_to_end(files):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [(prog, needle, subprocess.Popen(
        [sys.executable, str(ROOT / prog), *argv_of(case, files)], cwd=files["tmp"], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for prog, case, needle in END_TO_END]
    for prog, needle, proc in procs:
        _, err = proc.communicate(timeout=300)
        check_one_line_error(Path(prog).name, proc.returncode, err, needle)


def test_tools_replace_a_file_only_when_asked(nvae_files, capsys):
    """import_nvae.py, make_lmdb.py and evaluate.py refuse to replace what they wrote
    before (exit 2, the file untouched) and replace it with --overwrite."""
    from hvae.data import LMDBImages, Prepare

    tmp = nvae_files["tmp"]
    imported = tmp / "imported.pt"
    importer = load_script("import_nvae").main
    assert importer([str(nvae_files["nvae"]), "--out", str(imported)]) == 0
    before = imported.read_bytes()
    code, err = run_in_process(importer, [str(nvae_files["nvae"]), "--out", str(imported)], capsys)
    check_one_line_error("import_nvae.py", code, err, "--overwrite")
    assert imported.read_bytes() == before
    assert importer([str(nvae_files["nvae"]), "--out", str(imported), "--overwrite"]) == 0

    make_lmdb = load_script("make_lmdb").main
    dst = str(tmp / "lmdb_again")
    assert make_lmdb(["--src", str(tmp / "lmdb_done"), "--dst", dst, "--test-fraction", "0.5"]) == 0
    code, err = run_in_process(make_lmdb, ["--src", str(tmp / "images"), "--dst", dst], capsys)
    check_one_line_error("make_lmdb.py", code, err, "already holds an LMDB")
    assert make_lmdb(["--src", str(tmp / "images"), "--dst", dst, "--test-fraction", "0.5",
                      "--overwrite"]) == 0
    assert len(LMDBImages(Path(dst) / "train", Prepare(1, 28, resize=False))) == 10

    argv = ["--checkpoint", str(nvae_files["ckpt"]), "--mode", "recon", "--num", "4",
            "--out", str(tmp / "recon_out"), "--no-progress"]
    evaluate_cli.main(argv)
    code, err = run_in_process(evaluate_cli.main, argv, capsys)
    check_one_line_error("evaluate.py", code, err, "recon_test.png' already exists")
    evaluate_cli.main(argv + ["--overwrite"])
