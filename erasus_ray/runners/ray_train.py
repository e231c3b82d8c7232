"""Run a loss-based strategy under Ray Train (``TorchTrainer``): data-parallel workers, checkpoints, restarts.

Each worker takes an id-strided shard of the coreset and of the retain set, runs the *same* epoch loop and step
as :class:`~erasus_ray.runners.LocalRunner`, and averages gradients with an all-reduce before the optimizer step
(gloo on CPU, nccl on GPU). The model is not wrapped in DDP, so strategies see their model exactly as in
process (parameter names, hooks, masks). Rank 0 writes a checkpoint (weights, optimizer, epoch, report) after
every epoch; with ``FailureConfig(max_failures)`` a killed worker group restarts from the last one.
Strategy ``setup`` always runs on the original weights and on the whole coreset on every rank (a saliency mask
built from a rank's shard alone would differ between ranks and the ranks' weights would drift apart), so references (NPO's log-likelihoods, SCRUB's teacher)
survive a restart unchanged; the restored state is the model, the optimizer, the epoch and the report, and the
retain stream is replayed, so a resumed run takes the same steps as an uninterrupted one (what is not
checkpointed: the global torch RNG, which only strategies drawing random numbers per step - dropout - read).
After the last epoch every worker runs the strategy's ``finish`` (merging LoRA adapters, folding masks) and rank
0 writes a final checkpoint of the finished model, which the driver loads: the returned model has the
architecture the strategy leaves, exactly as with the local runner.

**Closed loop** (``closed_loop=`` a :class:`~erasus_ray.control.controller.Controller`, what ``ErasusUnlearner`` passes
unless the caller fixed ``epochs``/``lr``): the controller's loop runs *inside* the workers, in the one TorchTrainer
start of the run. Every rank takes the same data-parallel steps on its shard of the (growing) coreset; every
``verify_every`` steps rank 0 alone measures the whole forget set, the retain probe and the held-out set (the same
:class:`~erasus_ray.evaluation.verification.Probe` as in process) and makes the controller's decision (continue, guard
trip, coreset growth, stop), which ``torch.distributed.broadcast_object_list`` hands to every rank, so all ranks
restore, change the step size, re-shard and stop alike. Rank 0 measures rather than every rank a shard because the
targets need the whole per-sample distribution (a loss-MIA AUC, a two-sample test, the failing ids the coreset grows
by), not sums an all-reduce could combine: sharding would need an all-gather of per-sample statistics and a second
code path, for a forward-only cost that ``verify_every="auto"`` already keeps below half of the steps'. Strategy
``setup`` runs on every rank on the whole coreset (the whole forget set where the coreset may grow), not on the rank's
shard, so per-id tables and masks are the same on every rank. Rank 0 checkpoints after every verification window
(weights, last good and best weights, optimizer, coreset, stream positions, the controller's state), so a
``max_failures`` restart resumes at the last window; the final checkpoint carries the returned (best guarded) weights
and the controller's record, which the driver reads into the result's ``verification`` (``mode="closed_loop"``).

Only strategies whose optimizer steps all go through ``runner.run`` can run here. Strategies that compute in the
calling process (Fisher noise, SSD, Newton steps, SISA shard retraining, pruning; see
:meth:`~erasus_ray.strategies.Strategy.driver_only`) are refused with an error instead of silently running on the
driver. What a strategy's ``unlearn`` puts in ``ctx.state`` before calling the runner (e.g. the layers
``causal_tracing`` located) travels to the workers.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from erasus_ray.control.controller import ClosedLoopRunner, Controller, Seat
from erasus_ray.distributed.pool import ensure_ray, materialise
from erasus_ray.errors import ErasusError
from erasus_ray.runners.local import LocalRunner, RunnerConfig, RunReport, StepExecutor
from erasus_ray.strategies.base import Strategy, UnlearnContext, refuse_driver_only
from erasus_ray.utils.shipping import shippable, unshipped

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


def _shard(data: Any, rank: int, world: int) -> Any:
    """This rank's id-strided part of ``data``; a rank that would get nothing (fewer samples than ranks) takes one
    sample of another rank's, so every rank can take the same number of synchronised steps."""
    ids = data.ids[rank::world]
    return data.subset(ids if len(ids) or not len(data) else data.ids[rank % len(data) : rank % len(data) + 1])


