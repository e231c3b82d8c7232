"""Ray Train runner: the config key selects it; 1 worker matches the local runner (loss-based, two-phase and
structural strategies); 2 workers unlearn, also a causal LM; a killed worker resumes to the uninterrupted result;
strategies that compute on the driver are refused; the closed loop runs inside the workers (rank 0 verifies and
decides, every rank follows) and resumes from its per-window checkpoints."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from _runs_on import runs_on
from erasus_ray import ErasusUnlearner
from erasus_ray.errors import InvalidConfigError
from erasus_ray.evaluation import evaluate
from erasus_ray.runners import LocalRunner
from erasus_ray import StrategyPipeline
from erasus_ray.strategies import STRATEGIES, Strategy
from erasus_ray.tasks import ClassificationTask

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]


def _fit(b, strategy="npo", **kw):
    return ErasusUnlearner(b.original, strategy=strategy, selector="el2n", fraction=0.2, epochs=kw.pop("epochs", 4), progress=False,
                           retain_batch_size=64, **kw).fit(forget_data=b.forget, retain_data=b.retain)


def _assert_same_weights(a, b, atol=1e-5):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), "same parameter names"
    for n in sa:
        assert torch.allclose(sa[n], sb[n], atol=atol), n


def test_one_worker_matches_local(digits_class, ray_cluster, tmp_path):
    local = _fit(digits_class)
    remote = _fit(digits_class, backend="ray_train", num_workers=1)
    _assert_same_weights(local.model, remote.model)
    assert remote.report.steps == local.report.steps
    assert remote.config["backend"] == "ray_train"


@pytest.mark.slow
@pytest.mark.parametrize("name, kw", [("scrub", {"msteps": 2}), ("lora_unlearning", {"rank": 2})])
def test_one_worker_matches_local_for_two_phase_and_structural_strategies(name, kw, digits_class, ray_cluster):
    """SCRUB (two optimizer steps per runner step, one optimizer per phase, its max phase read from the runner's
    epoch) and LoRA (peft adapters injected in the worker, merged by finish() before the final checkpoint): the
    driver gets the same finished model, with the original parameter names, as in process."""
    local = _fit(digits_class, name, epochs=3, **kw)
    remote = _fit(digits_class, name, epochs=3, backend="ray_train", num_workers=1, **kw)
    _assert_same_weights(local.model, remote.model)
    assert [n for n, _ in remote.model.named_parameters()] == [n for n, _ in digits_class.original.named_parameters()]


@pytest.mark.slow
def test_delta_unlearning_runs_in_the_workers_and_matches_local(digits_class, ray_cluster):
    """delta_unlearning wraps the model in an OffsetModel in its unlearn() and then steps only through runner.run
    (see test_strategies_that_override_unlearn_step_only_inside_runner_run), so it is not driver-only: under Ray
    Train the wrapper travels to the worker, the offset trains there, and the driver gets the local run's wrapper -
    the base model's weights untouched, its requires_grad flags restored."""
    from erasus_ray.strategies.delta_unlearning import OffsetModel

    b = digits_class
    assert STRATEGIES.create("delta_unlearning").driver_only() is None
    local = _fit(b, "delta_unlearning", epochs=2)
    remote = _fit(b, "delta_unlearning", epochs=2, backend="ray_train", num_workers=1)
    assert isinstance(remote.model, OffsetModel) and remote.report.steps == local.report.steps > 0
    _assert_same_weights(local.model, remote.model)
    for (n, p), q in zip(remote.model.base.named_parameters(), b.original.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach().cpu()), f"base parameter {n} changed"
    assert not all(torch.equal(p, q) for p, q in zip(remote.model.offset.parameters(), remote.model.offset_ref.parameters()))
    assert all(p.requires_grad for p in remote.model.base.parameters()), "base flags restored after the run"


