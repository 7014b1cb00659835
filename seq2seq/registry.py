"""Loading an exported translator from MLflow without running code from the artifact store.

`load_registered("models:/nmt-en-fr@champion")` resolves the version, downloads its files, checks the
weights file against the version's `weights_sha256` tag (set by the export stage) and against the digest in
the model's MLmodel file, and loads weights (torch `weights_only`), SentencePiece model and decoding options
with this project's own code. nmt-translate and the evaluate-champion flow load models this way. The
champion server and the deliver-champion flow load the pyfunc model with `load_checked_pyfunc`: the
installed code, over files checked against the registry. Only a plain
`mlflow.pyfunc.load_model("models:/...")` (e.g. `mlflow models serve`) runs the code stored with the model,
which checks the same digests itself.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seq2seq.checkpoint import CheckpointError
from seq2seq.serving import (
    ARTIFACTS,
    CT2_INT8_DIR,
    CT2_INT8_SHA256,
    WEIGHTS_SHA256,
    LoadedTranslator,
    ct2_digest_file,
    load_translator,
)

MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def resolve(model_uri: str) -> tuple[str, str, dict[str, str]]:
    """(name, version, tags) of the registry version that `models:/<name>@<alias>` or `models:/<name>/<n>` names."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    match = MODELS_URI.match(model_uri)
    if match is None:
        raise CheckpointError(f"{model_uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient()
    try:
        if match["alias"]:
            version = client.get_model_version_by_alias(match["name"], match["alias"])
        else:
            version = client.get_model_version(match["name"], match["version"])
    except MlflowException as err:
        raise CheckpointError(f"{model_uri}: {err.message}") from None
    return match["name"], str(version.version), dict(version.tags)


def bundled_files(model_dir: Path) -> tuple[dict[str, Path], str | None]:
    """The files of a downloaded pyfunc translator by artifact name, and the digest in its MLmodel file."""
    from mlflow.models import Model

    flavor = Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    artifacts = flavor.get("artifacts") or {}
    missing = [name for name in ARTIFACTS if name not in artifacts]
    if missing:
        raise CheckpointError(f"{model_dir}: not an exported translator (no {', '.join(missing)} in its MLmodel)")
    files = {name: model_dir / artifacts[name]["path"] for name in ARTIFACTS}
    return files, (flavor.get("model_config") or {}).get(WEIGHTS_SHA256)


def load_registered(model_uri: str) -> LoadedTranslator:
    """The translator at an MLflow model URI, loaded as data after checking its weights' digest.

    For models:/ URIs the digest must match the registry tag; for others (runs:/, a local directory) the
    MLmodel's own record. A version without the tag is refused: re-export it.
    """
    with tempfile.TemporaryDirectory(prefix="nmt-model-") as tmp:
        checked = download_checked(model_uri, Path(tmp))
        return load_translator(checked.files, checked.weights_sha256, checked.recorded_in)


@dataclass(frozen=True)
class CheckedModel:
    """A downloaded translator whose records agree with the registry's: its files by artifact name, the weights
    digest to load them against and where that digest was recorded; the version's tags for models:/ URIs."""

    model_dir: Path
    files: dict[str, Path]
    weights_sha256: str
    recorded_in: str
    tags: dict[str, str] | None


def download_checked(model_uri: str, dst: Path) -> CheckedModel:
    """Download the translator at `model_uri` into `dst`; for models:/ URIs the version must carry the
    `weights_sha256` tag, and the digest in the MLmodel file must be the same."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    expected = recorded_in = tags = None
    if model_uri.startswith("models:/"):
        name, version, tags = resolve(model_uri)
        expected = tags.get(WEIGHTS_SHA256)
        recorded_in = f"in the registry tag {WEIGHTS_SHA256} of {name} version {version}"
        if expected is None:
            raise CheckpointError(
                f"{model_uri}: {name} version {version} has no {WEIGHTS_SHA256} tag (exported before weights "
                "were checked); refusing to load unverified weights: export the model again"
            )
        model_uri = f"models:/{name}/{version}"
    try:
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as err:
        raise CheckpointError(f"{model_uri}: cannot download the model: {err.message}") from None
    files, in_mlmodel = bundled_files(model_dir)
    if expected is not None and in_mlmodel not in (None, expected):
        raise CheckpointError(
            f"{model_uri}: the MLmodel file records weights sha256 {in_mlmodel} but {recorded_in} is "
            f"{expected}; refusing to load a model whose files were changed after export"
        )
    if expected is None:
        expected, recorded_in = in_mlmodel, "in the model's MLmodel file (model_config)"
    if expected is None:
        raise CheckpointError(f"{model_uri}: no {WEIGHTS_SHA256} recorded for its weights; export it again")
    return CheckedModel(model_dir, files, expected, recorded_in, tags)


def load_checked_pyfunc(model_uri: str, dst: Path) -> tuple[Path, Any]:
    """The version at a models:/ URI as the pyfunc model serving uses: downloaded into `dst`, checked against
    the registry's tags (weights, CTranslate2 export) and loaded with this installation's code, not the code
    stored with it. Returns (the model directory, the mlflow PyFuncModel)."""
    import mlflow.pyfunc

    checked = download_checked(model_uri, dst)
    check_ctranslate2_record(model_uri, checked)
    use_installed_code(checked.model_dir)
    return checked.model_dir, mlflow.pyfunc.load_model(str(checked.model_dir))


def use_installed_code(model_dir: Path) -> None:
    """Make a downloaded translator run this installation's code, not the code stored with it: its "models
    from code" file is replaced by seq2seq/translator_model.py and its bundled copy of seq2seq is removed, so
    `mlflow.pyfunc.load_model(model_dir)` reads the artifact store's files as data only."""
    from mlflow.models import Model

    import seq2seq

    flavor = Model.load(str(model_dir / "MLmodel")).flavors.get("python_function", {})
    code_path, code_dir = flavor.get("model_code_path"), flavor.get("code")
    if code_path is None:
        raise CheckpointError(f"{model_dir}: not a models-from-code translator (no model_code_path); export it again")
    code_file = Path(code_path).name  # where MLflow looks for it: in the model directory, by its base name
    if code_dir is not None and Path(code_dir).name != code_dir:
        raise CheckpointError(f"{model_dir}/MLmodel: code {code_dir!r} is not a directory name in the model")
    shutil.copyfile(Path(seq2seq.__file__).parent / "translator_model.py", model_dir / code_file)
    if code_dir:
        shutil.rmtree(model_dir / code_dir, ignore_errors=True)


def check_ctranslate2_record(model_uri: str, checked: CheckedModel) -> None:
    """A CTranslate2 export in the version's artifacts must have its digest recorded beside it equal to the
    version's `ctranslate2_int8_sha256` tag (the pyfunc then checks the files against the one beside them)."""
    directory = checked.files["checkpoint"].parent / CT2_INT8_DIR
    if not (directory / "model.bin").is_file() or checked.tags is None:
        return
    tag = checked.tags.get(CT2_INT8_SHA256)
    beside = ct2_digest_file(directory)
    recorded = beside.read_text(encoding="ascii").strip() if beside.is_file() else None
    if tag is None or recorded != tag:
        raise CheckpointError(
            f"{model_uri}: its CTranslate2 weights' digest in {beside.name} is {recorded} but the registry tag "
            f"{CT2_INT8_SHA256} is {tag}; refusing a model whose files were changed after delivery"
        )
