"""``--sync_bn``: BatchNorm statistics over every rank's batch (``hvae.model.sync_bn``),
checked in 2 gloo processes against one process holding the whole batch."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hvae.config import preset
from hvae.model.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm

from test_training import TINY, _free_port, bernoulli_batch, torchrun_environment


def _layer_worker(rank, port, x, upstream, out_file, compiled=False):
    """Rank ``rank`` normalises its half of ``x``; saves what it computed.  ``compiled``:
    inside a region that ``--compile regional`` compiles (CPU twin: aot_eager)."""
    torchrun_environment(rank, 2, port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    bn = SyncBatchNorm2d(x.shape[1], momentum=0.3)
    if compiled:
        bn.forward = torch.compile(bn.forward, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1]))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, x.shape[1]))
        bn.running_mean.fill_(990.0)  # the shift K, near the batch mean of about 1000
    half = x.chunk(2)[rank].clone().requires_grad_(True)
    y = bn(half)
    (y * upstream.chunk(2)[rank]).sum().backward()
    torch.save({"y": y.detach(), "grad_x": half.grad, "grad_w": bn.weight.grad,
                "grad_b": bn.bias.grad, "mean": bn.running_mean, "var": bn.running_var,
                "count": bn.num_batches_tracked}, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_two_ranks_normalise_as_one_process_with_the_whole_batch(tmp_path, compiled):
    """Outputs, input gradients, the summed gamma/beta gradients and the running statistics
    (momentum 0.3, unbiased variance) equal nn.BatchNorm2d's on the concatenated batch,
    for inputs whose mean (about 1000) is large against their spread (3); also inside a
    compiled region."""
    g = torch.Generator().manual_seed(0)
    x = 1000 + 3 * torch.randn(8, 5, 4, 4, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(8, 5, 4, 4, generator=g)
    out = tmp_path / "layer"
    torch.multiprocessing.start_processes(_layer_worker, args=(_free_port(), x, upstream, str(out),
                                                                compiled),
                                          nprocs=2, start_method="spawn")
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]

    bn = nn.BatchNorm2d(5, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, 5))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, 5))
        bn.running_mean.fill_(990.0)
    whole = x.clone().requires_grad_(True)
    y = bn(whole)
    (y * upstream).sum().backward()
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), **close)
    torch.testing.assert_close(torch.cat([r["grad_x"] for r in ranks]), whole.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_w"] + ranks[1]["grad_w"], bn.weight.grad, **close)
    torch.testing.assert_close(ranks[0]["grad_b"] + ranks[1]["grad_b"], bn.bias.grad, **close)
    for r in ranks:
        torch.testing.assert_close(r["mean"], bn.running_mean, **close)
        torch.testing.assert_close(r["var"], bn.running_var, **close)
        assert int(r["count"]) == 1


def test_conversion_shares_parameters_and_buffers_and_leaves_evaluation_plain():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model = convert_sync_batchnorm(model)
    assert [type(m) for m in (model[1], model[2][0])] == [SyncBatchNorm2d] * 2
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model.state_dict().keys() == state.keys()  # checkpoints move between the two
    x = torch.randn(2, 3, 5, 5)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    plain.load_state_dict(state)
    # without a process group (and in evaluation) it is nn.BatchNorm2d
    torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))


def _training_worker(rank, port, cfg_dict, batches, out_file):
    """One training step of a tiny model with ``--sync_bn`` under torchrun's runtime."""
    torchrun_environment(rank, 2, port)
    from hvae import training
    from hvae.config import Config
    cfg = Config.from_dict(cfg_dict)
    if cfg.cuda_graphs:  # the sync-free step, uncaptured (capture needs CUDA)
        training.graph_blockers = lambda config, runtime: []
    trainer = training.Trainer(cfg, training.init_runtime("cpu"), progress=False,
                               loaders=(batches[rank], batches[rank]))
    assert any(isinstance(m, SyncBatchNorm2d) for m in trainer.model.modules())
    torch.manual_seed(100 + rank)
    metrics = trainer.train_step(batches[rank][0])
    assert not bool(metrics["skipped"])
    buffers = {n: b for n, b in trainer.model.named_buffers() if "running" in n}
    torch.save(buffers, f"{out_file}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager_step", "sync_free_step"])
def test_sync_bn_training_keeps_every_ranks_statistics_equal(tmp_path, cuda_graphs):
    """A training step with ``--sync_bn`` on CPUs (gloo): every BatchNorm's running
    statistics come out the same on both ranks, from different halves of the batch (without
    the synchronisation they differ)."""
    cfg = preset("demo", out=str(tmp_path / "runs"), **{**TINY, "batch_size": 8},
                 sync_bn=True, cuda_graphs=cuda_graphs)
    batches = [[bernoulli_batch(8, seed=r)] for r in range(2)]
    out = tmp_path / "train"
    torch.multiprocessing.start_processes(
        _training_worker, args=(_free_port(), cfg.to_dict(), batches, str(out)), nprocs=2,
        start_method="spawn")
    a, b = (torch.load(f"{out}.{r}") for r in range(2))
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