def test_config_execution_key_selects_the_ray_train_runner(digits_class, monkeypatch):
    """``execution: {backend: ray_train, num_workers: 2}`` in a job YAML builds a RayTrainRunner with 2 workers and the
    config's runner settings (its run is replaced by the local one here: the real run is the slow tests' job)."""
    from erasus_ray.experiment import JobConfig, run_job
    from erasus_ray.runners.ray_train import RayTrainRunner

    cfg = JobConfig.from_yaml(ROOT / "examples" / "configs" / "digits_class_ray_train.yaml")
    assert cfg.execution == {"backend": "ray_train", "num_workers": 2, "max_failures": 1}
    seen = []

    def run(self, strategy, ctx):
        seen.append({"num_workers": self.num_workers, "max_failures": self.max_failures, "epochs": self.config.epochs,
                     "retain_batch_size": self.config.retain_batch_size, "strategy": strategy.name})
        return LocalRunner(self.config).run(strategy, ctx)

    monkeypatch.setattr(RayTrainRunner, "run", run)
    cfg.runner["epochs"] = 2  # keep the stand-in run short
    job = run_job(cfg, bench=digits_class, progress=False)
    assert seen == [{"num_workers": 2, "max_failures": 1, "epochs": 2, "retain_batch_size": 128, "strategy": "grad_diff"}]
    assert job["config"]["backend"] == "ray_train" and job["config"]["scaling"]["num_workers"] == 2


# --- strategies that compute on the driver ----------------------------------------------------------------------
def _default(name):
    return STRATEGIES.create(name)


DRIVER_ONLY = [n for n in STRATEGIES.names() if _default(n).driver_only()]


def test_driver_only_list():
    """The strategies whose work is not optimizer steps through the runner (they override unlearn())."""
    assert set(DRIVER_ONLY) == {"fisher_forgetting", "ssd", "sisa", "certified_removal", "retrain", "neuron_pruning",
                                "attention_surgery", "activation_steering", "safe_latents", "vlm_attention", "uce"}
    for name in DRIVER_ONLY:
        assert STRATEGIES.get(name).unlearn is not Strategy.unlearn


@pytest.mark.parametrize("name", DRIVER_ONLY)
def test_driver_only_strategies_are_refused_by_ray_train(name, digits_class, tiny_lm):
    model, task = (digits_class.original, digits_class.task)
    if not runs_on(STRATEGIES.get(name), task):
        model, task = tiny_lm["model"], tiny_lm["task"]
    for family in ("digits_unet", "digits_prompt_unet", "clip"):  # diffusion (safe_latents, uce), VLM (vlm_attention)
        if runs_on(STRATEGIES.get(name), task):
            break
        from erasus_ray.testing import build_family

        built = build_family(family)
        model, task = built.model, built.task
    with pytest.raises(InvalidConfigError, match=rf"strategy '{name}' cannot run under backend='ray_train': .*calling process.*backend='local'"):
        ErasusUnlearner(model, strategy=name, task=task, backend="ray_train", num_workers=2)
    ErasusUnlearner(model, strategy=name, task=task, backend="local")  # fine in process


def test_amnesiac_with_a_log_and_meta_stages_are_refused_by_ray_train(digits_class):
    from erasus_ray.strategies.amnesiac import AmnesiacLog, Amnesiac

    b = digits_class
    log = AmnesiacLog(param_names=[], shapes=[])
    assert Amnesiac().driver_only() is None, "the relabelling fallback is a loss: it runs in the workers"
    with pytest.raises(InvalidConfigError, match="'amnesiac' cannot run under backend='ray_train': with a training log"):
        ErasusUnlearner(b.original, strategy=Amnesiac(log=log), backend="ray_train")
    with pytest.raises(InvalidConfigError, match="'pipeline' cannot run under backend='ray_train': its stage 'ssd'"):
        ErasusUnlearner(b.original, strategy=StrategyPipeline(["grad_diff", "ssd"]), backend="ray_train")
    with pytest.raises(InvalidConfigError, match="'ensemble' cannot run under backend='ray_train': its stage 'fisher_forgetting'"):
        ErasusUnlearner(b.original, strategy="ensemble", members=["grad_diff", "fisher_forgetting"], backend="ray_train")
    # auto decides at run time: budget='exact' picks retrain, refused before any Ray Train run starts
    auto = ErasusUnlearner(b.original, strategy="auto", budget="exact", selector=None, task=b.task, progress=False,
                           backend="ray_train", model_factory=b.model_factory, recipe=b.recipe)
    with pytest.raises(InvalidConfigError, match="'retrain' cannot run under a distributed runner"):
        auto.fit(forget_data=b.forget, retain_data=b.retain)


def _override_unlearn_but_use_the_runner():
    names = []
    for n in STRATEGIES.names():
        cls = STRATEGIES.get(n)
        if cls.unlearn is Strategy.unlearn or _default(n).driver_only() or cls.contract_exempt_reason:
            continue
        if runs_on(cls, ClassificationTask()):
            names.append(n)
    return names


