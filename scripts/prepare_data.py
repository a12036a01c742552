#!/usr/bin/env python
"""Prepare chest X-rays and their annotations for training: label maps plus a MONAI datalist JSON.

Inputs (any combination):
  --images DIR        radiographs (DICOM, PNG, JPEG, NIfTI); a mask or LabelMe file is matched by file stem
  --masks DIR         lung-field masks (<stem>.png/.nii.gz, lung > 0): lung only, opacity not annotated
  --extra-masks DIR   lower-trust lung masks (e.g. model predictions), training only, where --masks has none
  --clear-finding F   metadata finding (e.g. "No Finding") whose lungs count as annotated clear lung
  --labelme DIR       LabelMe JSON files with right_lung / left_lung / opacity polygons (override masks)
  --metadata CSV      table with the image file name and patient id (default columns: filename, patientid)
  --mask-source SPEC  a dataset laid out as image / lung-mask / opacity-mask folders (repeatable), e.g.
                      "name=covid-qu-ex,images=DIR,lungs=DIR,opacity=DIR,split=CSV,lung_field=DIR":
                        opacity   folder of opacity masks (annotated source: an empty mask means clear lung);
                                  leave it out for a source whose opacity was not annotated (lung labelled 3)
                        split     CSV naming each image's published split (columns image, published_split; change
                                  them with image_column=, split_column=): "train" rows train (a --val-fraction of
                                  them validate), every other split is held out as the datalist's "test" rows;
                                  without it the rows are split like patients, one image per patient
                        lung_field  lung masks in the bundle's lung-field style for the same images (e.g. predicted
                                  by a model trained on the reference masks): in training rows, lung inside them but
                                  outside the source's own lung masks is labelled 3; held-out rows keep the source's
                                  masks as drawn

Writes into --output: labels/<stem>.png (0 background, 1 clear lung, 2 opacity, 3 lung without opacity
annotation; labels/<source>/<stem>.png for --mask-source rows), images/ for LabelMe-embedded images, datalist.json
(training / validation split by patient with --seed, "test" for held-out --mask-source rows; every row names its
"source"; --repeat-labelme lists the few opacity-annotated training images several times) and
preparation_report.json. Input files are only read. Bad files are reported by name and skipped.

Progress (files read, written and refused so far) is a bar on a terminal, else a line at least every tenth of the
files or 30 s; --progress false turns it off.

Example:
  python scripts/prepare_data.py --images ../shared/data/cohen-cxr/images \
      --masks ../shared/data/cohen-cxr/lung_masks --extra-masks ../shared/data/cohen-cxr/lung_masks_lungvae \
      --labelme ../shared/data/opacity-labelme --metadata ../shared/data/cohen-cxr/metadata.csv --output data/cxr
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bundle"))

from scripts.label_io import atomic_write, read_label_map, write_json, write_png  # noqa: E402
from scripts.labelme import annotated_image_path, read_labelme  # noqa: E402
from scripts.labels import BACKGROUND, CLEAR_LUNG, LUNG_UNANNOTATED, OPACITY  # noqa: E402
from scripts.progress import Progress, progress_wanted  # noqa: E402
from scripts.radiograph_io import (  # noqa: E402
    SUPPORTED_EXTENSIONS,
    RadiographError,
    detect_format,
    file_stem,
    read_radiograph,
)

MASK_EXTENSIONS = (".png", ".nii.gz", ".nii")
MASK_SOURCE_KEYS = {"name", "images", "lungs", "opacity", "split", "image_column", "split_column", "lung_field"}
RESERVED_SOURCE_NAMES = {"labelme", "mask", "extra_mask"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", help="folder of radiographs")
    parser.add_argument("--masks", help="folder of lung-field masks named like the images")
    parser.add_argument(
        "--extra-masks",
        action="append",
        default=[],
        help="folder of lower-trust lung masks (training only); repeatable",
    )
    parser.add_argument("--labelme", help="folder of LabelMe JSON annotations")
    parser.add_argument("--metadata", help="CSV with image file names and patient ids")
    parser.add_argument("--filename-column", default="filename")
    parser.add_argument("--patient-column", default="patientid")
    parser.add_argument("--finding-column", default="finding")
    parser.add_argument(
        "--clear-finding",
        action="append",
        default=[],
        help="metadata finding whose lungs are clear (e.g. 'No Finding'): their masks are labelled 1, not 3",
    )
    parser.add_argument(
        "--mask-source",
        action="append",
        default=[],
        type=parse_mask_source,
        help="image / lung-mask / opacity-mask folders of one dataset as comma-separated key=value pairs "
        "(name, images, lungs, opacity, split, image_column, split_column, lung_field); repeatable",
    )
    parser.add_argument("--output", required=True, help="folder for label maps and datalist.json")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="fraction of patients held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient split")
    parser.add_argument(
        "--split-from", help="datalist.json whose validation patients (LabelMe ones aside) are held out again"
    )
    parser.add_argument("--opacity-folds", type=int, default=2, help="folds over the LabelMe-annotated patients")
    parser.add_argument(
        "--holdout-opacity-fold",
        type=int,
        default=-1,
        help="put this fold of LabelMe-annotated patients in validation (-1: all of them train)",
    )
    parser.add_argument(
        "--labelme-lungs-from-masks",
        action="store_true",
        help="training LabelMe images that also have a --masks lung mask take their lung field from the mask (LabelMe "
        "opacity inside it; mask lung outside the LabelMe lungs as lung without opacity annotation)",
    )
    parser.add_argument(
        "--repeat-labelme",
        type=int,
        default=1,
        help="list each training image with LabelMe opacity annotation this many times (oversampling the few)",
    )
    parser.add_argument(
        "--progress", default="true", help="true (default) or false: show the progress of reading and writing files"
    )
    args = parser.parse_args(argv)
    try:
        args.progress = progress_wanted(args.progress)
    except ValueError as error:
        parser.error(str(error))
    if args.repeat_labelme < 1:
        parser.error("--repeat-labelme must be at least 1")
    names = [source["name"] for source in args.mask_source]
    if len(set(names)) != len(names):
        parser.error(f"--mask-source names must differ, got {names}")
    return args


def parse_mask_source(spec: str) -> dict:
    """``name=...,images=DIR,lungs=DIR[,opacity=DIR][,split=CSV][,lung_field=DIR]`` as a dict, checked."""
    source = {}
    for item in spec.split(","):
        key, separator, value = item.partition("=")
        key = key.strip()
        if not separator or not value.strip():
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r} in {spec!r}")
        if key not in MASK_SOURCE_KEYS:
            raise argparse.ArgumentTypeError(f"unknown key {key!r} in {spec!r}; keys: {sorted(MASK_SOURCE_KEYS)}")
        source[key] = value.strip()
    missing = {"name", "images", "lungs"} - set(source)
    if missing:
        raise argparse.ArgumentTypeError(f"{spec!r} lacks {sorted(missing)}")
    if source["name"] in RESERVED_SOURCE_NAMES:
        raise argparse.ArgumentTypeError(f"source name {source['name']!r} is reserved; choose another")
    for key in ("images", "lungs", "opacity", "lung_field"):
        if key in source and not os.path.isdir(source[key]):
            raise argparse.ArgumentTypeError(f"{key} folder {source[key]} of source {source['name']!r} not found")
    if "split" in source and not os.path.isfile(source["split"]):
        raise argparse.ArgumentTypeError(f"split table {source['split']} of source {source['name']!r} not found")
    source.setdefault("image_column", "image")
    source.setdefault("split_column", "published_split")
    return source


def list_images(folder: str | None) -> dict[str, str]:
    """Map stem -> path for every radiograph in ``folder`` (DICOM without extension included)."""
    if not folder:
        return {}
    images = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and (name.lower().endswith(SUPPORTED_EXTENSIONS) or detect_format(path) == "dicom"):
            images[file_stem(name)] = path
    return images


def list_masks(folder: str | None) -> dict[str, str]:
    if not folder:
        return {}
    return {
        file_stem(name): os.path.join(folder, name)
        for name in sorted(os.listdir(folder))
        if name.lower().endswith(MASK_EXTENSIONS)
    }


def clear_stems(args) -> set[str]:
    """Stems of images whose metadata finding is one of ``--clear-finding``."""
    if not (args.metadata and args.clear_finding):
        return set()
    with open(args.metadata, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    wanted = {finding.strip().lower() for finding in args.clear_finding}
    return {
        file_stem(row[args.filename_column])
        for row in rows
        if str(row.get(args.finding_column, "")).strip().lower() in wanted
    }


def read_patient_ids(csv_path: str | None, filename_column: str, patient_column: str) -> dict[str, str]:
    """Map image stem -> patient id from the metadata table."""
    if not csv_path:
        return {}
    with open(csv_path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {file_stem(row[filename_column]): str(row[patient_column]) for row in rows if row.get(filename_column)}


def read_mask(path: str, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask (> 0) of ``path``, which must have the image's ``shape``."""
    mask = read_label_map(path)
    if mask.shape != shape:
        raise RadiographError(path, f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {shape[0]}x{shape[1]}")
    return mask > 0


def lung_mask_label_map(lung_path: str, shape: tuple[int, int], opacity_path: str | None = None) -> np.ndarray:
    """Label map of a lung mask and, for an opacity-annotated source, its opacity mask (kept inside the lung).

    Not annotated (``opacity_path`` None): lung 3. Annotated: lung 1 (clear), opacity 2, so an empty opacity mask
    says the lungs are clear.
    """
    lung = read_mask(lung_path, shape)
    if not lung.any():
        raise RadiographError(lung_path, "mask holds no lung pixel")
    labels = np.full(shape, BACKGROUND, dtype=np.uint8)
    if opacity_path is None:
        labels[lung] = LUNG_UNANNOTATED
    else:
        labels[lung] = CLEAR_LUNG
        labels[lung & read_mask(opacity_path, shape)] = OPACITY
    return labels


def save_embedded_image(annotation, output: str, stem: str) -> str:
    """Write a LabelMe-embedded image (its original bytes) under ``output/images`` and return the path."""
    from PIL import Image

    with Image.open(io.BytesIO(annotation.embedded_image)) as image:
        extension = ".jpg" if image.format == "JPEG" else ".png"
    path = os.path.join(output, "images", stem + extension)

    def write(temporary):
        with open(temporary, "wb") as handle:
            handle.write(annotation.embedded_image)

    atomic_write(path, write)
    return path


def progress(args, what: str, total: int, report: dict | None = None) -> Progress:
    """The progress of reading (with the files refused so far, from ``report``) or writing ``total`` files."""
    refused = (lambda: f"{len(report['skipped'])} refused") if report is not None else None
    return Progress(
        f"prepare_data: {what}", total, "files", refused, args.progress, functools.partial(print, flush=True)
    )


def count_json_files(folder: str | None) -> int:
    return sum(name.lower().endswith(".json") for name in os.listdir(folder)) if folder else 0


def labelme_image_stem(json_path: str) -> str:
    """Stem of the image a LabelMe file annotates: its imagePath's when that file exists, else the JSON file's."""
    try:
        with open(json_path, encoding="utf-8") as handle:
            image_path = annotated_image_path(json_path, json.load(handle).get("imagePath"))
    except (OSError, ValueError, AttributeError):  # unreadable: read_labelme reports it
        image_path = None
    return file_stem(image_path or json_path)


def read_labelme_folder(folder: str | None, report: dict):
    """Yield (image stem, LabelMe annotation) for every usable JSON file in ``folder``, one at a time.

    A file that cannot be used, and every file of an image annotated by more than one file (the same image stem,
    e.g. the same imagePath), goes to ``report['skipped']`` naming the files; none of them is used, and the image is
    prepared like an image without LabelMe file (from its --masks mask, if any).
    """
    by_stem: dict[str, list[str]] = {}
    for json_name in sorted(os.listdir(folder)) if folder else []:
        if json_name.lower().endswith(".json"):
            json_path = os.path.join(folder, json_name)
            by_stem.setdefault(labelme_image_stem(json_path), []).append(json_path)
    for stem, json_paths in by_stem.items():
        if len(json_paths) > 1:
            names = " and ".join(json_paths)
            reason = f"image {stem!r} is annotated by {len(json_paths)} LabelMe files ({names}); none is used"
            report["skipped"] += [{"file": json_path, "reason": reason} for json_path in json_paths]
            continue
        try:
            yield stem, read_labelme(json_paths[0])
        except RadiographError as error:
            report["skipped"].append({"file": error.path, "reason": error.problem})


def collect_samples(args, report: dict) -> list[dict]:
    """One sample per image that has a usable label; problems go to ``report['skipped']``."""
    images = list_images(args.images)
    masks = list_masks(args.masks)
    extra_masks = {}
    for folder in reversed(args.extra_masks):  # the first folder given wins
        extra_masks.update(list_masks(folder))
    clear = clear_stems(args)
    json_files = count_json_files(args.labelme)
    with progress(args, "reading", json_files + len(images), report) as reading:
        samples = read_labelme_samples(args, report, images, masks, reading)
        reading.advance(json_files - reading.done)  # the LabelMe files refused without being read
        for stem, image_path in images.items():
            reading.advance()
            if stem in samples:
                continue
            mask_path, source = (masks[stem], "mask") if stem in masks else (extra_masks.get(stem), "extra_mask")
            if mask_path is None:
                report["unlabelled"].append(image_path)
                continue
            try:
                shape = read_radiograph(image_path).pixels.shape
                labels = lung_mask_label_map(mask_path, shape)
                if stem in clear:  # a finding without opacity: the whole lung is annotated as clear
                    labels[labels == LUNG_UNANNOTATED] = CLEAR_LUNG
                samples[stem] = {"image": image_path, "labels": labels, "source": source}
            except RadiographError as error:
                report["skipped"].append({"file": error.path, "reason": error.problem})
    return [dict(stem=stem, **sample) for stem, sample in samples.items()]


def read_labelme_samples(args, report: dict, images: dict, masks: dict, reading: Progress) -> dict[str, dict]:
    """The sample of every usable LabelMe file, by image stem (``reading`` advances per file read)."""
    samples: dict[str, dict] = {}
    for stem, annotation in read_labelme_folder(args.labelme, report):
        reading.advance()
        json_path = annotation.json_path
        try:
            image_path = annotation.image_path or images.get(stem)
            if image_path is None:
                image_path = save_embedded_image(annotation, args.output, stem)
            shape = read_radiograph(image_path).pixels.shape
            if shape != annotation.lung.shape:
                raise RadiographError(json_path, f"annotated size {annotation.lung.shape} differs from image {shape}")
            samples[stem] = {"image": image_path, "labels": annotation.label_map(), "source": "labelme"}
            if args.labelme_lungs_from_masks and stem in masks:
                samples[stem]["lung_mask"] = masks[stem]
        except RadiographError as error:
            report["skipped"].append({"file": error.path, "reason": error.problem})
    return samples


def read_published_split(source: dict) -> dict[str, str]:
    """Map image stem -> published split name ("train", "val", ...) from the source's split table; {} without one."""
    if "split" not in source:
        return {}
    with open(source["split"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for column in (source["image_column"], source["split_column"]):
        if rows and column not in rows[0]:
            raise SystemExit(f"error: split table {source['split']} has no column {column!r}")
    return {file_stem(row[source["image_column"]]): row[source["split_column"]].strip().lower() for row in rows}


def collect_mask_source(args, source: dict, report: dict) -> list[dict]:
    """One sample per image of a mask-folder source; images without a lung (or opacity) mask are reported."""
    images = list_images(source["images"])
    lungs = list_masks(source["lungs"])
    opacity = list_masks(source.get("opacity"))
    lung_field = list_masks(source.get("lung_field"))
    published = read_published_split(source)
    annotated = "opacity" in source
    samples = []
    with progress(args, f"reading {source['name']}", len(images), report) as reading:
        for stem, image_path in images.items():
            reading.advance()
            if stem not in lungs:
                report["unlabelled"].append(image_path)
                continue
            try:
                if annotated and stem not in opacity:
                    raise RadiographError(image_path, f"no opacity mask in {source['opacity']}")
                if published and stem not in published:
                    raise RadiographError(image_path, f"not listed in the split table {source['split']}")
                shape = read_radiograph(image_path).pixels.shape
                labels = lung_mask_label_map(lungs[stem], shape, opacity.get(stem) if annotated else None)
            except RadiographError as error:
                report["skipped"].append({"file": error.path, "reason": error.problem})
                continue
            sample = {
                "stem": stem,
                "image": os.path.abspath(image_path),
                "labels": labels,
                "source": source["name"],
                "patient_id": f"{source['name']}:{stem}",
                "published_split": published.get(stem, "train"),
            }
            if stem in lung_field:
                sample["lung_field"] = lung_field[stem]
            samples.append(sample)
    return samples


def split_mask_source(samples: list[dict], args) -> tuple[list[dict], list[dict], list[dict]]:
    """(training, validation, test) of one mask-folder source.

    Rows of the published training split (all rows without a split table) are shuffled with --seed and a
    --val-fraction of them validate; rows of any other published split are held out as test rows.
    """
    pool = [s for s in samples if s["published_split"] == "train"]
    test = [s for s in samples if s["published_split"] != "train"]
    random.Random(args.seed).shuffle(pool)
    validation_count = int(round(args.val_fraction * len(pool)))
    return pool[validation_count:], pool[:validation_count], test


def widen_to_lung_field(labels: np.ndarray, lung_field_path: str) -> np.ndarray:
    """A training label map whose lung field is widened to ``lung_field_path``: lung there outside the source's own
    lung masks becomes lung without opacity annotation (3)."""
    widened = labels.copy()
    widened[read_mask(lung_field_path, labels.shape) & (labels == BACKGROUND)] = LUNG_UNANNOTATED
    return widened


def prepare_mask_sources(args, output: str, report: dict) -> dict[str, list[dict]]:
    """Label maps of every --mask-source written under ``output/labels/<source>/``; their datalist rows by section."""
    sections = {"training": [], "validation": [], "test": []}
    for source in args.mask_source:
        samples = collect_mask_source(args, source, report)
        training, validation, test = split_mask_source(samples, args)
        writing = progress(args, f"writing {source['name']} label maps", len(samples))
        for section, rows in zip(sections, (training, validation, test)):
            for sample in rows:
                labels = sample.pop("labels")
                lung_field = sample.pop("lung_field", None)
                if section == "training" and lung_field is not None:
                    try:
                        labels = widen_to_lung_field(labels, lung_field)
                    except RadiographError as error:
                        report["skipped"].append({"file": error.path, "reason": f"{error.problem}; lung field unused"})
                sample.pop("published_split")
                sample["label"] = os.path.join("labels", source["name"], sample["stem"] + ".png")
                write_png(os.path.join(output, sample["label"]), labels)
                sections[section].append(sample)
                writing.advance()
        writing.close()
        report["sources"][source["name"]] = {
            "training": len(training), "validation": len(validation), "test": len(test),
            "opacity_annotated": "opacity" in source,
        }  # fmt: skip
    return sections


def split_by_patient(samples: list[dict], args) -> tuple[list[dict], list[dict]]:
    """Held-out patients go to validation; LabelMe patients are split by opacity fold.

    With --split-from, the other validation patients are those of the earlier datalist (LabelMe patients still follow
    --holdout-opacity-fold), so a model fine-tuned on the new datalist is validated on patients it never saw.

    Lower-trust extra masks only ever train: those of patients with validation images are left out, so no patient is
    in both.
    """
    rng = random.Random(args.seed)
    labelme_patients = sorted({s["patient_id"] for s in samples if s["source"] == "labelme"})
    rng.shuffle(labelme_patients)
    holdout = {p for i, p in enumerate(labelme_patients) if i % max(args.opacity_folds, 1) == args.holdout_opacity_fold}
    other_patients = sorted({s["patient_id"] for s in samples} - set(labelme_patients))
    rng.shuffle(other_patients)
    validation_patients = set(other_patients[: int(round(args.val_fraction * len(other_patients)))]) | holdout
    if args.split_from:  # keep the validation patients of an earlier datalist (e.g. to fine-tune a model)
        with open(args.split_from, encoding="utf-8") as handle:
            earlier = {item["patient_id"] for item in json.load(handle)["validation"]}
        validation_patients = (earlier - set(labelme_patients)) | holdout
    validation = [s for s in samples if s["patient_id"] in validation_patients and s["source"] != "extra_mask"]
    validated = {s["patient_id"] for s in validation}
    training = [s for s in samples if s["patient_id"] not in validated and s not in validation]
    return training, validation


def lungs_from_mask(labelme_labels: np.ndarray, mask_path: str) -> np.ndarray:
    """A LabelMe label map moved onto the lung field of a lung mask (used where their lung outlines differ).

    Inside both lung outlines the LabelMe classes stay (clear lung, opacity); lung of the mask outside the LabelMe
    lungs becomes lung whose opacity is not annotated; LabelMe lung outside the mask becomes background.
    """
    labels = lung_mask_label_map(mask_path, labelme_labels.shape)
    inside_both = (labels == LUNG_UNANNOTATED) & (labelme_labels != BACKGROUND)
    labels[inside_both] = labelme_labels[inside_both]
    return labels


def oversample_labelme(training: list[dict], repeat: int) -> list[dict]:
    """The training list with each LabelMe-annotated sample listed ``repeat`` times, in place of once."""
    return [copy for sample in training for copy in [sample] * (repeat if sample["source"] == "labelme" else 1)]


def main(argv=None) -> int:
    args = parse_args(argv)
    if not (args.images or args.labelme or args.mask_source):
        print("error: give --images, --labelme and/or --mask-source", file=sys.stderr)
        return 2
    output = os.path.abspath(args.output)
    folder_keys = ("images", "lungs", "opacity", "lung_field")
    source_folders = [source.get(key) for source in args.mask_source for key in folder_keys]
    for given in (args.images, args.masks, *args.extra_masks, args.labelme, *source_folders):
        if given and os.path.abspath(given) == output:
            print(f"error: --output {output} is an input folder; choose another", file=sys.stderr)
            return 2
    report = {"skipped": [], "unlabelled": [], "sources": {}}
    samples = collect_samples(args, report) if (args.images or args.labelme) else []
    patients = read_patient_ids(args.metadata, args.filename_column, args.patient_column)
    label_maps = {sample["stem"]: sample.pop("labels") for sample in samples}
    lung_masks = {sample["stem"]: sample.pop("lung_mask") for sample in samples if "lung_mask" in sample}
    for sample in samples:
        sample["patient_id"] = patients.get(sample["stem"], sample["stem"])
        sample["label"] = os.path.join("labels", sample["stem"] + ".png")
        sample["image"] = os.path.abspath(sample["image"])
    training, validation = split_by_patient(samples, args)
    for sample in training:  # validation keeps the annotation as drawn: opacity is measured against it
        if sample["stem"] in lung_masks:
            try:
                label_maps[sample["stem"]] = lungs_from_mask(label_maps[sample["stem"]], lung_masks[sample["stem"]])
            except RadiographError as error:
                report["skipped"].append({"file": error.path, "reason": f"{error.problem}; the LabelMe lungs are used"})
    with progress(args, "writing label maps", len(label_maps)) as writing:
        for stem, labels in label_maps.items():
            write_png(os.path.join(output, "labels", stem + ".png"), labels)
            writing.advance()
    training = oversample_labelme(training, args.repeat_labelme)
    from_sources = prepare_mask_sources(args, output, report)
    datalist = {
        "training": training + from_sources["training"],
        "validation": validation + from_sources["validation"],
        "test": from_sources["test"],
    }
    write_json(os.path.join(output, "datalist.json"), datalist)
    used = len(samples) + sum(len(rows) for rows in from_sources.values())
    report.update(
        used=used,
        training=len(datalist["training"]),
        training_unique=len({s["label"] for s in datalist["training"]}),
        validation=len(datalist["validation"]),
        test=len(datalist["test"]),
        opacity_annotated=sum(s["source"] == "labelme" for s in samples),
        seed=args.seed,
    )
    write_json(os.path.join(output, "preparation_report.json"), report)
    for skipped in report["skipped"]:
        print(f"skipped {skipped['file']}: {skipped['reason']}")
    print(
        f"used {used} images ({report['opacity_annotated']} with LabelMe opacity annotation): "
        f"{report['training']} training ({report['training_unique']} distinct), {report['validation']} validation, "
        f"{report['test']} test; skipped {len(report['skipped'])}; "
        f"{len(report['unlabelled'])} without any label; datalist: {os.path.join(output, 'datalist.json')}"
    )
    return 0 if used else 1


if __name__ == "__main__":
    sys.exit(main())
