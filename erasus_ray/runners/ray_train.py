"""Run a loss-based strategy under Ray Train (``TorchTrainer``): data-parallel workers, checkpoints, restarts.

Each worker takes an id-strided shard of the coreset and of the retain set, runs the *same* epoch loop and step
as :class:`~erasus_ray.runners.LocalRunner`, and averages gradients with an all-reduce before the optimizer step
(gloo on CPU, nccl on GPU). The model is not wrapped in DDP, so strategies see their model exactly as in
process (parameter names, hooks, masks). Rank 0 writes a checkpoint (weights, optimizer, epoch, report) after
every epoch; with ``FailureConfig(max_failures)`` a killed worker group restarts from the last one.
Strategy ``setup`` always runs on the original weights, so references (NPO's log-likelihoods, SCRUB's teacher)
survive a restart unchanged; the restored state is the model, the optimizer, the epoch and the report, and the
retain stream is replayed, so a resumed run takes the same steps as an uninterrupted one (what is not
checkpointed: the global torch RNG, which only strategies drawing random numbers per step - dropout - read).
After the last epoch every worker runs the strategy's ``finish`` (merging LoRA adapters, folding masks) and rank
0 writes a final checkpoint of the finished model, which the driver loads: the returned model has the
architecture the strategy leaves, exactly as with the local runner.

Only strategies whose optimizer steps all go through ``runner.run`` can run here. Strategies that compute in the
calling process (Fisher noise, SSD, Newton steps, SISA shard retraining, pruning; see
:meth:`~erasus_ray.strategies.Strategy.driver_only`) are refused with an error instead of silently running on the
driver. What a strategy's ``unlearn`` puts in ``ctx.state`` before calling the runner (e.g. the layers
``causal_tracing`` located) travels to the workers.
"""

from __future__ import annotations

import json
import math
import tempfile
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from erasus_ray.distributed.pool import ensure_ray, materialise
from erasus_ray.errors import ErasusError
from erasus_ray.runners.local import LocalRunner, RunnerConfig, RunReport, StepExecutor
from erasus_ray.strategies.base import Strategy, UnlearnContext, refuse_driver_only

STATE_FILE = "unlearn_state.pt"


def _all_reduce_mean(params: list[torch.nn.Parameter]) -> None:
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).clone()
        offset += n


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from erasus_ray.utils.malloc import hold_freed_memory_from_env

    torch.set_num_threads(int(config.get("torch_threads", 1)))
    hold_freed_memory_from_env()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    strategy: Strategy = config["strategy"]
    model = config["model"]
    device = ray.train.torch.get_device()
    model.to(device)
    forget, retain = config["forget"], config["retain"]
    ctx = UnlearnContext(
        model=model,
        task=config["task"],
        forget=forget.subset(forget.ids[rank::world]),
        retain=None if retain is None else retain.subset(retain.ids[rank::world]),
        device=device,
        seed=config["seed"],
        forget_weights=config["forget_weights"],
        model_factory=None,
        recipe=None,
        state=dict(config["state"]),
    )
    rcfg: RunnerConfig = replace(config["runner"], progress=False)
    runner = LocalRunner(rcfg)
    strategy.setup(ctx)  # on the original weights, before any checkpoint is restored

    executor = StepExecutor(strategy, ctx, rcfg, grad_sync=_all_reduce_mean)
    start_epoch, report = 0, RunReport()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)
        if state.get("final"):  # restarted after the finished model was saved: nothing left to do
            return
        model.load_state_dict(state["model"])
        executor.load_optimizer_state(state["optimizer"])
        start_epoch, report = state["epoch"], RunReport(**state["report"])
        report.history.append({"resumed_from_epoch": start_epoch})
    forget_loader, retain_loader = runner.loaders(strategy, ctx)
    steps_per_epoch = max(1, math.ceil(math.ceil(len(forget) / world) / rcfg.batch_size))

    def on_epoch_end(epoch: int, rep: RunReport) -> None:
        metrics = {"epoch": epoch, "steps": rep.steps, **{k: v for k, v in rep.history[-1].items() if isinstance(v, (int, float))}}
        with tempfile.TemporaryDirectory() as folder:
            ckpt = None
            if rank == 0:
                state = {"model": model.state_dict(), "optimizer": executor.optimizer_state(), "epoch": epoch, "report": asdict(rep)}
                torch.save(state, Path(folder) / STATE_FILE)
                ckpt = Checkpoint.from_directory(folder)
            ray.train.report(metrics, checkpoint=ckpt)
        hook = config.get("after_epoch")
        if hook is not None:
            hook(epoch, rank)

    report = runner.run_epochs(
        strategy, ctx, executor, forget_loader, retain_loader, start_epoch=start_epoch, report=report,
        steps_per_epoch=steps_per_epoch, on_epoch_end=on_epoch_end,
    )
    strategy.finish(ctx)  # on every worker: identical weights, so identical finished models
    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            torch.save({"model": model.state_dict(), "final": True, "report": asdict(report)}, Path(folder) / STATE_FILE)
            ckpt = Checkpoint.from_directory(folder)
        ray.train.report({"epoch": report.epochs, "steps": report.steps, "final": 1}, checkpoint=ckpt)


