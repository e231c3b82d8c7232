"""What a task adapter can give an algorithm, and the one check that an algorithm gets what it needs.

The contract is loss-first: the one thing every task gives is a per-sample objective (``loss``). Everything else is
an optional, declared capability. Strategies, selectors and metrics declare the capabilities they need in a
``requires`` class attribute; :func:`erasus_ray.tasks.registry.require` compares them with the task's ``capabilities`` once, at construction
or at the start of ``fit``, and fails with one error that names the algorithm, the task, what is missing and which
registered tasks would provide it. Nothing outside ``erasus_ray/tasks/`` asks a task for its name or its class.

Capabilities are an enum, and every declaration is parsed through :func:`capability_set`, so a misspelt
capability fails when the class is defined instead of silently meaning "supported".
"""

from __future__ import annotations

import difflib
from enum import Enum
from typing import Iterable

from erasus_ray.errors import InvalidConfigError, TaskMismatchError


class Capability(str, Enum):
    """One thing a task adapter can provide beyond its per-sample objective."""

    #: A per-sample objective, batched (:meth:`Task.forward` ``.sample_loss()``) and in the fixed-shape form
    #: ``torch.func`` needs (:meth:`Task.dense_sample_loss`). Mandatory: every task declares it.
    LOSS = "loss"
    #: Categorical predictions: logits over prediction units, their targets and owners (``TaskOutput.logits``),
    #: so log-likelihoods, accuracies, EL2N errors and Gauss-Newton units (``dense_units``) exist.
    LOGITS = "logits"
    #: A class label per sample (``Task.labels_of``, and ``Task.relabel`` to give a batch other labels): class-level
    #: forgetting targets, class-balanced selection, label preference pairs.
    LABELS = "labels"
    #: Penultimate features per sample (``Task.features``), for geometry selectors and representation metrics.
    FEATURES = "features"
    #: A head module whose input is the feature (``Task.head_module``), for last-layer influence / representers.
    HEAD = "head"
    #: A sample's objective does not depend on the other samples of its batch, so it can be evaluated alone
    #: (per-sample gradients under ``vmap``). False for an in-batch contrastive loss.
    INDEPENDENT = "independent"
    #: Token sequences with a tokenizer and a prompt/answer split (``Task.prompts``, ``Task.tokenizer``), for
    #: strategies that edit tokens or build text of their own (token masking, refusal answers, preference pairs).
    TOKENS = "tokens"
    #: Generation from a prompt (``model.generate``) and text metrics over what is generated (ROUGE, ...).
    GENERATION = "generation"
    #: A continuous input that perturbation methods may corrupt or optimise: a classifier's one input tensor
    #: (``model_inputs`` is ``((x,), {})``), an LM's input token embeddings (DeepFool, causal tracing).
    INPUT = "input"
    #: The model's own output carries the logits (a tensor, or an object with ``.logits``), so a method may wrap the
    #: model and edit its output logits (offset / expert-ensemble methods). A two-tower model returns embeddings and
    #: its logits are formed by the task, so it does not declare this.
    MODEL_LOGITS = "model_logits"
    #: A conditional denoiser with a null condition (classifier-free guidance): the noised inputs of a batch's draws,
    #: the model's noise prediction on any noised input under any class or the null class, and class-conditional
    #: sampling (``Task.noised``, ``Task.predict_noise``, ``Task.sample``): concept-erasure methods (ESD, concept
    #: ablation) and generation metrics.
    GUIDANCE = "guidance"
    #: Separate vision and text parameter groups (``Task.tower_parameters``: a two-tower model's image and text
    #: towers, a generative VLM's vision tower + projector and its language model), for methods that unlearn in one
    #: modality with the other frozen.
    TOWERS = "towers"
    #: Image and text embeddings of each sample's own pair in one joint space (``Task.pair_embeddings``), for methods
    #: that push forget pairs apart there (contrastive unlearning, modality decoupling).
    JOINT_SPACE = "joint_space"
    #: A prompt-conditioned denoiser (Stable-Diffusion shaped): text embeddings of any prompt from the model's own
    #: text encoder (``Task.encode_prompts``) and the cross-attention modules whose key/value projections read them
    #: (``Task.cross_attention_modules``): methods that edit cross-attention (ESD-x, UCE).
    TEXT_CONDITION = "text_condition"

    def __str__(self) -> str:
        return self.value

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING: dict[Capability, str] = {
    Capability.LOSS: "a per-sample objective",
    Capability.LOGITS: "categorical predictions (logits over prediction units and their targets)",
    Capability.LABELS: "a class label per sample",
    Capability.FEATURES: "penultimate features per sample",
    Capability.HEAD: "a head module on top of the features",
    Capability.INDEPENDENT: "a per-sample objective that does not depend on the other samples of the batch",
    Capability.TOKENS: "token sequences with a prompt/answer split",
    Capability.GENERATION: "generation from a prompt",
    Capability.INPUT: "a continuous input to perturb (a classifier's input tensor, an LM's token embeddings)",
    Capability.MODEL_LOGITS: "logits in the model's own output (so a wrapper can edit them)",
    Capability.GUIDANCE: "conditional and null-condition noise predictions and class-conditional sampling (a diffusion model)",
    Capability.TOWERS: "separate vision and text parameter groups (a two-tower or vision-language model)",
    Capability.JOINT_SPACE: "image and text embeddings of each sample's pair in one joint space (a two-tower model)",
    Capability.TEXT_CONDITION: "prompt conditioning through cross-attention (text embeddings and the cross-attention "
                               "projections that read them: a text-to-image diffusion model)",
}


class CapabilityError(TaskMismatchError):
    """An algorithm needs a capability the task does not declare (see :func:`require`)."""


def capability_set(values: Iterable[Capability | str], owner: str = "declaration") -> frozenset[Capability]:
    """Parse a declaration (enum members or their names) into a frozenset; a misspelt name is an
    :class:`InvalidConfigError` naming ``owner`` and the known capabilities (so a typo fails at class definition)."""
    if isinstance(values, (str, Capability)):
        values = [values]
    out = set()
    known = [c.value for c in Capability]
    for value in values:
        try:
            out.add(Capability(value))
        except ValueError:
            close = difflib.get_close_matches(str(value), known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise InvalidConfigError(
                f"{owner}: unknown capability {value!r}.{hint} Known capabilities: {', '.join(known)}"
            ) from None
    return frozenset(out)


__all__ = ["Capability", "CapabilityError", "capability_set"]
