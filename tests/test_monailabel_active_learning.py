"""The ``uncertainty`` next-sample strategy, clear errors for unreadable studies and training stats of the bundle's
MONAI Label app (scripts/monailabel_app.py).

The server test starts one real MONAI Label server (as tests/test_monailabel_server.py does: phantom radiographs,
phantom model at 64x64) over 4 phantom studies, one of them made ambiguous (heavily blurred), and a corrupt DICOM
file. Without MONAI Label's environment it is skipped (fails in CI). The scoring, caching and statistics pieces are
tested without a server, in the bundle's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import serve_monailabel
import torch
from scipy import ndimage
from test_monailabel_server import (  # noqa: F401
    COLUMNS,
    ROWS,
    TRAIN_TIMEOUT_S,
    free_port,
    monailabel_environment,
    png_bytes,
    request,
    save_label,
    train_round,
)

import phantoms
from conftest import PHANTOM_IMAGE_SIZE

MODEL = serve_monailabel.MODEL_NAME
AMBIGUOUS = "cxr_ambiguous"
CORRUPT = "broken"  # broken.dcm: listed by the datastore, never proposed, a clear error on /infer
BLUR_SIGMA = 10.0  # pixels, on a 200 x 240 radiograph: lung borders and ribs gone


def ambiguous_image(image: np.ndarray) -> np.ndarray:
    """A radiograph made hard to segment: heavily blurred."""
    return ndimage.gaussian_filter(image, BLUR_SIGMA)


def write_studies(folder: Path) -> dict[str, np.ndarray]:
    """3 plain phantom studies, 1 ambiguous one and a corrupt DICOM file in ``folder``; returns {id: label map}."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for index in range(4):
        phantom = phantoms.make_phantom(ROWS, COLUMNS, seed=91_000 + index)
        image_id = AMBIGUOUS if index == 3 else f"cxr_{index}"
        phantoms.write_png(folder / f"{image_id}.png", ambiguous_image(phantom.image) if index == 3 else phantom.image)
        labels[image_id] = phantom.label_map()
    (folder / f"{CORRUPT}.dcm").write_bytes(b"not a DICOM file\n" * 64)
    return labels


def post_json(url: str, body: dict | None = None) -> tuple[dict, float]:
    started = time.perf_counter()
    reply = json.loads(request(url, method="POST", body=body or {}))
    return reply, time.perf_counter() - started


def http_error(url: str, method: str = "POST", fields: dict | None = None) -> tuple[int, str]:
    """(status, body) of a request expected to fail."""
    try:
        request(url, method=method, fields=fields)
    except AssertionError as failure:
        error = failure.__cause__
        assert isinstance(error, urllib.error.HTTPError), failure
        return error.code, str(failure)
    raise AssertionError(f"{method} {url} succeeded")


@pytest.fixture(scope="module")
def app_server(monailabel_environment, phantom_model, tmp_path_factory):  # noqa: F811
    """One server over the studies of :func:`write_studies`, background scoring on (the default)."""
    studies = tmp_path_factory.mktemp("active_learning_studies")
    labels = write_studies(studies)
    workdir = tmp_path_factory.mktemp("active_learning_server")
    started = serve_monailabel.start_server(
        studies, free_port(), workdir=workdir, weights=phantom_model,
        overrides={"image_size": [PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE]}, python=monailabel_environment,
    )  # fmt: skip
    try:
        yield started, labels
    finally:
        serve_monailabel.stop_server(started)