#: settings that exercise every training branch of a strategy's unlearn() (dexperts' retain expert is off by default)
BRANCHES = {"dexperts": {"expert_epochs": 1}}


@pytest.mark.parametrize("name", _override_unlearn_but_use_the_runner())
def test_strategies_that_override_unlearn_step_only_inside_runner_run(name, digits_class):
    """Any strategy that is not declared driver-only but has its own unlearn() (locate-then-edit, inference-time
    experts, meta strategies, ...) takes every optimizer step inside the runner's run(), so under Ray Train they all
    happen in the workers. A global optimizer hook catches a step taken anywhere else (e.g. a LocalRunner made on
    the driver)."""
    b = digits_class
    depth = [0]
    runs = [0]
    outside: list[str] = []

    class SpyDistributedRunner(LocalRunner):
        distributed = True

        def run(self, strategy, ctx):
            runs[0] += 1
            depth[0] += 1
            try:
                return super().run(strategy, ctx)
            finally:
                depth[0] -= 1

    def hook(optimizer, args, kwargs):
        if depth[0] == 0:
            outside.append(type(optimizer).__name__)

    unlearner = ErasusUnlearner(b.original, strategy=name, selector=None, fraction=None, task=b.task, progress=False, epochs=2,
                                backend="ray_train", model_factory=b.model_factory, recipe=b.recipe, **BRANCHES.get(name, {}))
    unlearner.make_runner = SpyDistributedRunner
    handle = register_optimizer_step_pre_hook(hook)
    try:
        unlearner.fit(forget_data=b.forget, retain_data=b.retain)
    finally:
        handle.remove()
    assert runs[0] >= 1 and not outside, f"{name}: {len(outside)} optimizer step(s) outside runner.run ({runs[0]} runs)"


# --- 2 workers ----------------------------------------------------------------------------------------------------
def _registered_checkpoint_waiter():
    """``wait(storage, epoch=e)``: block until Ray Train's checkpoint-manager snapshot under ``storage`` names a
    checkpoint of epoch ``e`` (made inside a function so that cloudpickle ships it to the workers by value)."""

    def wait(storage: Path, *, epoch: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for snapshot in storage.glob("*/checkpoint_manager_snapshot.json"):
                try:
                    latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
                except (OSError, ValueError):  # being rewritten
                    continue
                if latest.get("metrics", {}).get("epoch", -1) >= epoch:
                    return
            time.sleep(0.2)
        raise AssertionError(f"no checkpoint of epoch {epoch} registered under {storage} after {timeout_s} s")

    return wait


def _id_recording_grad_diff(folder: Path):
    """A ``grad_diff`` that, in each Ray Train worker, appends to ``folder/<tag>-rank<r>.jsonl`` the forget and
    retain ids of the shard it was given (in ``setup``) and of every batch it steps on (in ``loss``); the objective
    is grad_diff's, unchanged. The class is made inside a function so that cloudpickle ships it by value."""
    from erasus_ray.strategies.grad_diff import GradDiff

    class Recording(GradDiff):
        def __init__(self, tag: str) -> None:
            super().__init__()
            self._tag = tag

        def _write(self, **ids) -> None:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{self._tag}-rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({k: [int(i) for i in v] for k, v in ids.items()}) + "\n")

        def setup(self, ctx):
            super().setup(ctx)
            self._write(setup_forget=ctx.forget.ids, shard_retain=ctx.retain.ids)

        def loss(self, ctx, forget, retain):
            self._write(batch_forget=forget.ids.tolist(), batch_retain=retain.ids.tolist())
            return super().loss(ctx, forget, retain)

    return Recording


def _ids_seen(folder: Path, tag: str, world: int) -> list[dict[str, set[int]]]:
    """Per rank: the union of each recorded kind of id (setup_forget, shard_retain, batch_forget, batch_retain)."""
    out = []
    for rank in range(world):
        kinds: dict[str, set[int]] = {}
        for line in (folder / f"{tag}-rank{rank}.jsonl").read_text().splitlines():
            for k, v in json.loads(line).items():
                kinds.setdefault(k, set()).update(v)
        out.append(kinds)
    return out