def _save_checkpoint(rank: int, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank reports ``metrics``; rank 0 also uploads ``state`` as the checkpoint."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        ckpt = None
        if rank == 0:
            torch.save(state, Path(folder) / STATE_FILE)
            ckpt = Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=ckpt)


def _load_checkpoint(device: torch.device) -> dict[str, Any] | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=False)


class _RankSeat(Seat):
    """One rank of the closed loop (module docstring): decisions made on rank 0 and broadcast, data sharded by id,
    gradients all-reduced, a checkpoint after a verification window once ``every_s`` seconds have passed since the
    last one (rank 0's clock decides, so every rank reports alike; ``after_window(window, rank)``: the test hook,
    called after each checkpoint)."""

    grad_sync = staticmethod(_all_reduce_mean)

    def __init__(self, rank: int, world: int, saved: dict[str, Any] | None, every_s: float, after_window: Any = None) -> None:
        self.rank, self.world, self.saved, self.after_window = rank, world, saved, after_window
        self.every_s, self.last = every_s, time.monotonic()

    def decide(self, make: Any) -> Any:
        import torch.distributed as dist

        box = [make() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, data: Any) -> Any:
        return _shard(data, self.rank, self.world)

    def save(self, state: Any, window: int, steps: int) -> None:
        if not self.decide(lambda: time.monotonic() - self.last >= self.every_s):
            return
        self.last = time.monotonic()
        # "epoch": the unit last_good_checkpoint and the run's error message read - here, verification windows
        _save_checkpoint(self.rank, state() if self.rank == 0 else {}, {"epoch": window, "window": window, "steps": steps})
        if self.after_window is not None:
            self.after_window(window, self.rank)

    def resumed(self) -> dict[str, Any] | None:
        return self.saved


