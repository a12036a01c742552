"""Model-zoo verification of bundle/, offline: the checks of the zoo's ci/verify_bundle.py (files, version and
changelog, metadata against its schema, large files, verify_net_in_out), its CONTRIBUTING.md rules (file size, config
key names, packages) and its pre-commit hooks (large files, JSON format)."""

import ast
import functools
import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from monai.apps.utils import download_url
from monai.bundle import ConfigParser

from conftest import BUNDLE, config_files, config_paths, run_bundle

CONFIGS = BUNDLE / "configs"
METADATA_PATH = CONFIGS / "metadata.json"
LARGE_FILES_PATH = BUNDLE / "large_files.yml"

# The metadata schema the bundle declares: meta_schema_20240725.json (JSON Schema draft 2019-09), the newest bundle
# metadata schema MONAI publishes, from the MONAI-extra-test-data 0.8.1 release
# (https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json; the same
# file is served from https://project-monai.github.io/schema/, repository Project-MONAI/project-monai.github.io,
# public/schema/). Tests cannot download it, so its required keys and property types are written out here.
SCHEMA_NAME = "meta_schema_20240725.json"
METADATA_REQUIRED = (
    "schema", "version", "monai_version", "pytorch_version", "numpy_version", "required_packages_version", "task",
    "description", "authors", "copyright", "network_data_format",
)  # fmt: skip
METADATA_TYPES = {
    "schema": "string", "version": "string", "changelog": "object", "monai_version": "string",
    "pytorch_version": "string", "numpy_version": "string", "required_packages_version": "object", "task": "string",
    "description": "string", "authors": "string", "copyright": "string", "data_source": "string",
    "data_type": "string", "image_classes": "string", "label_classes": "string", "pred_classes": "string",
    "eval_metrics": "object", "intended_use": "string", "references": "array", "supported_apps": "object",
}  # fmt: skip
ITEM_TYPES = {"references": ("string",)}
# network_data_format, and every key matching NETWORK_IO_KEY, is a "network_io": inputs and outputs (required) and
# post_processed_outputs are objects of named arguments; an argument is a number, string, boolean or a tensor
NETWORK_IO_KEY = re.compile(r"[_a-zA-Z0-9]+_data_format")
NETWORK_IO_REQUIRED = ("inputs", "outputs")
NETWORK_IO_SECTIONS = ("inputs", "outputs", "post_processed_outputs")
TENSOR_REQUIRED = ("type", "format", "num_channels", "spatial_shape", "dtype", "value_range")
TENSOR_TYPES = {
    "type": "string", "format": "string", "num_channels": "integer", "spatial_shape": "array", "dtype": "string",
    "value_range": "array", "is_patch_data": "boolean", "channel_def": "object",
}  # fmt: skip
TENSOR_ITEM_TYPES = {"spatial_shape": ("string", "integer"), "value_range": ("number",)}

# the model-zoo's rules: CONTRIBUTING.md "Model storage" (25 MB a file, larger ones in large_files.yml) and its
# pre-commit check-added-large-files hook (--maxkb=1024); hash types its CI and MONAI's download_url accept
PRE_COMMIT_MAX_BYTES = 1024 * 1024
HASH_TYPES = ("md5", "sha1", "sha256", "sha512")
# ci/verify_bundle.py: necessary and preferred files; CONTRIBUTING.md: docs/README.md and docs/data_license.txt
REQUIRED_FILES = ("configs/metadata.json", "LICENSE", "models/model.pt", "docs/README.md", "docs/data_license.txt")
INFERENCE_CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")
# CONTRIBUTING.md "Preferred Files and Keys": the ids the inference and train configs must define
INFERENCE_KEYS = ("bundle_root", "device", "network_def", "inferer", "output_dir")
TRAINING_KEYS = (
    "bundle_root", "device", "dataset_dir", "output_dir", "train#trainer", "train#trainer#max_epochs",
    "train#dataset", "train#dataset#data", "train#handlers", "validate#evaluator", "validate#handlers",
    "validate#dataset", "validate#dataset#data", "val_interval",
)  # fmt: skip
# the packages a bundle needs beyond those the metadata names with their own keys
BASE_PACKAGES = {"monai": "monai_version", "torch": "pytorch_version", "numpy": "numpy_version"}
# packages of optional features (not in the schema, which allows extra keys; not "optional_packages_version", which
# MONAI 1.6 treats as a deprecated name of required_packages_version and moves over it)
OPTIONAL_PACKAGES_KEY = "optional_features_packages_version"
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")


