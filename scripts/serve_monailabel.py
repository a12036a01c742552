#!/usr/bin/env python
"""Serve the bundle with a MONAI Label server: automatic lung and opacity masks for annotators, retraining on their
corrections.

Copies MONAI Label's ``monaibundle`` sample app (shipped in the ``.venv-monailabel`` environment) into a working
folder, serves this bundle there as ``model/<model name>`` (its configs and ``scripts`` linked, its weights copied,
so training through the server never touches ``bundle/models/model.pt``), configures the datastore for 2D
radiographs (PNG, JPEG; NIfTI too, for labels saved by clients) and starts
``python -m monailabel.main start_server`` on 127.0.0.1 with no model-zoo download and no SAM2 models.

Example (install the environment once with ``bash scripts/install_monailabel.sh``):
  .venv-monailabel/bin/python scripts/serve_monailabel.py --studies <folder of radiographs> --port 8000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
MONAILABEL_PYTHON = ROOT / ".venv-monailabel" / "bin" / "python"
DEFAULT_WORKDIR = ROOT / "runs" / "monailabel"
MODEL_NAME = "cxr_lung_opacity"
# MONAI Label's local datastore lists images and labels with these patterns (setting MONAI_LABEL_DATASTORE_FILE_EXT)
STUDY_PATTERNS = ["*.png", "*.jpg", "*.jpeg", "*.PNG", "*.JPG", "*.JPEG", "*.nii.gz", "*.nii"]
# the files MONAI Label reads alone, written as the merge of the bundle's files that make each workflow
SERVED_CONFIGS = {"inference.yaml": ("common.yaml", "inference.yaml"), "train.yaml": ("common.yaml", "train.yaml")}


@dataclass
class Server:
    """A running MONAI Label server process, its URL, app folder, served bundle and log file."""

    process: subprocess.Popen
    url: str
    app: Path
    served_bundle: Path
    log_file: Path


def check_python(python: Path) -> None:
    if not Path(python).is_file():
        raise FileNotFoundError(f"MONAI Label environment not found ({python}): run bash scripts/install_monailabel.sh")


def sample_app(python: Path = MONAILABEL_PYTHON) -> Path:
    """The ``monaibundle`` sample app installed with monailabel in the environment of ``python``."""
    check_python(python)
    probe = "import os, sys, monailabel; print(sys.prefix); print(os.path.dirname(monailabel.__file__))"
    result = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{python} cannot import monailabel: {result.stderr.strip()[-1000:]}")
    prefix, package = result.stdout.split()[-2:]
    candidates = [Path(prefix) / "monailabel" / "sample-apps" / "monaibundle",
                  Path(package) / "sample-apps" / "monaibundle"]  # fmt: skip
    for candidate in candidates:
        if (candidate / "main.py").is_file():
            return candidate
    raise FileNotFoundError(f"monaibundle sample app not found in {', '.join(map(str, candidates))}")


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` (value in YAML, e.g. ``image_size=[64,64]``) as (key, value)."""
    import yaml

    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise ValueError(f"override {text!r} is not key=value")
    return key.strip(), yaml.safe_load(value)


def _replace_link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def merged_config(bundle: Path, names: tuple[str, ...]) -> dict:
    """The bundle's config files ``names`` merged in order as MONAI does (``a#b`` keys included), without ``_meta_``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in names])
    return {key: value for key, value in parser.get().items() if key != "_meta_"}


def write_served_configs(bundle: Path, configs: Path, overrides: dict | None = None) -> None:
    """Fill ``configs`` for MONAI Label, which reads ``inference.yaml`` and ``train.yaml`` alone: those two are
    common.yaml merged with the workflow's config, whose top-level keys take ``overrides`` (e.g. ``image_size`` for a
    model trained at 64); the other files are links to the bundle's."""
    import yaml

    served = {name: merged_config(bundle, workflow) for name, workflow in SERVED_CONFIGS.items()}
    unknown = [key for key in overrides or {} if not any(key in config for config in served.values())]
    if unknown:
        raise ValueError(f"override keys not in {' or '.join(SERVED_CONFIGS)}: {', '.join(unknown)}")
    for config in served.values():
        config.update({key: value for key, value in (overrides or {}).items() if key in config})
    configs.mkdir(parents=True, exist_ok=True)
    for source in sorted((bundle / "configs").iterdir()):
        target = configs / source.name
        if source.name in served:
            if target.is_symlink() or target.exists():
                target.unlink()
            header = (
                f"# generated by scripts/serve_monailabel.py: {' merged with '.join(SERVED_CONFIGS[source.name])}\n"
            )
            target.write_text(header + yaml.safe_dump(served[source.name], sort_keys=False, width=120))
        else:
            _replace_link(target, source)