def test_uncertainty_proposes_the_ambiguous_study_then_the_others_and_never_a_corrupt_one(app_server):
    server, labels = app_server
    info = json.loads(request(f"{server.url}/info/"))
    assert "uncertainty" in info["strategies"], info["strategies"]
    assert info["datastore"]["total"] == len(labels) + 1  # the corrupt .dcm study is listed

    url = f"{server.url}/activelearning/uncertainty"
    first, first_s = post_json(url)
    assert first["id"] == AMBIGUOUS, first
    again, cached_s = post_json(url)
    assert again["id"] == AMBIGUOUS
    scores_file = server.app / "uncertainty_scores.json"
    cached_before = scores_file.stat().st_mtime_ns
    assert post_json(url)[0]["id"] == AMBIGUOUS
    assert scores_file.stat().st_mtime_ns == cached_before  # nothing scored again: the file was not rewritten
    print(f"uncertainty: first request {first_s:.2f} s, cached {cached_s:.3f} s")
    studies = json.loads(scores_file.read_text())["studies"]
    corrupt = [entry for path, entry in studies.items() if Path(path).name == f"{CORRUPT}.dcm"]
    assert len(studies) == len(labels) + 1 and corrupt and corrupt[0]["score"] is None and corrupt[0]["error"]

    save_label(server, AMBIGUOUS, labels[AMBIGUOUS])
    proposed = []
    for _ in range(len(labels) - 1):
        reply, _ = post_json(url)
        assert reply.get("id") in set(labels) - {AMBIGUOUS} - set(proposed), (reply, proposed)
        proposed.append(reply["id"])
        save_label(server, reply["id"], labels[reply["id"]])
    last, _ = post_json(url)
    assert last == {}, last  # only the corrupt study is left unlabelled, and it is never proposed


def test_infer_on_a_corrupt_study_is_a_clear_http_error(app_server):
    server, _ = app_server
    status, body = http_error(f"{server.url}/infer/{MODEL}?image={CORRUPT}&output=image", fields={"params": "{}"})
    assert status == 422, body
    assert f"{CORRUPT}.dcm" in body and "DICOM" in body, body
    status, body = http_error(f"{server.url}/infer/{MODEL}?image=no_such_study&output=image", fields={"params": "{}"})
    assert status == 404 and "no_such_study" in body, body


