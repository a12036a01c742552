"""The check that retrained weights are not worse than the served ones before they replace them.

Both weights are measured on one fixed reference set, built when training starts:

* ``held_out``: labelled studies not trained on in this round (the validation split);
* ``training``: this round's training labels (the annotators' corrections; the new weights saw them, so they catch a
  round that failed to learn them, not over-fitting);
* ``unlabelled``: when fewer than ``min_held_out`` labelled studies are held out (2 corrected labels leave none), up
  to ``max_unlabelled`` studies without a label, on which the new weights' masks are compared with the served
  weights' own masks (a consistency reference: corrections of a few studies should barely move the masks of others).

Figures (higher is better unless noted; each the mean over the studies it applies to, NaN where none does):

* ``<set>_lung_dice``: Dice of the predicted lung field (clear lung + opacity) with the label's;
* ``<set>_opacity_dice``: opacity Dice on studies whose opacity was annotated and is present;
* ``<set>_clear_lung_false_opacity``: predicted opacity as a share of the predicted lung on studies annotated clear
  (lower is better);
* ``unlabelled_lung_agreement``: the lowest, over the unlabelled studies, Dice of the lung field with the served
  weights' (the served weights score 1);
* ``unlabelled_opacity_change``: the mean, over the unlabelled studies, change of the opacity share of the lung from
  the served weights' (the served weights score 0; lower is better): without labels a change of opacity cannot be
  called better or worse, so this only bounds how far a round may move the opacity (and severity) of other studies.

Rule: the new weights are published only when no figure is worse than the served weights' by more than its
tolerance (:data:`DEFAULT_TOLERANCES`); a figure either set of weights cannot measure is left out.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from scripts.labels import BACKGROUND, LUNG_UNANNOTATED, OPACITY
from scripts.radiograph_io import SUPPORTED_EXTENSIONS
from scripts.validation_metrics import dice, opacity_share

logger = logging.getLogger(__name__)

# figure -> (allowed worsening, True when higher is better)
DEFAULT_TOLERANCES = {
    "lung_dice": 0.005,
    "opacity_dice": 0.005,
    "clear_lung_false_opacity": 0.005,
    "unlabelled_lung_agreement": 0.015,
    "unlabelled_opacity_change": 0.05,
}
HIGHER_IS_BETTER = {"lung_dice", "opacity_dice", "unlabelled_lung_agreement"}
LABELLED_SETS = ("held_out", "training")


@dataclass
class ReferenceStudy:
    """One study of the reference set: its network input (1, H, W), label map at the same size or None, and role."""

    name: str
    role: str  # "held_out", "training" or "unlabelled"
    image: torch.Tensor
    label: torch.Tensor | None = None


@dataclass
class GateDecision:
    """Whether the candidate weights may replace the served ones, and the figures behind it."""

    publish: bool
    reason: str
    served: dict = field(default_factory=dict)
    candidate: dict = field(default_factory=dict)
    worse: list = field(default_factory=list)  # the figures that failed the rule, as sentences
    reference: dict = field(default_factory=dict)  # role -> study names

    def as_dict(self) -> dict:
        return {"publish": self.publish, "reason": self.reason, "worse": self.worse,
                "served": self.served, "candidate": self.candidate, "reference": self.reference}  # fmt: skip


def labelled_figures(predicted: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-study figures of a predicted class map against a label map (values of :mod:`scripts.labels`)."""
    figures = {"lung_dice": dice(predicted != BACKGROUND, labels != BACKGROUND)}
    if bool((labels == LUNG_UNANNOTATED).any()):
        return figures  # opacity not annotated
    if bool((labels == OPACITY).any()):
        figures["opacity_dice"] = dice(predicted == OPACITY, labels == OPACITY)
    elif bool((labels != BACKGROUND).any()):
        figures["clear_lung_false_opacity"] = opacity_share(predicted)
    return figures


