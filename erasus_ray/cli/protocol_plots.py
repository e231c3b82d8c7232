"""Plots of a protocol run (matplotlib, Agg): MIA ROC curves, the forgetting-vs-utility scatter, truth-ratio
histograms. Each is written atomically as PNG under the run's output folder.

Cost: one no-grad forward pass over forget and test per model (ROC); with paraphrased items, ``1 + K`` passes over
the forget set per model (truth ratios).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from erasus_ray.evaluation.metrics import METRICS, MetricOptions
from erasus_ray.evaluation.protocols import PROTOCOLS, BenchmarkReport
from erasus_ray.evaluation.protocols.base import StandIn
from erasus_ray.evaluation.protocols.tofu_data import PARAPHRASED
from erasus_ray.evaluation.stats import set_stats
from erasus_ray.tasks import Capability
from erasus_ray.utils.atomic import atomic_savefig


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attack_scores(model: nn.Module, standin: StandIn) -> tuple[str, np.ndarray, np.ndarray]:
    """(attack name, member scores, non-member scores): Min-K%++ where the task has tokens, else LOSS."""
    task = standin.bench.task
    if task.provides(Capability.TOKENS):
        column = {"minkpp": METRICS.column("minkpp", MetricOptions(), model)}
        f, t = (set_stats(model, task, d, task.eval_batch_size, column) for d in (standin.forget, standin.test))
        return "Min-K%++", np.asarray(f.columns["minkpp"]), np.asarray(t.columns["minkpp"])
    f, t = (set_stats(model, task, d, task.eval_batch_size) for d in (standin.forget, standin.test))
    return "LOSS", -f.loss, -t.loss


def plot_roc(models: dict[str, nn.Module], standin: StandIn, path: Path) -> None:
    """Membership ROC curve of every model, forget (members) vs held-out (non-members)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    for label, model in models.items():
        name, members, nonmembers = attack_scores(model, standin)
        y = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
        s = np.r_[members, nonmembers]
        keep = np.isfinite(s)
        fpr, tpr, _ = roc_curve(y[keep], s[keep])
        ax.plot(fpr, tpr, label=f"{label} (AUC {roc_auc_score(y[keep], s[keep]):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"MIA ROC ({name}): forget vs held-out")
    ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_tradeoff(protocol: str, reports: dict[str, BenchmarkReport], path: Path) -> None:
    """The protocol's forgetting metric vs its utility metric, one point (mean +- std over runs) per row."""
    x_key, y_key = PROTOCOLS.get(protocol).tradeoff
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, r in reports.items():
        if x_key in r.metrics and y_key in r.metrics:
            ax.errorbar(r.metrics[x_key], r.metrics[y_key], xerr=r.std.get(x_key, 0), yerr=r.std.get(y_key, 0),
                        fmt="o", capsize=3, label=f"{label} ({r.verdict})")
    ax.set(xlabel=x_key, ylabel=y_key, title=f"{protocol}: forgetting vs utility")
    ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_truth_ratios(models: dict[str, nn.Module], standin: StandIn, gold: nn.Module, path: Path) -> None:
    """Histograms of log truth ratio on the forget set: every model against the gold model (TOFU's forget quality
    is the KS test between exactly these two samples)."""
    from erasus_ray.evaluation.protocols.tofu import truth_ratios

    task = standin.bench.task
    gold_r = np.log(truth_ratios(gold, task, standin.forget, split="forget"))
    others = {k: m for k, m in models.items() if m is not gold}
    plt = _pyplot()
    fig, axes = plt.subplots(1, max(1, len(others)), figsize=(3.2 * max(1, len(others)), 3), squeeze=False)
    bins = np.linspace(min(gold_r.min(), -6), max(gold_r.max(), 3), 25)
    for ax, (label, model) in zip(axes[0], others.items()):
        ax.hist(gold_r, bins=bins, alpha=0.5, label="gold")
        ax.hist(np.log(truth_ratios(model, task, standin.forget, split="forget")), bins=bins, alpha=0.5, label=label)
        ax.set(title=label, xlabel="log truth ratio")
        ax.legend(fontsize=7)
    atomic_savefig(fig, path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_all(protocol: str, reports: dict[str, BenchmarkReport], models: dict[str, nn.Module], standin: StandIn,
             gold: nn.Module, out: Path) -> None:
    """Every plot that applies: ROC (a held-out split given), trade-off, truth ratios (paraphrased items given)."""
    if standin.test is not None:
        plot_roc(models, standin, out / "mia_roc.png")
    plot_tradeoff(protocol, reports, out / "tradeoff.png")
    first = standin.forget[0][1] if len(standin.forget) else None
    if isinstance(first, dict) and PARAPHRASED in first:
        plot_truth_ratios(models, standin, gold, out / "truth_ratio_hist.png")


__all__ = ["attack_scores", "plot_all", "plot_roc", "plot_tradeoff", "plot_truth_ratios"]
