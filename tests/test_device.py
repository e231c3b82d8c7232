"""The GPU path (runs only where CUDA is available; ``benchmarks/device_check/run.sh`` runs it on a lent GPU machine).

On the authors benchmark's GPT-2 (``variant="ci"``, forget10, seed 0), on ``cuda``:

- the local runner with ``precision="bf16-mixed"`` and ``gradient_checkpointing=True``: the steps really run under
  bf16 autocast (modules return bfloat16 tensors during the fit) and activation checkpointing really recomputes
  (the transformer blocks run more forward passes than in the same run without it), the weights stay float32 on the
  GPU, checkpointing is off again afterwards, and NPO loosens the fit of the forget answers;
- a one-worker Ray Train job with ``use_gpu=True``: the worker's process group is NCCL on a CUDA device, and the
  unlearned model comes back with the forget answers' fit loosened.

Without CUDA every test here is skipped (the CPU suite covers the same code paths on CPU: tests/test_unlearner.py,
tests/test_ray_train.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from erasus_ray import ErasusUnlearner
from erasus_ray.evaluation import evaluate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check/run.sh)")

#: NPO's forget loss must rise at least this much above the original model's (nats per token; the CPU 2-worker test
#: in tests/test_ray_train.py uses the same bar).
FORGET_LOSS_RISE = 0.5
#: where the local-runner test runs (a module constant so that the test logic can be dry-run on CPU)
DEVICE = "cuda"


@pytest.fixture(scope="module")
def authors():
    from erasus_ray.benchmarks import load_benchmark

    b = load_benchmark("authors", "forget10", 0, variant="ci")
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    return b, gold, original


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a Hugging Face GPT-2 (``transformer.h``)."""
    return list(model.transformer.h)


def _fit_counting(b, **kw):
    """Fit NPO on ``DEVICE`` (whole forget set) and record, during the fit only, the dtypes of every module's tensor
    output and how often an attention module (inside a transformer block) starts a forward pass in training mode."""
    dtypes: set[torch.dtype] = set()
    attn_calls = [0]
    attention = type(_blocks(b.original)[0].attn)

    def record(module, args, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            dtypes.add(output.dtype)

    def count(module, args):
        # The attention module, not the block: transformers 5.x checkpoints the block's *forward* (its own hooks stay
        # outside the checkpoint and fire once), so only modules called inside it run again in the recomputation. A
        # pre-hook: torch's non-reentrant checkpoint stops recomputing once it has rebuilt the saved tensors it needs
        # (early stop), so a module's forward may never return there and a post-forward hook would miss it.
        if isinstance(module, attention) and module.training:
            attn_calls[0] += 1

    handles = [nn.modules.module.register_module_forward_hook(record),
               nn.modules.module.register_module_forward_pre_hook(count)]
    try:
        res = ErasusUnlearner(b.original, strategy="npo", selector=None, fraction=None, task=b.task, seed=0,
                              progress=False, device=DEVICE, precision="bf16-mixed", **kw).fit(
            forget_data=b.forget, retain_data=b.retain)
    finally:
        for handle in handles:
            handle.remove()
    return res, dtypes, attn_calls[0]


def test_local_runner_bf16_and_gradient_checkpointing_on_cuda(authors):
    b, gold, original = authors
    plain, plain_dtypes, plain_calls = _fit_counting(b)
    res, dtypes, calls = _fit_counting(b, gradient_checkpointing=True)
    assert torch.bfloat16 in dtypes and torch.bfloat16 in plain_dtypes, "the steps run under bf16 autocast"
    assert calls > plain_calls > 0, f"checkpointing recomputes attention in backward: {calls} vs {plain_calls} forwards"
    assert res.config["gradient_checkpointing"] is True and res.config["runner"]["precision"] == "bf16-mixed"
    assert not res.model.is_gradient_checkpointing, "handed back with checkpointing off"
    assert all(p.device.type == torch.device(DEVICE).type and p.dtype == torch.float32 for p in res.model.parameters())
    for r in (plain, res):
        m = evaluate(r.model, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
        assert m["forget_loss"] > original["forget_loss"] + FORGET_LOSS_RISE, (m["forget_loss"], original["forget_loss"])
        assert m["avg_gap"] < original["avg_gap"], (m["avg_gap"], original["avg_gap"])


def test_ray_train_one_gpu_worker_uses_nccl_and_unlearns(authors, tmp_path):
    ray = pytest.importorskip("ray")
    from erasus_ray.runners.ray_train import RayTrainRunner

    b, gold, original = authors
    seen = tmp_path / "worker.json"

    def record(epoch, rank):  # in the worker, after each checkpoint
        import torch.distributed as dist
        import ray.train.torch

        seen.write_text(json.dumps({"backend": dist.get_backend() if dist.is_initialized() else None,
                                    "device": str(ray.train.torch.get_device()), "rank": rank, "epoch": epoch}))

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        unlearner = ErasusUnlearner(b.original, strategy="npo", selector=None, fraction=None, task=b.task, seed=0,
                                    progress=False, precision="bf16-mixed", backend="ray_train", num_workers=1,
                                    use_gpu=True)
        unlearner.make_runner = lambda cfg: RayTrainRunner(cfg, num_workers=1, use_gpu=True, after_epoch=record,
                                                           storage_path=str(tmp_path / "train"))
        res = unlearner.fit(forget_data=b.forget, retain_data=b.retain)
    finally:
        if started:
            ray.shutdown()
    worker = json.loads(seen.read_text())
    assert worker["backend"] == "nccl" and worker["device"].startswith("cuda"), worker
    assert res.report.steps > 0
    m = evaluate(res.model, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    assert m["forget_loss"] > original["forget_loss"] + FORGET_LOSS_RISE, (m["forget_loss"], original["forget_loss"])
    assert m["avg_gap"] < original["avg_gap"], (m["avg_gap"], original["avg_gap"])