def tolerance_of(figure: str, tolerances: dict) -> tuple[float, bool]:
    """(allowed worsening, higher is better) of a figure name such as ``held_out_lung_dice``."""
    for name in sorted(tolerances, key=len, reverse=True):
        if figure == name or figure.endswith("_" + name):
            return float(tolerances[name]), name in HIGHER_IS_BETTER
    raise KeyError(f"no tolerance for figure {figure!r}")


def compare(served: dict, candidate: dict, tolerances: dict) -> list[str]:
    """The figures on which ``candidate`` is worse than ``served`` by more than the tolerance, as sentences."""
    worse = []
    for figure, before in served.items():
        after = candidate.get(figure, math.nan)
        if math.isnan(before) or math.isnan(after):
            continue
        allowed, higher_is_better = tolerance_of(figure, tolerances)
        change = after - before if higher_is_better else before - after
        if change < -allowed - 1e-12:
            worse.append(f"{figure} {before:.4f} -> {after:.4f} (allowed {'-' if higher_is_better else '+'}{allowed})")
    return worse


def unlabelled_images(folders: list[str], exclude: set[str], limit: int) -> list[str]:
    """Up to ``limit`` radiographs directly in ``folders`` whose real path is not in ``exclude``, spread evenly by
    name."""
    found = set()
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.lower().endswith(SUPPORTED_EXTENSIONS) and os.path.isfile(path):
                if os.path.realpath(path) not in exclude:
                    found.add(path)
    ordered = sorted(found)
    if len(ordered) <= limit:
        return ordered
    step = len(ordered) / limit
    return [ordered[int(index * step)] for index in range(limit)]