def last_good_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint a restart of the run in ``run_dir`` would resume from, as ``(directory, epoch)``; None if there
    is none.

    Ray Train v2 (the Train API of the Ray 2.55 this project pins) keeps, next to the ``checkpoint_<timestamp>`` directories of a run, a
    ``checkpoint_manager_snapshot.json`` that it rewrites after every checkpoint it registers; its
    ``latest_checkpoint_result`` is what ``ray.train.get_checkpoint()`` hands a restarted worker group. That entry is
    used when it names a directory holding this runner's state file. Otherwise (no snapshot, an unreadable one, or a
    storage layout without it) the newest ``checkpoint_*`` *directory* holding a loadable state file, by its saved
    epoch. A directory rank 0 uploaded but Ray Train never registered (the group died before the controller polled
    it) is not what Ray would resume from, so the snapshot wins over it.
    """
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):
        latest = {}
    name = latest.get("checkpoint_dir_name")
    if name and (run_dir / name / STATE_FILE).is_file():
        epoch = latest.get("metrics", {}).get("epoch")
        if isinstance(epoch, int):
            return run_dir / name, epoch
    best: tuple[Path, int] | None = None
    for folder in run_dir.glob("checkpoint_*"):
        state_file = folder / STATE_FILE
        if not (folder.is_dir() and state_file.is_file()):
            continue
        try:
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception:  # a partial upload
            continue
        epoch = int(state.get("epoch", state.get("report", {}).get("epochs", -1)))
        if best is None or epoch > best[1]:
            best = (folder, epoch)
    return best


class RayTrainRunner:
    """Executes a loss-based strategy with ``ray.train.torch.TorchTrainer``.

    Cost: a TorchTrainer start (worker group, process group; ~20-40 s on a 2-core machine) plus, per epoch, the
    local runner's steps on ``1 / num_workers`` of the coreset and retain batches, one gradient all-reduce per
    optimizer step and one checkpoint written by rank 0.

    Args:
        config: the same :class:`RunnerConfig` the local runner takes.
        num_workers: data-parallel workers; ``use_gpu``: one GPU each (nccl), else CPU (gloo).
        max_failures: worker-group restarts from the last checkpoint before giving up.
        storage_path: where Ray Train keeps checkpoints (default: a temporary folder); every run gets a unique name
            (a reused name would silently resume an old run).
        after_epoch: test hook ``f(epoch, rank)`` called in workers after each checkpoint (fault injection).
    """

    def __init__(
        self,
        config: RunnerConfig | None = None,
        *,
        num_workers: int = 2,
        use_gpu: bool = False,
        max_failures: int = 1,
        storage_path: str | None = None,
        resources_per_worker: dict[str, float] | None = None,
        after_epoch: Any = None,
    ) -> None:
        self.config = (config or RunnerConfig()).validate()
        self.num_workers = int(num_workers)
        self.use_gpu = use_gpu
        self.max_failures = int(max_failures)
        self.storage_path = storage_path
        self.resources_per_worker = resources_per_worker or {"CPU": 1}
        self.after_epoch = after_epoch
        self.last_checkpoint: str | None = None

    distributed = True

    def run(self, strategy: Strategy, ctx: UnlearnContext) -> RunReport:
        refuse_driver_only(strategy)
        ray = ensure_ray()
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        storage = self.storage_path or tempfile.mkdtemp(prefix="erasus-ray-train-")
        name = f"erasus-unlearn-{strategy.name}-{uuid.uuid4().hex[:8]}"
        cpu_model = ctx.model.to("cpu")  # workers place their copy on their own device
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config={
                "model": cpu_model,
                "strategy": strategy,
                "task": ctx.task,
                "forget": materialise(ctx.forget),
                "retain": None if ctx.retain is None else materialise(ctx.retain),
                "forget_weights": ctx.forget_weights,
                "state": ctx.state,
                "seed": ctx.seed,
                "runner": self.config,
                "after_epoch": self.after_epoch,
            },
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu, resources_per_worker=self.resources_per_worker),
            run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=self.max_failures)),
        )
        try:
            result = trainer.fit()
        except Exception as err:  # ray.train.TrainingFailedError and friends
            found = last_good_checkpoint(Path(storage, name))
            last = (f"{found[0]} (epoch {found[1]})" if found is not None
                    else f"none (no epoch finished; run folder {storage}/{name})")
            raise ErasusError(
                f"Ray Train run {name} failed after {self.max_failures} restart(s); last good checkpoint: {last}: {err}"
            ) from err
        if result.checkpoint is None:
            raise ErasusError(f"Ray Train run {name} produced no checkpoint")
        self.last_checkpoint = result.checkpoint.path
        with result.checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=False)
        ctx.model.load_state_dict(state["model"])
        ctx.model.to(ctx.device).eval()
        del ray
        return RunReport(**state["report"])