def load_metadata() -> dict:
    return json.loads(METADATA_PATH.read_text(encoding="utf-8"))


def is_json_type(value: object, name: str) -> bool:
    """Whether ``value`` (parsed from JSON) is of the JSON Schema type ``name``."""
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "array": list}
    return isinstance(value, types[name])


def typed_errors(where: str, content: dict, required: tuple, types: dict, item_types: dict) -> list[str]:
    """Missing required keys, values of the wrong type and array items of the wrong type in ``content``."""
    errors = [f"{where}: missing '{key}'" for key in required if key not in content]
    for key, name in types.items():
        if key in content and not is_json_type(content[key], name):
            errors.append(f"{where}.{key}: not of type {name}")
        elif key in content and key in item_types:
            if not all(any(is_json_type(item, kind) for kind in item_types[key]) for item in content[key]):
                errors.append(f"{where}.{key}: an item not of type {' or '.join(item_types[key])}")
    return errors


def argument_errors(where: str, argument: object) -> list[str]:
    """A network argument or result: a number, string or boolean, or a tensor description."""
    if not isinstance(argument, dict):
        scalar = any(is_json_type(argument, kind) for kind in ("number", "string", "boolean"))
        return [] if scalar else [f"{where}: not a number, string, boolean or tensor object"]
    return typed_errors(where, argument, TENSOR_REQUIRED, TENSOR_TYPES, TENSOR_ITEM_TYPES)


def network_io_errors(where: str, network_io: object) -> list[str]:
    if not isinstance(network_io, dict):
        return [f"{where}: not of type object"]
    errors = [f"{where}: missing '{key}'" for key in NETWORK_IO_REQUIRED if key not in network_io]
    for section in NETWORK_IO_SECTIONS:
        if section in network_io and not isinstance(network_io[section], dict):
            errors.append(f"{where}.{section}: not of type object")
        elif section in network_io:
            for name, argument in network_io[section].items():
                errors += argument_errors(f"{where}.{section}.{name}", argument)
    return errors


def schema_errors(metadata: dict) -> list[str]:
    """What ``metadata`` breaks of the required keys and types of meta_schema_20240725.json."""
    errors = typed_errors("metadata", metadata, METADATA_REQUIRED, METADATA_TYPES, ITEM_TYPES)
    for key, value in metadata.items():
        if key == "network_data_format" or NETWORK_IO_KEY.fullmatch(key):
            errors += network_io_errors(f"metadata.{key}", value)
    return errors


def test_metadata_declares_the_schema_it_is_checked_against():
    schema = load_metadata()["schema"]
    assert schema.startswith("https://") and schema.rsplit("/", 1)[-1] == SCHEMA_NAME


def test_metadata_satisfies_the_declared_schema():
    metadata = load_metadata()
    assert schema_errors(metadata) == []
    assert isinstance(metadata.get("name"), str) and metadata["name"]  # the zoo's display name (CONTRIBUTING.md)