@pytest.mark.slow
def test_two_workers_unlearn_and_resume_after_a_killed_worker_to_the_uninterrupted_result(digits_class, ray_cluster, tmp_path):
    """Kill rank 1 right after it reported epoch 2; the restarted group resumes from the last checkpoint Ray Train
    registered (model, optimizer, report restored, retain stream replayed) and ends at the weights of an
    uninterrupted run (up to all-reduce rounding)."""
    b = digits_class
    marker, storage, seen = tmp_path / "killed-once", tmp_path / "train", tmp_path / "ids"
    _wait_for_registered_checkpoint = _registered_checkpoint_waiter()

    def kill_once(epoch, rank):
        if epoch == 2 and rank == 1 and not marker.exists():
            # Ray Train's controller registers a reported checkpoint when it next polls the workers; a worker that
            # dies before that poll leaves no checkpoint, and the restarted group (correctly) starts from epoch 0,
            # which is not the path under test. Die once the epoch-2 checkpoint is registered.
            _wait_for_registered_checkpoint(storage, epoch=2)
            marker.write_text("x")
            os._exit(1)  # the worker process dies mid-run

    from erasus_ray.runners.ray_train import RayTrainRunner

    Recording = _id_recording_grad_diff(seen)

    def fit(after_epoch, tag):
        unlearner = ErasusUnlearner(b.original, strategy=Recording(tag), selector="el2n", fraction=0.2, progress=False,
                                    retain_batch_size=64, epochs=4, backend="ray_train", num_workers=2, max_failures=2)
        unlearner.make_runner = lambda cfg: RayTrainRunner(cfg, num_workers=2, max_failures=2, after_epoch=after_epoch,
                                                           storage_path=str(storage))
        return unlearner.fit(forget_data=b.forget, retain_data=b.retain)

    res = fit(kill_once, "killed")
    assert marker.exists(), "the fault was injected"
    resumed = [h["resumed_from_epoch"] for h in res.report.history if "resumed_from_epoch" in h]
    assert resumed, res.report.history
    m = evaluate(res.model, forget=b.forget, retain=b.retain, test=b.test, gold=b.gold)
    assert m["forget_acc"] <= 0.6 and m["retain_acc"] >= 0.95  # 4 epochs: on its way (original forget acc 1.0)
    uninterrupted = fit(None, "uninterrupted")
    assert not any("resumed_from_epoch" in h for h in uninterrupted.report.history)
    assert res.report.steps == uninterrupted.report.steps, resumed
    _assert_same_weights(res.model, uninterrupted.model, atol=1e-6)

    # Both runs sharded the data by id: each rank stepped on its own part of the coreset (disjoint, together all of
    # it) and of the retain set - a run where every worker read the whole set fails here - while the strategy's
    # setup saw the whole coreset on every rank (so a saliency mask or a per-id table is the same on both ranks).
    # (4 steps x 64 retain samples per rank do not cover a rank's ~800 retain ids, hence "subset".)
    coreset, retain = set(uninterrupted.coreset.ids.tolist()), set(b.retain.ids.tolist())
    assert set(res.coreset.ids.tolist()) == coreset and len(coreset) > 2
    for tag in ("killed", "uninterrupted"):
        r0, r1 = _ids_seen(seen, tag, world=2)
        assert r0["setup_forget"] == r1["setup_forget"] == coreset, tag
        a, c = r0["batch_forget"], r1["batch_forget"]
        assert a and c and not a & c and a | c == coreset, (tag, "forget", len(a), len(c), len(coreset))
        a, c = r0["shard_retain"], r1["shard_retain"]
        assert a and c and not a & c and a | c == retain, (tag, "retain", len(a), len(c), len(retain))
        assert r0["batch_retain"] <= a and r1["batch_retain"] <= c, tag


@pytest.mark.slow
def test_two_workers_run_npo_on_the_authors_gpt2(ray_cluster):
    """A causal-LM strategy under Ray Train: NPO on the tiny GPT-2 of authors (ci variant, forget10), 2 workers."""
    from erasus_ray.benchmarks import load_benchmark
    from erasus_ray.experiment import JobConfig, run_job

    b = load_benchmark("authors", "forget10", 0, variant="ci")
    gold = evaluate(b.gold, forget=b.forget, retain=b.retain, test=b.test, task=b.task, seed=0)
    original = evaluate(b.original, forget=b.forget, retain=b.retain, test=b.test, task=b.task, gold_metrics=gold, seed=0)
    cfg = JobConfig.from_dict({"benchmark": "authors", "scenario": "forget10", "seed": 0, "strategy": "npo", "selector": None,
                               "fraction": 1.0, "benchmark_options": {"variant": "ci"},
                               "execution": {"backend": "ray_train", "num_workers": 2}})
    job = run_job(cfg, bench=b, gold_metrics=gold, progress=False, fraction=1.0)
    assert job["config"]["backend"] == "ray_train" and job["config"]["scaling"]["num_workers"] == 2
    assert job["report"]["steps"] > 0 and job["timings"]["unlearn"] > 0
    assert job["metrics"]["forget_loss"] > original["forget_loss"] + 0.5, "the forget answers lost their fit"
    assert job["metrics"]["avg_gap"] < original["avg_gap"], (job["metrics"]["avg_gap"], original["avg_gap"])
    assert [n for n, _ in job["result"].model.named_parameters()] == [n for n, _ in b.original.named_parameters()]