def prepare_app(
    workdir: Path = DEFAULT_WORKDIR,
    bundle: Path = BUNDLE,
    weights: Path | None = None,
    overrides: dict | None = None,
    model_name: str = MODEL_NAME,
    python: Path = MONAILABEL_PYTHON,
) -> tuple[Path, Path]:
    """Copy the sample app into ``workdir`` (once) and serve ``bundle`` in it; returns (app, served bundle).

    The served bundle links the bundle's ``scripts`` and config files and holds its own ``models/model.pt``: a copy
    of ``weights`` when given, else of the bundle's shipped weights when it has none yet (weights retrained through
    the server are kept across restarts).
    """
    bundle, workdir = Path(bundle).resolve(), Path(workdir).resolve()
    for required in (
        "configs/metadata.json",
        "configs/common.yaml",
        "configs/inference.yaml",
        "configs/train.yaml",
        "scripts/__init__.py",
    ):
        if not (bundle / required).is_file():
            raise FileNotFoundError(f"{bundle} is not this bundle: {required} is missing")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file {weights} not found")
    app = workdir / "monaibundle"
    if not (app / "main.py").is_file():
        shutil.copytree(sample_app(python), app, dirs_exist_ok=True)
    served = app / "model" / model_name
    (served / "models").mkdir(parents=True, exist_ok=True)
    _replace_link(served / "scripts", bundle / "scripts")
    write_served_configs(bundle, served / "configs", overrides)
    served_weights = served / "models" / "model.pt"
    source = Path(weights) if weights is not None else None
    if source is None and not served_weights.is_file():
        source = bundle / "models" / "model.pt"
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(f"weights file {source} not found")
        shutil.copyfile(source, served_weights)
    return app, served


def server_command(
    app: Path,
    studies: Path,
    port: int,
    host: str = "127.0.0.1",
    model_name: str = MODEL_NAME,
    python: Path = MONAILABEL_PYTHON,
) -> list[str]:
    """``python -m monailabel.main start_server`` for the served bundle: local bundle only, no SAM2 models."""
    return [str(python), "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
            "--conf", "models", model_name, "--conf", "zoo_source", "ngc", "--conf", "sam2", "false",
            "--host", host, "--port", str(port)]  # fmt: skip


def server_environment(served_bundle: Path) -> dict:
    """The server's environment: datastore patterns for 2D radiographs, and retrained weights published to the
    served ``models/model.pt`` (train.yaml's ``publish_checkpoint``) so the next inference uses them."""
    environment = dict(os.environ)
    environment["MONAI_LABEL_DATASTORE_FILE_EXT"] = json.dumps(STUDY_PATTERNS)
    environment["CXR_PUBLISH_CHECKPOINT"] = str(served_bundle / "models" / "model.pt")
    return environment


def wait_until_ready(url: str, process: subprocess.Popen, log_file: Path, timeout: float = 180.0) -> None:
    """Poll ``<url>/info/`` until it answers; raise with the log's tail when the process ends or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"MONAI Label server exited with code {process.returncode}:\n{log_tail(log_file)}")
        try:
            with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"MONAI Label server not ready at {url} after {timeout:.0f} s:\n{log_tail(log_file)}")


def log_tail(log_file: Path, characters: int = 4000) -> str:
    try:
        return Path(log_file).read_text(errors="replace")[-characters:]
    except OSError:
        return "(no log)"


def start_server(
    studies: Path,
    port: int,
    workdir: Path = DEFAULT_WORKDIR,
    host: str = "127.0.0.1",
    bundle: Path = BUNDLE,
    weights: Path | None = None,
    overrides: dict | None = None,
    model_name: str = MODEL_NAME,
    python: Path = MONAILABEL_PYTHON,
    timeout: float = 180.0,
) -> Server:
    """Prepare the app, start the server in its own process group (log: ``<workdir>/server.log``), wait until it
    answers; the caller stops it with :func:`stop_server`."""
    check_python(python)
    studies = Path(studies).resolve()
    if not studies.is_dir():
        raise FileNotFoundError(f"studies folder {studies} does not exist")
    app, served = prepare_app(workdir, bundle, weights, overrides, model_name, python)
    log_file = Path(workdir).resolve() / "server.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(
            server_command(app, studies, port, host, model_name, python), cwd=Path(workdir).resolve(),
            env=server_environment(served), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = Server(process, f"http://{host}:{port}", app, served, log_file)
    try:
        wait_until_ready(server.url, process, log_file, timeout)
    except BaseException:
        stop_server(server)
        raise
    return server


def stop_server(server: Server, grace: float = 20.0) -> None:
    """Terminate the server's process group (the server and its training subprocesses); kill what remains."""
    process = server.process
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left in the group (e.g. a training subprocess)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait(timeout=grace)


def count_studies(studies: Path) -> int:
    return sum(len(list(Path(studies).glob(pattern))) for pattern in STUDY_PATTERNS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", required=True, type=Path, help="folder of radiographs (PNG, JPEG) to annotate")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="where the app and served bundle live")
    parser.add_argument("--weights", type=Path, help="weights to serve (default: the bundle's, on first start)")
    parser.add_argument("--model-name", default=MODEL_NAME, help="model name shown to clients")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="top-level config value for the served inference.yaml/train.yaml, e.g. image_size=[64,64]",
    )
    parser.add_argument("--python", type=Path, default=MONAILABEL_PYTHON, help="python of the MONAI Label environment")
    args = parser.parse_args(argv)
    try:
        overrides = dict(parse_override(text) for text in args.override)
        server = start_server(args.studies, args.port, args.workdir, args.host, weights=args.weights,
                              overrides=overrides, model_name=args.model_name, python=args.python)  # fmt: skip
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MONAI Label server: {server.url}/  (model {args.model_name!r}, "
          f"{count_studies(args.studies)} radiographs in {Path(args.studies).resolve()})")  # fmt: skip
    print(f"app: {server.app}  served bundle: {server.served_bundle}  log: {server.log_file}")
    print("Ctrl-C stops the server.", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a plain `kill` of the launcher stops the server too
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(server)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