def test_info_shows_the_statistics_of_a_training_round(app_server):
    server, labels = app_server
    assert json.loads(request(f"{server.url}/info/"))["train_stats"] == {MODEL: {}}  # no round yet
    for image_id, label in labels.items():
        save_label(server, image_id, label)
    train_round(server, {"max_epochs": 1})
    stats = json.loads(request(f"{server.url}/info/"))["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["epoch"] == 1 and stats["total_epochs"] == 1, stats
    assert 1 <= stats["train_images"] <= len(labels) and isinstance(stats["loss"], float), stats
    assert isinstance(stats["served_weights_replaced"], bool), stats
    assert stats["publish"]["decision"] and stats["publish"]["reason"], stats  # what the publish gate decided, why
    print(f"train_stats: {json.dumps(stats)[:1500]}")


# ------------------------------------------------------------------------- the pieces, without a server


@pytest.fixture
def served_bundle(phantom_model, tmp_path) -> Path:
    """The bundle served as the launcher serves it (merged configs, phantom weights at 64x64), without a server."""
    served = tmp_path / "served"
    serve_monailabel.write_served_configs(
        serve_monailabel.BUNDLE, served / "configs", {"image_size": [PHANTOM_IMAGE_SIZE, PHANTOM_IMAGE_SIZE]}
    )
    (served / "models").mkdir()
    shutil.copyfile(phantom_model, served / "models" / "model.pt")
    return served


def test_scores_rank_the_ambiguous_study_first_and_are_cached_per_study_and_weights(served_bundle, tmp_path):
    from scripts.uncertainty import ScoreCache, UncertaintyScorer, most_uncertain, score_studies

    class CountingScorer(UncertaintyScorer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scored = []

        def score(self, path):
            self.scored.append(Path(path).stem)
            return super().score(path)

    studies = tmp_path / "studies"
    write_studies(studies)
    paths = sorted(str(path) for path in studies.iterdir())
    scorer, cache = CountingScorer(served_bundle), ScoreCache(tmp_path / "scores.json")
    scores = score_studies(paths, scorer, cache)
    assert sorted(scorer.scored) == sorted(Path(path).stem for path in paths)
    assert Path(most_uncertain(scores)).stem == AMBIGUOUS, {Path(p).stem: s.score for p, s in scores.items()}
    corrupt = scores[str(studies / f"{CORRUPT}.dcm")]
    assert corrupt.score is None and f"{CORRUPT}.dcm" in corrupt.error

    scorer.scored.clear()
    assert score_studies(paths, scorer, ScoreCache(tmp_path / "scores.json")) == scores  # read back from the file
    assert scorer.scored == []
    touched = studies / "cxr_0.png"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    score_studies(paths, scorer, cache)
    assert scorer.scored == ["cxr_0"]  # only the changed study
    weights = served_bundle / "models" / "model.pt"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    scorer.scored.clear()
    assert score_studies(paths, scorer, cache, stale=True) == scores and scorer.scored == []  # earlier weights' scores
    score_studies(paths[:2], scorer, cache)
    assert sorted(scorer.scored) == sorted(Path(path).stem for path in paths[:2])  # new weights: scored again
    cache.keep_only(paths[:2])
    assert sorted(cache.entries) == paths[:2]

    (tmp_path / "scores.json").write_text("{not json")
    assert ScoreCache(tmp_path / "scores.json").entries == {}  # a damaged cache is scored again, not an error


def test_lung_field_entropy_is_0_when_sure_1_when_undecided_or_without_lungs():
    from scripts.uncertainty import lung_field_entropy

    sure = torch.zeros(3, 3, 4, 4)  # 3 views (plain and 2 contrasts), classes background, lung, opacity
    sure[:, 1] = 1.0
    assert lung_field_entropy(sure) == pytest.approx(0.0, abs=1e-5)
    undecided = sure.clone()
    undecided[1:, :, :2] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    undecided[0, :, :2] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # plain: background; changed: lung
    expected = 0.5 * -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))  # half the field at P(lung field) = 2/3
    assert lung_field_entropy(undecided) == pytest.approx(expected, abs=1e-5)
    opacity_or_lung = sure.clone()
    opacity_or_lung[:, 1:] = 0.5  # lung against opacity is not scored: the lung field is sure
    assert lung_field_entropy(opacity_or_lung) == pytest.approx(0.0, abs=1e-5)
    background = torch.zeros(3, 3, 4, 4)
    background[:, 0] = 1.0
    assert lung_field_entropy(background) == 1.0  # no lung field found: the most in need of a label


def test_train_stats_writer_records_the_round_as_monai_label_shows_it(tmp_path):
    from ignite.engine import Engine, Events

    from scripts.monailabel_train_stats import TrainStatsWriter, read_stats

    served_weights = tmp_path / "model.pt"
    served_weights.write_bytes(b"old")
    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(0.25)})
    trainer.add_event_handler(Events.COMPLETED, lambda engine: served_weights.write_bytes(b"new weights"))
    validator = SimpleNamespace(
        state=SimpleNamespace(metrics={"val_lung_dice": torch.tensor(0.9)}, best_metric=0.8, best_metric_epoch=2,
                              key_metric_name="val_selection_score")  # fmt: skip
    )
    stats_path = tmp_path / "train_stats.json"
    TrainStatsWriter(str(stats_path), validator, str(served_weights)).attach(trainer)
    trainer.run([0, 1, 2], max_epochs=2)
    stats = read_stats(str(stats_path))
    assert stats["status"] == "DONE" and stats["epoch"] == 2 and stats["total_epochs"] == 2 and "total_time" in stats
    assert stats["loss"] == 0.25 and stats["best_metric"] == 0.8
    assert stats["eval"]["best_metric_epoch"] == 2 and stats["eval"]["metrics"]["val_lung_dice"] == pytest.approx(0.9)
    assert stats["served_weights_replaced"] is True
    assert read_stats(str(tmp_path / "missing.json")) == {}