class PublishGate:
    """Measures weights on the reference set and decides whether candidate weights may replace the served ones.

    Custom: neither MONAI nor MONAI Label compares a retrained model with the one it would replace.

    Args:
        network: the trained network (its copy, never the network itself, is loaded with the weights measured).
        labelled_transform: image + label -> network input and label map at the same size (validate#preprocessing).
        image_transform: image -> network input (the loader and ``network_input``).
        held_out: labelled studies ({"image", "label"}) not trained on (the validation data).
        training: this round's training data ({"image", "label"}).
        unlabelled: studies without a label for the consistency reference: a list of paths, a folder, or None for the
            radiographs beside the training and held-out images that have no label in this round.
        min_held_out: with at least this many held-out labelled studies the unlabelled studies are not used.
        max_unlabelled: the most unlabelled studies used (spread evenly by name).
        tolerances: allowed worsening per figure (:data:`DEFAULT_TOLERANCES`, which missing keys take).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        labelled_transform,
        image_transform,
        held_out: list | None = None,
        training: list | None = None,
        unlabelled: list | str | None = None,
        min_held_out: int = 4,
        max_unlabelled: int = 16,
        tolerances: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        self.network, self.device = network, torch.device(device)
        self.labelled_transform, self.image_transform = labelled_transform, image_transform
        self.held_out, self.training, self.unlabelled = list(held_out or []), list(training or []), unlabelled
        self.min_held_out, self.max_unlabelled = int(min_held_out), int(max_unlabelled)
        self.tolerances = {**DEFAULT_TOLERANCES, **(tolerances or {})}
        self._studies: list[ReferenceStudy] | None = None
        self._served_masks: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------ the reference set
    def _unlabelled_paths(self) -> list[str]:
        labelled = self.held_out + self.training
        if isinstance(self.unlabelled, (list, tuple)):
            return [str(path) for path in self.unlabelled][: self.max_unlabelled]
        exclude = {os.path.realpath(str(item["image"])) for item in labelled}
        if isinstance(self.unlabelled, str):
            folders = [self.unlabelled]
        else:
            folders = sorted({os.path.dirname(os.path.abspath(str(item["image"]))) for item in labelled})
        return unlabelled_images(folders, exclude, self.max_unlabelled)

    def _load(self, transform, item: dict, role: str) -> ReferenceStudy | None:
        name = os.path.basename(str(item["image"]))
        try:
            loaded = transform(dict(item))
        except Exception as error:  # noqa: BLE001 - an unreadable study leaves the reference set, with a warning
            logger.warning(f"publish gate: {name} left out of the reference set ({type(error).__name__}: {error})")
            return None
        label = loaded.get("label")
        label = torch.as_tensor(label).round().to(torch.uint8)[0] if label is not None else None
        return ReferenceStudy(name, role, torch.as_tensor(loaded["image"]).float(), label)

    def studies(self) -> list[ReferenceStudy]:
        """The reference set, loaded once."""
        if self._studies is None:
            studies = [self._load(self.labelled_transform, item, "held_out") for item in self.held_out]
            studies += [self._load(self.labelled_transform, item, "training") for item in self.training]
            if len(self.held_out) < self.min_held_out:
                paths = self._unlabelled_paths()
                studies += [self._load(self.image_transform, {"image": path}, "unlabelled") for path in paths]
            self._studies = [study for study in studies if study is not None]
        return self._studies

    def reference(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        for study in self.studies():
            names.setdefault(study.role, []).append(study.name)
        return names

    # ---------------------------------------------------------------------------------------------- measurement
    def _network_with(self, weights: dict) -> torch.nn.Module:
        network = self.network.module if hasattr(self.network, "module") else self.network
        copied = copy.deepcopy(network).to(self.device)
        copied.load_state_dict(weights)
        return copied.eval()

    @torch.no_grad()
    def predict(self, weights: dict) -> dict[str, torch.Tensor]:
        """The class map (H, W) of every reference study under ``weights`` (a state dict)."""
        network = self._network_with(weights)
        predictions = {}
        for study in self.studies():
            logits = network(study.image[None].to(self.device))
            predictions[f"{study.role}/{study.name}"] = logits.argmax(1)[0].cpu()
        return predictions

    def figures(self, predictions: dict[str, torch.Tensor], served: dict[str, torch.Tensor] | None = None) -> dict:
        """The figures of one set of predictions; ``served``: the served weights' predictions (None: these are)."""
        served = predictions if served is None else served
        values: dict[str, list[float]] = {}
        for study in self.studies():
            key = f"{study.role}/{study.name}"
            predicted = predictions[key]
            if study.label is not None:
                for name, value in labelled_figures(predicted, study.label).items():
                    values.setdefault(f"{study.role}_{name}", []).append(value)
            else:
                reference = served[key]
                agreement = dice(predicted != BACKGROUND, reference != BACKGROUND)
                change = abs(opacity_share(predicted) - opacity_share(reference))
                values.setdefault("unlabelled_lung_agreement", []).append(agreement)
                values.setdefault("unlabelled_opacity_change", []).append(change)
        figures = {}
        for name, series in values.items():
            if name == "unlabelled_lung_agreement":
                figures[name] = min(series)
            else:
                figures[name] = sum(series) / len(series)
        return figures

    def decide(self, served_weights: dict | None, candidate_weights: dict) -> GateDecision:
        """Measure both weights and apply the rule; ``served_weights`` None (nothing served yet) publishes."""
        reference = self.reference()
        candidate_predictions = self.predict(candidate_weights)
        if served_weights is None:
            candidate = self.figures(candidate_predictions)
            return GateDecision(True, "no served weights to compare with", {}, candidate, [], reference)
        served_predictions = self.predict(served_weights)
        served = self.figures(served_predictions)
        candidate = self.figures(candidate_predictions, served_predictions)
        worse = compare(served, candidate, self.tolerances)
        if not any(not math.isnan(value) for value in served.values()):
            return GateDecision(
                True, "the reference set is empty: nothing to compare", served, candidate, [], reference
            )
        if worse:
            return GateDecision(False, "worse than the served weights: " + "; ".join(worse), served, candidate, worse,
                                reference)  # fmt: skip
        return GateDecision(True, "not worse than the served weights on the reference set", served, candidate, [],
                            reference)  # fmt: skip
