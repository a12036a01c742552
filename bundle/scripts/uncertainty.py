"""How unsure the served model is about a radiograph, and a cache of those scores, for choosing the next study to
label (MONAI Label's ``uncertainty`` strategy, the repository's scripts/monailabel_app.py).

The score is the entropy of the model's lung field under test-time contrast changes. The radiograph goes through the
network as it is and with its contrast changed by the gammas at the ends of the training augmentation's range
(``RandAdjustContrastd``, 0.7 and 1.5: changes the model was trained to ignore); per pixel, the probability of lung
field (lung or opacity, against background) is averaged over the three predictions, and the score is the mean binary
entropy (bits, 0 to 1) of that average over the lung field (average at least ``LUNG_FIELD_PROBABILITY``). A model
sure of where the lungs are, whatever the contrast, scores near 0; a blurred border, a border that moves with the
contrast, or lungs only half believed in raise it. A radiograph with no lung field at all scores 1, the most in
need of a label.

Chosen on measurements made for issue #16: on 10 real radiographs (cohen-cxr, COVID-QU-Ex) with
the shipped weights, plain ones score 0.08-0.19 and the same radiographs heavily blurred or contrast-flattened with
noise 0.25-0.52; on phantoms with the phantom model, plain 0.30-0.37 and blurred (Gaussian, 10 pixels) 0.41-0.43.
The 3-class softmax entropy of a single prediction separated neither as well (real: 0.21-0.37 plain, 0.36-0.57
degraded; phantoms: about 0.6 on every image, lung and opacity confused everywhere), nor did the plain disagreement
between the three predictions on real radiographs. Opacity against clear lung is therefore not scored.

The network, its input pre-processing and inferer are the bundle's own, read from the served inference config with
MONAI's ConfigParser, with the served weights; one batch of 3 images per study, at the network's input size.
A study the bundle's reader cannot read gets no score but the reader's message, so it is never proposed.
Scores are cached in a JSON file, keyed by the study's path; a score holds while the study's size and modification
time are the same, and is current while the served weights' size and modification time (and the inference config)
are those it was computed with. A score by earlier weights is used only when asked for (``stale``: while a
background pass rescoring after new weights has not reached the study).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from monai.transforms import AdjustContrast

from scripts.checkpoints import state_dict_of
from scripts.label_io import write_json

logger = logging.getLogger(__name__)

LUNG_FIELD_PROBABILITY = 0.25  # P(lung) + P(opacity) from which a pixel counts as lung field
CONTRAST_GAMMAS = (0.7, 1.5)  # train.yaml's RandAdjustContrastd range
CACHE_VERSION = 1


@dataclass(frozen=True)
class StudyScore:
    """A study's uncertainty (None when it could not be read) and, then, why."""

    score: float | None
    error: str = ""


def lung_field_entropy(probabilities: torch.Tensor, lung_field_probability: float = LUNG_FIELD_PROBABILITY) -> float:
    """Mean binary entropy (bits) of the lung-field probability averaged over the (views, classes, H, W) softmax
    ``probabilities`` of one radiograph (class 0 background), over the pixels where that average is at least
    ``lung_field_probability``; 1.0 when there are none."""
    lung_field = 1.0 - probabilities[:, 0].mean(dim=0)
    inside = lung_field[lung_field >= lung_field_probability]
    if inside.numel() == 0:
        return 1.0
    inside = inside.clamp(1e-7, 1.0 - 1e-7)
    entropy = -(inside * torch.log2(inside) + (1.0 - inside) * torch.log2(1.0 - inside))
    return float(entropy.mean())


def weights_fingerprint(weights: Path, config: Path) -> str:
    """What makes cached scores valid: the weights' size and modification time and the config's content."""
    status = os.stat(weights)
    config_digest = hashlib.sha256(Path(config).read_bytes()).hexdigest()[:16]
    return f"{status.st_size}:{status.st_mtime_ns}:{config_digest}"