def test_bad_backend_arguments(digits_class):
    with pytest.raises(InvalidConfigError, match="backend"):
        ErasusUnlearner(digits_class.original, backend="spark")
    with pytest.raises(InvalidConfigError, match="num_workers"):
        ErasusUnlearner(digits_class.original, backend="ray_train", num_workers=0)


@pytest.mark.slow
def test_retries_exhausted_error_names_the_last_good_checkpoint(digits_class, ray_cluster, tmp_path):
    """A worker that dies every time after epoch 2, with no restarts allowed: a clear error naming the checkpoint
    of the last completed epoch."""
    from erasus_ray.errors import ErasusError
    from erasus_ray.runners.ray_train import RayTrainRunner

    from erasus_ray.runners.ray_train import STATE_FILE

    storage = tmp_path / "train"
    _wait_for_registered_checkpoint = _registered_checkpoint_waiter()

    def always_die(epoch, rank):
        if epoch == 2 and rank == 1:
            # die once Ray Train has registered epoch 2's checkpoint (before that, the last good one is epoch 1's)
            _wait_for_registered_checkpoint(storage, epoch=2)
            os._exit(1)

    b = digits_class
    unlearner = ErasusUnlearner(b.original, strategy="grad_diff", selector="el2n", fraction=0.2, progress=False, epochs=20,
                                retain_batch_size=64, backend="ray_train", num_workers=2, max_failures=0)
    unlearner.make_runner = lambda cfg: RayTrainRunner(cfg, num_workers=2, max_failures=0, after_epoch=always_die,
                                                       storage_path=str(storage))
    with pytest.raises(ErasusError, match=r"failed after 0 restart\(s\); last good checkpoint: (\S+) \(epoch 2\)") as err:
        unlearner.fit(forget_data=b.forget, retain_data=b.retain)
    named = Path(err.value.args[0].split("last good checkpoint: ")[1].split(" (epoch")[0])
    # Ray Train v2 also keeps checkpoint_manager_snapshot.json (rewritten after every registered checkpoint) in the
    # run folder: the error must name a checkpoint directory, not that file.
    assert named.is_dir() and named.parent.parent == storage and named.name.startswith("checkpoint_"), named
    state = torch.load(named / STATE_FILE, map_location="cpu", weights_only=False)
    assert state["epoch"] == 2 and state["report"]["epochs"] == 2 and not state.get("final"), "the last completed epoch"
    assert sorted(p.name for p in storage.glob("*/checkpoint_*") if p.is_file()) == ["checkpoint_manager_snapshot.json"]


def test_last_good_checkpoint_reads_ray_trains_snapshot_and_skips_files(tmp_path):
    """The rule behind the 'retries exhausted' error, on a hand-made run folder: the snapshot's latest registered
    checkpoint wins (even over a newer, unregistered upload); without a snapshot, the ``checkpoint_*`` directory with
    the highest saved epoch; never ``checkpoint_manager_snapshot.json`` itself or a directory without state."""
    from erasus_ray.runners.ray_train import STATE_FILE, last_good_checkpoint

    run = tmp_path / "run"
    for name, epoch in (("checkpoint_2026-01-01_00-00-01.000001", 1), ("checkpoint_2026-01-01_00-00-02.000001", 2),
                        ("checkpoint_2026-01-01_00-00-03.000001", 3)):
        (run / name).mkdir(parents=True)
        torch.save({"epoch": epoch, "report": {"epochs": epoch}}, run / name / STATE_FILE)
    (run / "checkpoint_2026-01-01_00-00-04.000001").mkdir()  # an upload that never wrote its state
    assert last_good_checkpoint(run) == (run / "checkpoint_2026-01-01_00-00-03.000001", 3)
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_2026-01-01_00-00-02.000001",
                                             "metrics": {"epoch": 2, "steps": 8}}}
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))  # newest file, as Ray leaves it
    assert last_good_checkpoint(run) == (run / "checkpoint_2026-01-01_00-00-02.000001", 2)
    assert last_good_checkpoint(tmp_path / "empty") is None


