"""The MONAI Label app that serves the bundle (runs in MONAI Label's environment; docs/monailabel.md).

scripts/serve_monailabel.py writes the app's ``main.py``, which puts the served bundle (its ``scripts`` package) and
this folder on the Python path and imports :class:`CxrLungOpacityApp`; MONAI Label loads the class from there. It
lives here, not in the bundle, as it needs MONAI Label, which the bundle does not depend on. Against MONAI Label's
``monaibundle`` sample app it adds:

* the active-learning strategy ``uncertainty``: the unlabelled study the served model is least sure about
  (the bundle's ``scripts.uncertainty``), scores cached in ``<app>/uncertainty_scores.json`` and kept current by a
  background pass while the server runs; a study that cannot be read is never proposed;
* ``/infer`` on a study that cannot be read answers HTTP 422 naming the file and the problem (404 for an unknown
  study id) instead of a bare 500;
* ``train_stats`` in ``/info``: each round started by the server writes ``models/train_stats.json`` (the bundle's
  ``scripts.monailabel_train_stats``); the publish decision (``models/publish_record.json``) is shown with it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import strtobool

from scripts.monailabel_train_stats import read_stats
from scripts.uncertainty import ScoreCache, UncertaintyScorer, most_uncertain, score_studies

logger = logging.getLogger(__name__)

UNCERTAINTY = "uncertainty"
SCORES_FILE = "uncertainty_scores.json"
TRAIN_STATS_FILE = "train_stats.json"
PUBLISH_RECORD_FILE = "publish_record.json"  # written by the publish gate (scripts.published_weights)
DEFAULT_REFRESH_S = 30.0


def served_bundles(app_dir: str, conf: dict) -> dict[str, str]:
    """{model name: bundle folder} of the names in ``conf["models"]``, each a bundle under ``<app_dir>/model``
    (no model-zoo download)."""
    names = [name.strip() for name in str(conf.get("models", "")).split(",") if name.strip()]
    if not names:
        raise ValueError("no model to serve: start the server with --conf models <bundle name>")
    bundles = {name: os.path.join(app_dir, "model", name) for name in names}
    missing = [path for path in bundles.values() if not os.path.isfile(os.path.join(path, "configs", "metadata.json"))]
    if missing:
        raise FileNotFoundError(f"no bundle at {', '.join(missing)}")
    return bundles


class UncertaintyStrategy(Strategy):
    """Propose the unlabelled study (no ``final`` label) with the highest uncertainty score of the served model.

    The scorer (the bundle's network, built on first use) and the score cache are shared by requests and the
    background pass; a study is scored once per version of its file and of the served weights. While a background
    pass runs (``background``), a request takes a study's score by earlier weights until the pass has rescored it,
    and scores itself only the studies with no score (new or changed files), so it does not wait for the pass.
    """

    def __init__(self, bundle: str, scores_file: str, chunk: int = 16):
        super().__init__(
            "Unlabelled study the served model is least sure about: entropy of its lung field under test-time "
            "contrast changes; unreadable studies are never proposed"
        )
        self.bundle, self.chunk = bundle, chunk
        self.cache = ScoreCache(scores_file)
        self.background = False
        self._scorer: UncertaintyScorer | None = None
        self._scorer_lock = threading.Lock()

    def scorer(self) -> UncertaintyScorer:
        with self._scorer_lock:
            if self._scorer is None:
                self._scorer = UncertaintyScorer(self.bundle)
            return self._scorer

    def _unlabelled(self, datastore) -> dict[str, str]:
        """{file: image id} of the studies with no final label; the cache forgets the others."""
        paths = {datastore.get_image_uri(image_id): image_id for image_id in datastore.get_unlabeled_images()}
        paths.pop("", None)
        self.cache.keep_only(paths)
        return paths

    def scores(self, datastore, stale: bool = False) -> dict:
        """{image id: StudyScore} of the unlabelled studies, scoring those the cache does not hold."""
        paths = self._unlabelled(datastore)
        scores = score_studies(sorted(paths), self.scorer(), self.cache, stale)
        return {paths[path]: result for path, result in scores.items()}

    def refresh(self, datastore) -> None:
        """Score every unlabelled study the cache lacks by the served weights, saving after each ``chunk``."""
        paths = sorted(self._unlabelled(datastore))
        for start in range(0, len(paths), self.chunk):
            score_studies(paths[start : start + self.chunk], self.scorer(), self.cache)

    def __call__(self, request, datastore):
        scores = self.scores(datastore, stale=self.background)
        best = most_uncertain(scores)
        if best is None:
            logger.info(f"uncertainty: no readable unlabelled study among {len(scores)}")
            return {}
        logger.info(f"uncertainty: {best} (score {scores[best].score:.4f}) of {len(scores)} unlabelled studies")
        return {"id": best, "uncertainty": scores[best].score}


class BundleTrainTaskWithStats(BundleTrainTask):
    """MONAI Label's bundle trainer whose rounds write ``models/train_stats.json`` for ``/info``."""

    def __init__(self, path: str, conf: dict, **kwargs):
        super().__init__(path, conf, **kwargs)
        self.models_dir = os.path.join(path, "models")

    def _update_overrides(self, overrides):
        key = self.const.key_train_handlers()
        validator = "@validate#evaluator" if self.bundle_config.get("validate#evaluator") is not None else None
        writer = {"_target_": "scripts.monailabel_train_stats.TrainStatsWriter",
                  "path": os.path.join(self.models_dir, TRAIN_STATS_FILE), "validator": validator,
                  "served_weights": os.path.join(self.models_dir, "model.pt")}  # fmt: skip
        overrides[key] = [*(overrides.get(key) or []), writer]  # last: after the handler that publishes
        return overrides

    def stats(self):
        """The last round's statistics, with the publish decision (or rollback) recorded since it started."""
        stats = read_stats(os.path.join(self.models_dir, TRAIN_STATS_FILE))
        record = os.path.join(self.models_dir, PUBLISH_RECORD_FILE)
        publish = read_stats(record)
        if publish and os.path.getmtime(record) >= stats.get("start_ts", 0):
            stats["publish"] = publish
        return stats


def study_problem(path: str) -> str | None:
    """Why the bundle's reader cannot read the radiograph at ``path``, or None when it can."""
    from scripts.radiograph_io import read_radiograph

    try:
        read_radiograph(path)
    except Exception as error:  # noqa: BLE001 - every reader failure is the answer
        return str(error)
    return None


class CxrLungOpacityApp(MONAILabelApp):
    """Serves the bundles named by ``--conf models`` (infer, train) with the strategies random, first and
    uncertainty (for the first model). ``--conf uncertainty_refresh_s <seconds>``: how often the background pass
    scores new studies and rescoring after new weights (default 30; 0: only when a request asks)."""

    def __init__(self, app_dir, studies, conf):
        self.bundles = served_bundles(app_dir, conf)
        version = json.loads(Path(next(iter(self.bundles.values())), "configs", "metadata.json").read_text())
        self.refresh_s = float(conf.get("uncertainty_refresh_s", DEFAULT_REFRESH_S))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAI Label - {', '.join(self.bundles)}",
            description="Lung fields and COVID-19 opacity on frontal chest radiographs",
            version=str(version.get("version", "")),
        )

    def init_infers(self):
        infers = {}
        for name, bundle in self.bundles.items():
            task = BundleInferTask(bundle, self.conf)
            if task.is_valid():
                infers[name] = task
        return infers

    def init_trainers(self):
        if strtobool(self.conf.get("skip_trainers", "false")):
            return {}
        trainers = {name: BundleTrainTaskWithStats(bundle, self.conf) for name, bundle in self.bundles.items()}
        return {name: task for name, task in trainers.items() if task.is_valid()}

    def init_strategies(self):
        first_bundle = next(iter(self.bundles.values()))
        return {
            "random": Random(),
            "first": First(),
            UNCERTAINTY: UncertaintyStrategy(first_bundle, os.path.join(self.app_dir, SCORES_FILE)),
        }

    def on_init_complete(self):
        super().on_init_complete()
        strategy = self._strategies.get(UNCERTAINTY)
        if strategy is not None and self.refresh_s > 0:
            strategy.background = True
            threading.Thread(target=self._refresh_scores, args=(strategy,), name="uncertainty", daemon=True).start()

    def _refresh_scores(self, strategy: UncertaintyStrategy) -> None:
        """Score what the cache lacks (new studies, every study after new weights), every ``refresh_s`` seconds."""
        while True:
            try:
                strategy.refresh(self.datastore())
            except Exception as error:  # noqa: BLE001 - a failed pass is retried; requests score for themselves
                logger.warning(f"uncertainty: background scoring failed ({type(error).__name__}: {error})")
            time.sleep(self.refresh_s)

    def _study_path(self, image, datastore=None) -> str | None:
        """The file of the study ``image`` (an id of the datastore or a path), or None."""
        if not isinstance(image, str) or not image:
            return None
        if os.path.exists(image):
            return image
        return (datastore or self.datastore()).get_image_uri(image) or None

    def infer(self, request, datastore=None):
        """MONAI Label's inference; a study that is unknown or cannot be read is an HTTP error saying so."""
        image = request.get("image")
        path = self._study_path(image, datastore)
        if isinstance(image, str) and image and path is None:
            raise HTTPException(status_code=404, detail=f"no study {image!r} in the datastore")
        try:
            return super().infer(request, datastore)
        except HTTPException:
            raise
        except Exception as error:
            problem = study_problem(path) if path else None
            if problem is None:
                raise
            logger.warning(f"infer: study {image!r} cannot be read: {problem}")
            raise HTTPException(status_code=422, detail=f"study {image!r} cannot be segmented: {problem}") from error