def test_schema_check_reports_missing_and_mistyped_keys():
    metadata = load_metadata()
    del metadata["required_packages_version"]
    metadata["references"] = ["a paper", 3]
    image = metadata["network_data_format"]["inputs"]["image"]
    image["num_channels"] = "1"
    del image["value_range"]
    metadata["network_data_format"]["outputs"]["pred"]["spatial_shape"] = [224, 224.5]
    metadata["extra_data_format"] = {"inputs": {}}
    assert schema_errors(metadata) == [
        "metadata: missing 'required_packages_version'",
        "metadata.references: an item not of type string",
        "metadata.network_data_format.inputs.image: missing 'value_range'",
        "metadata.network_data_format.inputs.image.num_channels: not of type integer",
        "metadata.network_data_format.outputs.pred.spatial_shape: an item not of type string or integer",
        "metadata.extra_data_format: missing 'outputs'",
    ]


def test_monai_reads_the_metadata_unchanged():
    """MONAI renames a deprecated ``optional_packages_version`` key to ``required_packages_version``, replacing it."""
    parser = ConfigParser()
    parser.read_meta(str(METADATA_PATH))
    assert parser.get(parser.meta_key) == load_metadata()


def test_metadata_is_formatted_as_the_zoo_pre_commit_formats_json():
    """pre-commit's pretty-format-json with --indent=4 --no-sort-keys: 4-space indent, ASCII, a final newline."""
    text = METADATA_PATH.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=4, separators=(",", ": ")) + "\n"


def test_version_is_semver_and_the_newest_changelog_entry():
    metadata = load_metadata()
    versions = list(metadata["changelog"])
    assert SEMVER.fullmatch(metadata["version"])
    assert all(SEMVER.fullmatch(version) for version in versions), versions
    assert all(isinstance(text, str) and text.strip() for text in metadata["changelog"].values())
    newest = max(versions, key=lambda version: tuple(int(part) for part in version.split(".")))
    assert metadata["version"] == newest == versions[0]


def test_required_files_exist():
    assert [name for name in REQUIRED_FILES if not (BUNDLE / name).is_file()] == []
    assert any((CONFIGS / name).is_file() for name in INFERENCE_CONFIG_NAMES)


def test_large_files_lists_the_weights_with_their_hash():
    entries = yaml.safe_load(LARGE_FILES_PATH.read_text(encoding="utf-8"))["large_files"]
    assert [entry["path"] for entry in entries] == ["models/model.pt"]
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"} and isinstance(entry["url"], str)
        assert entry["hash_type"] in HASH_TYPES
        path = BUNDLE / entry["path"]
        assert path.is_file()  # committed here, so the download below only checks the hash (no network)
        download_url(url=entry["url"], filepath=path, hash_val=entry["hash_val"], hash_type=entry["hash_type"])


def bundle_files() -> list[Path]:
    """The bundle's files as git would commit them (tracked, or untracked and not ignored)."""
    listing = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "."],
        cwd=BUNDLE, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    paths = (BUNDLE / name for name in listing.stdout.split("\0") if name)
    return [path for path in paths if path.is_file()]


def test_files_over_the_zoo_size_limit_are_listed_in_large_files():
    listed = {entry["path"] for entry in yaml.safe_load(LARGE_FILES_PATH.read_text(encoding="utf-8"))["large_files"]}
    files = bundle_files()
    large = {path.relative_to(BUNDLE).as_posix() for path in files if path.stat().st_size > PRE_COMMIT_MAX_BYTES}
    assert large == listed
    assert [path for path in files if path.suffix == ".pyc" or "__pycache__" in path.parts] == []