class UncertaintyScorer:
    """The served bundle's pre-processing, network and inferer (``<bundle>/configs/<config_name>``, weights
    ``<bundle>/models/model.pt``), scoring one radiograph at a time; the weights are reloaded when their file
    changes (a retraining round published new ones)."""

    def __init__(self, bundle: str | Path, config_name: str = "inference.yaml", device: str | None = None):
        from monai.bundle import ConfigParser

        self.bundle = Path(bundle)
        self.config = self.bundle / "configs" / config_name
        self.weights = self.bundle / "models" / "model.pt"
        parser = ConfigParser()
        parser.read_config(str(self.config))
        parser["bundle_root"] = str(self.bundle)
        if device is not None:
            parser["device"] = device
        self.device = torch.device(parser.get_parsed_content("device"))
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        self.network = parser.get_parsed_content("network_def").to(self.device).eval()
        self.image_key = "image"
        self._loaded: str | None = None
        self.lock = threading.RLock()  # one radiograph at a time through the network

    def fingerprint(self) -> str:
        return weights_fingerprint(self.weights, self.config)

    def _load_weights(self) -> str:
        fingerprint = self.fingerprint()
        if fingerprint != self._loaded:
            checkpoint = torch.load(self.weights, map_location=self.device, weights_only=True)
            self.network.load_state_dict(state_dict_of(checkpoint))
            self._loaded = fingerprint
            logger.info(f"uncertainty scorer: weights {self.weights} loaded")
        return fingerprint

    def score(self, path: str | Path) -> tuple[StudyScore, str]:
        """The uncertainty of the radiograph at ``path`` (its error when the bundle's reader cannot read it), and
        the fingerprint of the weights that gave it."""
        with self.lock:
            model = self._load_weights()
            try:
                image = self.preprocessing({self.image_key: str(path)})[self.image_key]
            except Exception as error:  # noqa: BLE001 - a study the pre-processing fails on is not proposed either
                return StudyScore(None, f"{path}: cannot be pre-processed: {type(error).__name__}: {error}"), model
            error = (getattr(image, "meta", None) or {}).get("error")
            if error:
                return StudyScore(None, str(error)), model
            plain = (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()
            views = [plain] + [AdjustContrast(gamma)(plain) for gamma in CONTRAST_GAMMAS]
            with torch.no_grad():
                logits = self.inferer(torch.stack(views).to(self.device), self.network)
            probabilities = torch.softmax(logits.float(), dim=1).cpu()
            return StudyScore(lung_field_entropy(probabilities)), model


def _study_stamp(path: str) -> list[int]:
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


class ScoreCache:
    """Study scores in a JSON file: ``{"version": 1, "studies": {path: {"stamp": [size, mtime_ns], "model":
    weights fingerprint, "score": float|null, "error": str}}}``. An entry holds while the study's stamp matches and
    is current while its model is the served one; safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        self._lock = threading.RLock()
        try:
            stored = json.loads(self.path.read_text())
            if stored.get("version") == CACHE_VERSION and isinstance(stored.get("studies"), dict):
                self.entries = stored["studies"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as error:
            logger.warning(f"uncertainty cache {self.path} unreadable ({error}); scoring again")

    def lookup(self, study: str, model: str) -> tuple[StudyScore | None, bool]:
        """(the cached score of ``study``, whether it is of ``model``); (None, False) when the study changed or
        has no entry."""
        try:
            stamp = _study_stamp(study)
        except OSError:
            return None, False
        with self._lock:
            entry = self.entries.get(study)
        if not entry or entry.get("stamp") != stamp:
            return None, False
        return StudyScore(entry.get("score"), entry.get("error", "")), entry.get("model") == model

    def put(self, study: str, model: str, result: StudyScore, stamp: list[int]) -> None:
        with self._lock:
            self.entries[study] = {"stamp": stamp, "model": model, **asdict(result)}

    def keep_only(self, studies) -> None:
        """Forget the studies not in ``studies`` (labelled or removed since)."""
        wanted = set(studies)
        with self._lock:
            self.entries = {study: entry for study, entry in self.entries.items() if study in wanted}

    def save(self) -> None:
        with self._lock:
            write_json(str(self.path), {"version": CACHE_VERSION, "studies": self.entries})


def _score_now(study: str, scorer: UncertaintyScorer, cache: ScoreCache) -> tuple[StudyScore | None, bool]:
    """Score ``study`` and cache it, unless another thread just did; (its score, or None when the file is gone;
    whether it was computed here)."""
    with scorer.lock:
        cached, current = cache.lookup(study, scorer.fingerprint())
        if cached is not None and current:
            return cached, False
        try:
            stamp = _study_stamp(study)
        except OSError:
            return None, False
        result, model = scorer.score(study)
        cache.put(study, model, result, stamp)
    if result.score is None:
        logger.warning(f"uncertainty: {study} cannot be read, never proposed: {result.error}")
    return result, True


def score_studies(studies, scorer: UncertaintyScorer, cache: ScoreCache, stale: bool = False) -> dict:
    """{study path: StudyScore} of ``studies``: from ``cache`` when it holds the study's score by the served
    weights (or, with ``stale``, by earlier weights), else computed and cached (the cache is then saved).
    A study that disappears meanwhile is left out."""
    model = scorer.fingerprint()
    scores, computed = {}, 0
    for study in studies:
        cached, current = cache.lookup(study, model)
        if cached is None or not (current or stale):
            cached, was_computed = _score_now(study, scorer, cache)
            computed += was_computed
        if cached is not None:
            scores[study] = cached
    if computed:
        cache.save()
    return scores


def most_uncertain(scores: dict[str, StudyScore]) -> str | None:
    """The readable study with the highest score (ties: the first path in sorted order), or None."""
    readable = [(-result.score, study) for study, result in scores.items() if result.score is not None]
    return min(readable)[1] if readable else None