# --- the closed loop inside the workers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def wine():
    """A converged wine MLP (the closed loop's hard case, see tests/test_closed_loop.py), forgetting class 0."""
    from erasus_ray.benchmarks import load_benchmark

    return load_benchmark("wine", scenario="class", seed=0)


def test_ray_train_backend_runs_the_controller_unless_the_caller_fixed_epochs(wine, monkeypatch):
    """Without epochs/lr the unlearner hands RayTrainRunner a Controller (the class target, the adaptive coreset's plan)
    and the result is ``closed_loop`` with the controller's record; with ``epochs`` it is open-loop and verified once.
    (The workers are replaced by the in-process loop over the same controller here; the slow tests below run them.)"""
    from erasus_ray.control import ClosedLoopRunner
    from erasus_ray.runners.ray_train import RayTrainRunner

    seen = []

    def run(self, strategy, ctx):
        seen.append(self.closed_loop)
        if self.closed_loop is None:
            return LocalRunner(self.config).run(strategy, ctx)
        c = self.closed_loop
        inner = ClosedLoopRunner(self.config, c.control, c.target, c.probe, c.growth, original=c.original)
        report = inner.run(strategy, ctx)
        self.ran, self.record = True, inner.record
        return report

    monkeypatch.setattr(RayTrainRunner, "run", run)
    r = ErasusUnlearner(wine.original, backend="ray_train", num_workers=2, progress=False).fit(forget_data=wine.forget, retain_data=wine.retain)
    v = r.verification
    assert seen[-1] is not None and seen[-1].growth.adaptive and type(seen[-1].target).__name__ == "ClassTarget"
    assert v["mode"] == "closed_loop" and v["target"] == "class" and r.verified is True and v["verifications"] >= 1, v
    assert r.coreset.info["adaptive"] and r.coreset.info["growth"] == v["coreset_growth"]
    r = ErasusUnlearner(wine.original, backend="ray_train", epochs=2, selector=None, progress=False).fit(
        forget_data=wine.forget, retain_data=wine.retain)
    assert seen[-1] is None and r.verification["mode"] == "open_loop" and "lr_history" not in r.verification


def _weights_recording(base, folder: Path, **attrs):
    """``base`` (a strategy class, with class attributes ``attrs``) that saves each Ray Train rank's finished weights
    to ``folder/rank<r>.pt`` in ``finish`` (made inside a function so that cloudpickle ships it by value)."""

    class Recording(base):
        def finish(self, ctx):
            super().finish(ctx)
            import ray.train

            folder.mkdir(parents=True, exist_ok=True)
            rank = ray.train.get_context().get_world_rank()
            torch.save({k: v.detach().cpu() for k, v in ctx.model.state_dict().items()}, folder / f"rank{rank}.pt")

    for k, v in attrs.items():
        setattr(Recording, k, v)
    return Recording


def _ranks_agree(folder: Path, world: int, model) -> None:
    """Every rank ended with the same weights, and they are the weights the driver got."""
    saved = [torch.load(folder / f"rank{r}.pt") for r in range(world)]
    for other in saved[1:]:
        for k in saved[0]:
            assert torch.equal(saved[0][k], other[k]), f"ranks diverged at {k}"
    for k, v in model.state_dict().items():
        assert torch.equal(v.cpu(), saved[0][k]), k