def _closed_loop(config: dict[str, Any], strategy: Strategy, ctx: UnlearnContext, rcfg: RunnerConfig, rank: int, world: int) -> None:
    """The controller's loop in this worker (module docstring); rank 0 writes the final checkpoint: the returned
    weights, the report and the controller's record."""
    saved = _load_checkpoint(ctx.device)
    if saved is not None and saved.get("final"):  # restarted after the finished model was saved: nothing left to do
        return
    c: Controller = config["closed_loop"]
    seat = _RankSeat(rank, world, saved, config["checkpoint_every_s"], config.get("after_epoch"))
    runner = ClosedLoopRunner(rcfg, c.control, c.target, c.probe, c.growth, original=c.original, seat=seat)
    report = runner.run(strategy, ctx)
    final = {"model": ctx.model.state_dict(), "final": True, "report": asdict(report), "record": runner.record} if rank == 0 else {}
    _save_checkpoint(rank, final, {"epoch": report.epochs, "steps": report.steps, "final": 1})


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from erasus_ray.utils.malloc import hold_freed_memory_from_env

    torch.set_num_threads(int(config.get("torch_threads", 1)))
    hold_freed_memory_from_env()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    strategy: Strategy = config["strategy"]
    model = unshipped(config["model"])
    device = ray.train.torch.get_device()
    model.to(device)
    forget, retain = config["forget"], config["retain"]
    closed = config.get("closed_loop") is not None
    ctx = UnlearnContext(
        model=model,
        task=config["task"],
        # setup sees the whole coreset on every rank (equal masks / per-id tables); the forget shard comes after it
        forget=forget,
        retain=None if retain is None else _shard(retain, rank, world),
        device=device,
        seed=config["seed"],
        full_forget=config.get("full_forget"),
        forget_weights=config["forget_weights"],
        model_factory=None,
        recipe=None,
        state=dict(config["state"]),
    )
    rcfg: RunnerConfig = replace(config["runner"], progress=False)
    if closed:
        _closed_loop(config, strategy, ctx, rcfg, rank, world)
        return
    runner = LocalRunner(rcfg)
    strategy.setup(ctx)  # on the original weights and the whole coreset, before any checkpoint is restored
    ctx.forget = forget.subset(forget.ids[rank::world])

    executor = StepExecutor(strategy, ctx, rcfg, grad_sync=_all_reduce_mean)
    start_epoch, report = 0, RunReport()
    state = _load_checkpoint(device)
    if state is not None:
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
        state = {"model": model.state_dict(), "optimizer": executor.optimizer_state(), "epoch": epoch, "report": asdict(rep)} if rank == 0 else {}
        _save_checkpoint(rank, state, metrics)
        hook = config.get("after_epoch")
        if hook is not None:
            hook(epoch, rank)

    report = runner.run_epochs(
        strategy, ctx, executor, forget_loader, retain_loader, start_epoch=start_epoch, report=report,
        steps_per_epoch=steps_per_epoch, on_epoch_end=on_epoch_end,
    )
    strategy.finish(ctx)  # on every worker: identical weights, so identical finished models
    final = {"model": model.state_dict(), "final": True, "report": asdict(report)} if rank == 0 else {}
    _save_checkpoint(rank, final, {"epoch": report.epochs, "steps": report.steps, "final": 1})


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
    optimizer step and one checkpoint written by rank 0. Closed loop: per verification window instead of per epoch,
    plus rank 0's forward passes over the probe (the other ranks wait) and one broadcast of the decision.

    Args:
        config: the same :class:`RunnerConfig` the local runner takes.
        num_workers: data-parallel workers; ``use_gpu``: one GPU each (nccl), else CPU (gloo).
        max_failures: worker-group restarts from the last checkpoint before giving up.
        storage_path: where Ray Train keeps checkpoints (default: a temporary folder); every run gets a unique name
            (a reused name would silently resume an old run).
        after_epoch: test hook ``f(epoch, rank)`` called in workers after each checkpoint (fault injection); in the
            closed loop ``epoch`` counts verification windows.
        closed_loop: a :class:`~erasus_ray.control.controller.Controller` (not started): run its loop in the workers
            (module docstring); after ``run`` the runner's ``ran`` is True and ``record`` holds the controller's record,
            as a :class:`~erasus_ray.control.ClosedLoopRunner`'s. None: the strategy's epochs, open loop.
        checkpoint_every_s: the closed loop checkpoints after a verification window only when this many seconds have
            passed since its last checkpoint (0: after every window). Ray Train's controller takes a worker's reports
            one per poll (every 2 s by default) and a report waits for the previous one to be taken, so a checkpoint per
            window would cost up to 2 s per window (measured: 12 windows of 5 wine steps, ~2 s each); at most this
            much work is lost at a restart.
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
        closed_loop: Controller | None = None,
        checkpoint_every_s: float = 5.0,
    ) -> None:
        self.config = (config or RunnerConfig()).validate()
        self.num_workers = int(num_workers)
        self.use_gpu = use_gpu
        self.max_failures = int(max_failures)
        self.storage_path = storage_path
        self.resources_per_worker = resources_per_worker or {"CPU": 1}
        self.after_epoch = after_epoch
        self.last_checkpoint: str | None = None
        self.closed_loop = closed_loop
        self.checkpoint_every_s = float(checkpoint_every_s)
        self.ran = False
        self.record: dict[str, Any] = {}

    @property
    def control(self) -> Any:
        """The closed loop's settings (None for an open-loop run)."""
        return None if self.closed_loop is None else self.closed_loop.control

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
                "model": shippable(cpu_model),  # a parametrized module cannot be pickled as it is
                "strategy": strategy,
                "task": ctx.task,
                "forget": materialise(ctx.forget),
                "retain": None if ctx.retain is None else materialise(ctx.retain),
                "forget_weights": ctx.forget_weights,
                "state": ctx.state,
                "seed": ctx.seed,
                "runner": self.config,
                "after_epoch": self.after_epoch,
                **self._closed_loop_config(ctx),
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
        if self.closed_loop is not None:
            self.ran, self.record = True, state["record"]
        del ray
        return RunReport(**state["report"])

    def _closed_loop_config(self, ctx: UnlearnContext) -> dict[str, Any]:
        """What the workers need for the closed loop: the controller, with its probe's data sets made self-contained
        (so the whole base data set does not ship), and the whole forget set the coreset grows from."""
        if self.closed_loop is None:
            return {}
        full = materialise(ctx.full_forget if ctx.full_forget is not None else ctx.forget)
        controller = copy.copy(self.closed_loop)
        probe = controller.probe = copy.copy(controller.probe)
        for name in ("forget", "retain", "heldout"):
            data = getattr(probe, name)
            same = data is not None and name == "forget" and np.array_equal(data.ids, full.ids)
            setattr(probe, name, full if same else None if data is None else materialise(data))
        return {"closed_loop": controller, "full_forget": full, "checkpoint_every_s": self.checkpoint_every_s}
