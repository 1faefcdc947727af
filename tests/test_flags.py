"""Every flag is honoured or refused (issue #33): what a resumed run may change, the
in-epoch position under another batch size, and the lines that say what a flag does.
(The refusals themselves are cases of tests/test_bad_input.py.)"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hvae.checkpoint import CheckpointError
from hvae.config import preset
from hvae.runtime import Runtime
from hvae.training import Trainer, train

TINY = dict(num_channels_enc=8, num_channels_dec=8, num_groups_per_scale=2,
            num_latent_per_group=4, num_preprocess_cells=1, num_postprocess_cells=1,
            batch_size=16, num_iw_samples=1, eval_batches=1, ema_decay=0.0, warmup_epochs=0.0,
            weight_decay_norm=0.0)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """48 bundled digits as PNG files: 43 training images, 2 batches of 16 per epoch."""
    from hvae.data import load_mnist_subset
    folder = tmp_path_factory.mktemp("digits")
    for i, image in enumerate(load_mnist_subset()[0][:48]):
        Image.fromarray(np.asarray(image, np.uint8), mode="L").save(folder / f"{i:03d}.png")
    return folder


def config(tmp_path, digits, **overrides):
    return preset("demo", **{**TINY, "out": str(tmp_path), "name": "r", "dataset": "folder",
                             "data": str(digits), **overrides})


def test_resume_with_another_batch_size_continues_at_the_same_image(tmp_path, digits):
    cfg = config(tmp_path, digits, binary=False)               # items without random draws
    train(cfg, progress=False, stop_at_step=1)                 # 16 images into epoch 0
    ckpt = tmp_path / "r" / "checkpoint.pt"
    resumed = Trainer(cfg.replace(batch_size=8), Runtime(), progress=False, resume=ckpt)
    assert (resumed.epoch, resumed.batch_in_epoch) == (0, 2)   # 16 images = 2 batches of 8
    order = list(resumed.train_loader.sampler)                 # epoch 0's order
    first = next(resumed.epoch_batches())
    expected = resumed.train_loader.dataset[order[16]]
    assert np.array_equal(first[0].numpy(), np.asarray(expected))
    with pytest.raises(CheckpointError, match="16 images into epoch 0 .* batches of --batch_size 12"):
        Trainer(cfg.replace(batch_size=12), Runtime(), progress=False, resume=ckpt)


def test_resume_with_another_batch_size_after_a_complete_epoch(tmp_path, digits):
    cfg = config(tmp_path, digits)
    train(cfg, progress=False, stop_at_step=2)                 # epoch 0 complete (43 // 16 = 2)
    resumed = Trainer(cfg.replace(batch_size=12), Runtime(), progress=False,
                      resume=tmp_path / "r" / "checkpoint.pt")
    assert (resumed.epoch, resumed.batch_in_epoch) == (0, 3)   # still complete: 43 // 12 = 3


def test_the_run_says_whether_max_steps_or_epochs_ends_it(tmp_path, digits, capsys):
    for name, epochs, max_steps, said in (
            ("a", 3, 3, "--max_steps 3 ends the run, before the 3 epoch(s) of --epochs (6 steps of 2)"),
            ("b", 1, 50, "--epochs 1 ends the run at step 2 (2 per epoch), before --max_steps 50")):
        trainer = Trainer(config(tmp_path, digits, name=name, epochs=epochs, max_steps=max_steps),
                          Runtime(), progress=False)
        trainer.fit(stop_at_step=1)  # the line comes at the start
        assert said in capsys.readouterr().err
    assert trainer.total_steps == 2


def test_sync_bn_in_one_process_says_it_does_nothing(tmp_path, digits, capsys):
    Trainer(config(tmp_path, digits, sync_bn=True), Runtime(), progress=False)
    assert "--sync_bn: one process" in capsys.readouterr().err


def test_resume_may_change_its_length_and_how_it_runs(tmp_path, digits, capsys):
    """The flags README lists as changeable on --resume are honoured, not dropped."""
    import json
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train as train_cli

    flags = ["--no-progress", "--out", str(tmp_path), "--name", "r", "--dataset", "folder",
             "--data", str(digits)] + [f"--{k}={v}" for k, v in TINY.items()]
    assert train_cli.main(flags + ["--max_steps", "2"]) == 0
    capsys.readouterr()
    assert train_cli.main(flags + ["--resume", "--max_steps", "3", "--log_every", "1",
                                   "--num_iw_samples", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["steps"] == 3 and summary["iw_num_samples"] == 2
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert any(row["split"] == "train" and row["step"] == 3 for row in logged)  # --log_every 1