@pytest.mark.slow
def test_closed_loop_in_two_workers_verifies_like_the_local_backend(wine, ray_cluster, tmp_path):
    """The defaults on the converged wine MLP, 2 workers: verified closed-loop on the same target and criteria as in
    process, forget accuracy within the class bound, the guard holding; verified several times on the way (not
    once at the end), and both ranks end with the driver's weights (they stayed in lockstep)."""
    from erasus_ray.evaluation.verification import set_stats
    from erasus_ray.strategies.grad_diff import GradDiff

    local = ErasusUnlearner(wine.original, progress=False).fit(forget_data=wine.forget, retain_data=wine.retain)
    unlearner = ErasusUnlearner(wine.original, strategy=_weights_recording(GradDiff, tmp_path / "w")(), progress=False,
                                backend="ray_train", num_workers=2)
    r = unlearner.fit(forget_data=wine.forget, retain_data=wine.retain)
    v, lv = r.verification, local.verification
    assert v["mode"] == "closed_loop" and r.verified is True and v["guard_ok"] is True, v
    assert (v["target"], v["why"]) == (lv["target"], lv["why"]) == ("class", lv["why"])
    assert [(c["name"], c["high"]) for c in v["criteria"]] == [(c["name"], c["high"]) for c in lv["criteria"]]
    bound = next(c["high"] for c in v["criteria"] if c["name"] == "forget_acc")
    assert set_stats(r.model, wine.task, wine.forget).acc <= bound
    steps = [h["step"] for h in r.report.history if "violation" in h]
    assert v["verifications"] > 1 and len(steps) == v["verifications"] and steps == sorted(set(steps)), r.report.history
    assert r.coreset.info["adaptive"] and v["final_fraction"] <= 0.5
    _ranks_agree(tmp_path / "w", 2, r.model)


@pytest.mark.slow
def test_closed_loop_guard_trips_restore_on_every_rank(wine, ray_cluster, tmp_path):
    """grad_diff without its loss cap at a starting lr of 30 (as tests/test_closed_loop.py's guard test), 2 workers:
    rank 0's guard trips; every rank restores the last good weights and halves the step; the result keeps retain
    accuracy within the guard and the ranks still agree."""
    from erasus_ray.control import ControlConfig
    from erasus_ray.evaluation.verification import Guard, set_stats
    from erasus_ray.strategies.grad_diff import GradDiff

    absurd = _weights_recording(GradDiff, tmp_path / "w", default_lr=30.0)(forget_loss_cap=None)
    control = ControlConfig(budget_steps=200, verify_every=4, max_lr=100.0)
    r = ErasusUnlearner(wine.original, strategy=absurd, selector=None, control=control, progress=False, backend="ray_train",
                        num_workers=2).fit(forget_data=wine.forget, retain_data=wine.retain)
    v = r.verification
    assert v["mode"] == "closed_loop" and v["guard_events"] and v["guard_events"][0]["lr"] == 15.0, v
    assert v["guard_ok"] is True
    assert set_stats(r.model, wine.task, wine.retain).acc >= 1.0 - Guard().max_acc_drop - 1e-9
    _ranks_agree(tmp_path / "w", 2, r.model)


@pytest.mark.slow
def test_closed_loop_resumes_from_its_window_checkpoint_to_the_uninterrupted_result(wine, ray_cluster, tmp_path):
    """Kill rank 1 once Ray Train registered the checkpoint of verification window 3: the restarted group resumes
    there (weights, last good and best weights, optimizer, coreset, stream positions, rank 0's controller state) and
    ends where an uninterrupted run ends: same steps, verifications and coreset growth, same weights."""
    from erasus_ray.runners.ray_train import RayTrainRunner

    marker, storage = tmp_path / "killed-once", tmp_path / "train"
    _wait_for_registered_checkpoint = _registered_checkpoint_waiter()

    def kill_once(window, rank):
        if window == 3 and rank == 1 and not marker.exists():
            _wait_for_registered_checkpoint(storage, epoch=3)
            marker.write_text("x")
            os._exit(1)

    def fit(after_window):
        unlearner = ErasusUnlearner(wine.original, progress=False, backend="ray_train", num_workers=2, max_failures=1)
        unlearner.make_runner = lambda cfg, controller=None: RayTrainRunner(
            cfg, num_workers=2, max_failures=1, after_epoch=after_window, storage_path=str(storage), closed_loop=controller,
            checkpoint_every_s=0)
        return unlearner.fit(forget_data=wine.forget, retain_data=wine.retain)

    res = fit(kill_once)
    assert marker.exists(), "the fault was injected"
    resumed = [h["resumed_from_step"] for h in res.report.history if "resumed_from_step" in h]
    assert resumed and resumed[0] > 0, res.report.history
    uninterrupted = fit(None)
    v, u = res.verification, uninterrupted.verification
    assert v["mode"] == u["mode"] == "closed_loop" and v["passed"] is u["passed"] is True
    assert (res.report.steps, v["verifications"], v["coreset_growth"]) == (uninterrupted.report.steps, u["verifications"], u["coreset_growth"])
    _assert_same_weights(res.model, uninterrupted.model, atol=1e-6)