def config_parser(workflow: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(config_paths(workflow))
    return parser


@pytest.mark.parametrize("workflow, keys", [("inference", INFERENCE_KEYS), ("training", TRAINING_KEYS)])
def test_configs_define_the_ids_the_zoo_requires(workflow, keys):
    parser = config_parser(workflow)
    assert [key for key in keys if key not in parser] == []


def test_validation_handler_interval_is_val_interval():
    handlers = config_parser("training")["train#handlers"]
    validation = [handler for handler in handlers if str(handler.get("_target_", "")).endswith("ValidationHandler")]
    assert len(validation) == 1 and validation[0]["interval"] == "@val_interval"


def test_verify_net_in_out_passes():
    result = run_bundle("verify_net_in_out", "network_def", "--config_file", config_files("inference"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def normalized(distribution: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def declared_packages(metadata: dict) -> tuple[dict, dict]:
    """The required and optional distributions of ``metadata`` (normalized names) with their versions."""
    required = {normalized(name): version for name, version in metadata["required_packages_version"].items()}
    required |= {name: metadata[key] for name, key in BASE_PACKAGES.items()}
    optional = {normalized(name): version for name, version in metadata.get(OPTIONAL_PACKAGES_KEY, {}).items()}
    return required, optional


@functools.cache
def distributions_of_modules() -> dict[str, set[str]]:
    """Each installed top-level module with the distributions (normalized names) that provide it."""
    provided = importlib.metadata.packages_distributions()
    return {module: {normalized(name) for name in names} for module, names in provided.items()}


def modules_of(distribution: str) -> list[str]:
    """The top-level modules a distribution installs."""
    return sorted(module for module, names in distributions_of_modules().items() if distribution in names)


def test_declared_packages_are_installed_at_their_versions_and_import():
    required, optional = declared_packages(load_metadata())
    installed = {name: importlib.metadata.version(name).split("+")[0] for name in {**required, **optional}}
    assert installed == {**required, **optional}
    for name in required:
        assert modules_of(name), name
        for module in modules_of(name):
            importlib.import_module(module)


def imported_modules(source: Path) -> dict[str, bool]:
    """Top-level modules imported by a Python file, each with whether it is imported at module level."""
    modules: dict[str, bool] = {}

    def visit(node: ast.AST, in_function: bool) -> None:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            modules[top] = modules.get(top, False) or not in_function
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(ast.parse(source.read_text(encoding="utf-8")), False)
    return modules


def config_imports() -> set[str]:
    """Top-level modules the configs' ``imports`` lists import ("$import x", "$from x import y")."""
    modules = set()
    for path in CONFIGS.glob("*.yaml"):
        for line in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("imports", []):
            match = re.match(r"\$\s*(?:import|from)\s+([\w.]+)", str(line))
            if match:
                modules.add(match.group(1).split(".")[0])
    return modules


def third_party(module: str) -> bool:
    return module not in sys.stdlib_module_names and module not in ("scripts", "__future__")


def test_every_imported_package_is_declared_and_optional_ones_are_imported_lazily():
    required, optional = declared_packages(load_metadata())
    imports: dict[str, bool] = {module: True for module in config_imports()}
    for source in sorted((BUNDLE / "scripts").glob("*.py")):
        for module, at_module_level in imported_modules(source).items():
            imports[module] = imports.get(module, False) or at_module_level
    third_party_imports = {module: eager for module, eager in imports.items() if third_party(module)}
    providers = {module: distributions_of_modules().get(module, set()) for module in third_party_imports}
    assert [module for module, names in providers.items() if not names & (set(required) | set(optional))] == []
    optional_only = [module for module, names in providers.items() if not names & set(required)]
    assert [module for module in optional_only if third_party_imports[module]] == []


def test_shipping_weights_updates_their_hash_in_large_files(tmp_path):
    """scripts/ship_model.py keeps large_files.yml true when it writes new weights."""
    import torch
    from ship_model import main as ship_model

    from scripts.severity_calibration import file_sha256

    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "large_files.yml").write_text(LARGE_FILES_PATH.read_text())
    checkpoint = tmp_path / "model.pt"
    torch.save({"model": {"weight": torch.ones(3)}}, checkpoint)
    assert ship_model(["--checkpoint", str(checkpoint), "--output", str(bundle / "models" / "model.pt")]) == 0
    listed = yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]
    assert [entry["hash_val"] for entry in listed if entry["path"] == "models/model.pt"] == [
        file_sha256(str(bundle / "models" / "model.pt"))
    ]
    assert (bundle / "large_files.yml").read_text().startswith("# Files over the model-zoo")  # comments kept
