"""The `deliver-champion` flow: what follows when someone points `champion` at a model version.

However the alias moved (the MLflow UI, the API, `python -m seq2seq.promote`), MLflow's webhook reaches
flows/mlflow_webhook.py, which emits the Prefect event `mlflow.model-version.alias.created`; the trigger of
the deliver-champion deployment (prefect.yaml) starts this flow for alias `champion`. In this worker's clone:

1. the alias must still point at the version (a later promotion supersedes this run, which then does nothing);
2. lineage: the version's tags must name its git commit, params hash and the DVC hashes of its data;
3. it is re-scored on params.yaml's test sets with the evaluate stage's scorer (same sacrebleu signature);
4. the guard after the fact: if its BLEU on the first test set is below the previously delivered champion's by
   more than export.promotion_margin (or its lineage is incomplete), `champion` goes back to that version,
   the version is tagged with the reason and with who set the alias, and the run fails;
5. otherwise a Transformer is exported to CTranslate2 int8 into the version's artifacts, if its BLEU is no more
   than 0.5 below PyTorch's on any test set (int8 scoring higher is no reason to refuse it); scores and decode
   speeds of both become version tags. Other families
   (CTranslate2 runs Transformers only) are served with PyTorch, and the tags say so;
6. a markdown artifact sums it up, linked from the version's description; the registered model's tag
   `delivery.champion` names the delivered version, which `python -m seq2seq.champion_server` follows.
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from flows.evaluate_champion import pull_missing
from flows.workspace import log, resolve_workdir, workspace_lock
from seq2seq.promote import CHAMPION, DELIVERED_TAG

CT2_BLEU_TOLERANCE = 0.5  # CTranslate2 int8 may score at most this much BLEU below PyTorch on each test set
LINEAGE_TAGS = ("git_commit", "params_sha256", "dvc.md5.data/raw", "dvc.md5.data/clean", "dvc.md5.data/tokenized")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")
SAME_PROMOTION_S = 120  # a seq2seq.promote tag this close to the alias event names who set it


class DeliveryRejected(RuntimeError):
    """The promoted version failed the checks; `champion` was moved back. The message says why."""


@dataclass
class Score:
    """One backend's result on one test set."""

    bleu: float
    signature: str
    sentences_per_s: float


@dataclass
class Delivery:
    """What the run found and did, for the tags and the report."""

    name: str
    version: str
    previous: str | None
    alias_set_by: str
    family: str = ""
    pytorch: dict[str, Score] = field(default_factory=dict)
    ctranslate2: dict[str, Score] = field(default_factory=dict)
    ctranslate2_note: str = ""
    decision: str = ""


# --- pure decisions -------------------------------------------------------------------------------


def missing_lineage(tags: Mapping[str, str]) -> list[str]:
    """The lineage tags a version lacks (a git commit of "unknown" counts as missing)."""
    return [t for t in LINEAGE_TAGS if not tags.get(t) or tags[t] == "unknown"]


def guard(test_set: str, candidate: Score, previous: Score | None, previous_version: str | None, margin: float) -> str:
    """Why the candidate stays champion; raises DeliveryRejected when it scores below the previous champion by
    more than `margin` BLEU, or when the two scores are not comparable (different sacrebleu signatures)."""
    if previous is None:
        return "no champion was delivered before"
    if candidate.signature != previous.signature:
        raise DeliveryRejected(
            f"BLEU on {test_set} not comparable: signature {candidate.signature} vs the previous champion's "
            f"(version {previous_version}) {previous.signature}"
        )
    summary = (
        f"BLEU on {test_set}: {candidate.bleu:.2f} vs the previous champion (version {previous_version}) "
        f"{previous.bleu:.2f}, margin {margin:.2f}"
    )
    if candidate.bleu < previous.bleu - margin:
        raise DeliveryRejected(f"scores below the previous champion by more than the margin: {summary}")
    return summary


def alias_setter(tags: Mapping[str, str], alias_set_at: datetime | None) -> str:
    """Who set the alias, as far as anyone can tell: MLflow records no user for an alias change (its webhook
    payload has none), but `seq2seq.promote` tags the version with `promotion.by` and `promotion.at`."""
    by, at = tags.get("promotion.by"), tags.get("promotion.at")
    if by and at and alias_set_at is not None:
        with contextlib.suppress(ValueError):
            if abs((datetime.fromisoformat(at) - alias_set_at).total_seconds()) <= SAME_PROMOTION_S:
                return f"{by} (seq2seq.promote)"
    return "unknown: set in the MLflow UI or API, which records no user for an alias change"


def parse_inputs(model_name: str, version: str, alias_set_at: str | None) -> tuple[str, str, datetime | None]:
    """The flow's untrusted parameters, checked: one clear line naming the bad one."""
    if not NAME_RE.match(model_name):
        raise ValueError(f"deliver-champion: model_name {model_name[:100]!r} is not a registered model name")
    if not VERSION_RE.match(version):
        raise ValueError(f"deliver-champion: version {version[:100]!r} is not a model version number")
    try:
        when = datetime.fromisoformat(alias_set_at) if alias_set_at else None
    except ValueError:
        raise ValueError(f"deliver-champion: alias_set_at {alias_set_at[:100]!r} is not an ISO 8601 time") from None
    if when is not None and when.tzinfo is None:
        raise ValueError(f"deliver-champion: alias_set_at {alias_set_at!r} has no time zone")
    return model_name, version, when


def delivery_tags(d: Delivery) -> dict[str, str]:
    """The version tags that record the scores and speeds (what `seq2seq.champion_server` and people read)."""
    tags: dict[str, str] = {}
    for test_set, s in d.pytorch.items():
        tags[f"delivery.bleu.{test_set}"] = f"{s.bleu:.2f}"
        tags[f"delivery.bleu_signature.{test_set}"] = s.signature
        tags[f"delivery.pytorch.sentences_per_s.{test_set}"] = f"{s.sentences_per_s:.1f}"
    for test_set, s in d.ctranslate2.items():
        tags[f"delivery.ctranslate2_int8.bleu.{test_set}"] = f"{s.bleu:.2f}"
        tags[f"delivery.ctranslate2_int8.sentences_per_s.{test_set}"] = f"{s.sentences_per_s:.1f}"
    if d.ctranslate2_note:
        tags["delivery.ctranslate2"] = d.ctranslate2_note
    return tags


def report_markdown(d: Delivery, status: str, model_link: str) -> str:
    rows = []
    for test_set, pt in d.pytorch.items():
        ct2 = d.ctranslate2.get(test_set)
        ct2_cells = (
            f"{ct2.bleu:.2f} | {ct2.bleu - pt.bleu:+.2f} | {ct2.sentences_per_s:.1f} | "
            f"x{ct2.sentences_per_s / pt.sentences_per_s:.1f}"
            if ct2
            else "– | – | – | –"
        )
        rows.append(f"| {test_set} | {pt.bleu:.2f} | {pt.sentences_per_s:.1f} | {ct2_cells} |")
    signatures = sorted({s.signature for s in d.pytorch.values()})
    return "\n".join(
        [
            f"# `{d.name}` version {d.version} as champion: {status}",
            "",
            f"- model version: {model_link}",
            f"- family: {d.family or 'not loaded'}; alias set by: {d.alias_set_by}",
            f"- previous champion: {f'version {d.previous}' if d.previous else 'none delivered'}",
            f"- decision: {d.decision}",
            f"- CTranslate2 int8: {d.ctranslate2_note or 'not attempted'}",
            "",
            "| test set | PyTorch BLEU | PyTorch sent/s | CT2 int8 BLEU | Δ | CT2 int8 sent/s | speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            *(f"sacrebleu: `{s}`" for s in signatures),
            "",
        ]
    )


# --- the steps ------------------------------------------------------------------------------------


def translate_timed(translate, texts: list[str]) -> tuple[list[str], float]:
    """The translations and sentences per second, after a warm-up batch (one-time set-up is not decoding)."""
    translate(texts[:8])
    start = time.perf_counter()
    out = translate(texts)
    return out, len(texts) / max(time.perf_counter() - start, 1e-9)


@task(name="re-score", cache_policy=NO_CACHE)
def rescore(translate, test_sets: dict[str, tuple[Path, Path]], chrf_word_order: int, label: str) -> dict[str, Score]:
    """Translate each test set with `translate` (texts -> texts), time it, and score it as the evaluate stage does."""
    from seq2seq.score import score_corpus
    from seq2seq.textio import read_lines

    scores = {}
    for name, (src, ref) in test_sets.items():
        hypotheses, speed = translate_timed(translate, list(read_lines(src)))
        s = score_corpus(hypotheses, [list(read_lines(ref))], chrf_word_order, bootstrap_samples=0)
        scores[name] = Score(s["bleu"], s["signature"], speed)
        log().info("%s on %s: BLEU %.2f, %.1f sentences/s", label, name, s["bleu"], speed)
    return scores


@task(name="export CTranslate2 int8", cache_policy=NO_CACHE)
def export_int8(checkpoint: Path, spm: Path, out: Path) -> Path:
    from seq2seq.ctranslate2_export import export_ctranslate2

    return export_ctranslate2(checkpoint, spm, out, quantization="int8")


def previous_score(client, name: str, version: str, test_set: str) -> Score | None:
    """The delivered score of `version` on `test_set` from its tags, or None when it has none."""
    tags = client.get_model_version(name, version).tags
    bleu, signature = tags.get(f"delivery.bleu.{test_set}"), tags.get(f"delivery.bleu_signature.{test_set}")
    if bleu is None or signature is None:
        return None
    return Score(float(bleu), signature, float(tags.get(f"delivery.pytorch.sentences_per_s.{test_set}", 0)))


def link_report(client, name: str, version: str, url: str) -> None:
    """Point the version's description (markdown in the MLflow UI) at this run's report."""
    description = client.get_model_version(name, version).description or ""
    kept = [line for line in description.splitlines() if not line.startswith("Delivery report:")]
    client.update_model_version(name, version, "\n".join([*kept, f"Delivery report: [{url}]({url})"]).strip())


def model_id_of(version) -> str:
    """The logged model behind a registered version (MLflow 3: its source is models:/<model id>)."""
    model_id = getattr(version, "model_id", None) or version.source.removeprefix("models:/")
    if not model_id.startswith("m-"):
        raise RuntimeError(f"version {version.version} has source {version.source}, not a logged model of MLflow 3")
    return model_id


def load_params_with(path: Path, overrides: dict[str, Any] | None):
    """params.yaml of the clone, with dotted `overrides` applied in memory (the file is left as it is)."""
    from seq2seq.config import parse_params, set_dotted

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_params(raw, path)


@flow(name="deliver-champion", log_prints=True)
def deliver_champion(
    model_name: str,
    version: str,
    alias_set_at: str | None = None,
    overrides: dict[str, Any] | None = None,
    remote: str | None = None,
    workdir: str | None = None,
    lock_wait_s: float = 600,
) -> dict[str, Any]:
    """Check, export and hand over `models:/<model_name>/<version>` as the new champion (see the module doc).

    alias_set_at: when the alias moved (the event's time, ISO 8601), to tell who moved it.
    overrides: dotted params keys applied to the clone's params.yaml, e.g. {"mlflow.tracking_uri": ...}.
    """
    from mlflow import MlflowClient

    from seq2seq import paths
    from seq2seq.promote import current_champion
    from seq2seq.tracking import setup_mlflow

    name, version, set_at = parse_inputs(model_name, version, alias_set_at)
    wd = resolve_workdir(workdir)
    params = load_params_with(wd / "params.yaml", overrides)
    setup_mlflow(params.mlflow)
    client = MlflowClient()
    if current_champion(client, name) != version:
        log().info("%s: champion no longer points at version %s; a later promotion supersedes this run", name, version)
        return {"status": "superseded"}
    previous = client.get_registered_model(name).tags.get(DELIVERED_TAG)
    mv = client.get_model_version(name, version)
    if previous == version and mv.tags.get("delivery.status") == "delivered":
        log().info("%s version %s is the delivered champion already (e.g. restored after a rejection)", name, version)
        return {"status": "already delivered"}

    d = Delivery(name, version, previous, alias_setter(mv.tags, set_at))
    report_url = f"{flow_run.ui_url}?tab=Artifacts" if flow_run.ui_url else f"Prefect flow run {flow_run.id}"
    common = {
        "delivery.flow_run": str(flow_run.id),
        "delivery.report": report_url,
        "delivery.alias_set_by": d.alias_set_by,
    }
    src, tgt = params.data.langs
    test_sets = {t: (wd / paths.CLEAN / "test" / f"{t}.{src}", wd / paths.RAW / f"{t}.{tgt}") for t in params.data.test}
    decisive, chrf = params.data.test[0], params.evaluate.chrf_word_order
    try:
        if missing := missing_lineage(mv.tags):
            raise DeliveryRejected(f"lineage tags missing: {', '.join(missing)}")
        with workspace_lock(wd, lock_wait_s, holder=f"deliver-champion flow run {flow_run.id}"):
            pull_missing(wd, [p for pair in test_sets.values() for p in pair], remote)
        with tempfile.TemporaryDirectory(prefix="deliver-") as tmp:
            model = load_version(name, version, Path(tmp))
            d.family = type(model.translator.model).__name__
            d.pytorch = rescore(model.translate_pytorch, test_sets, chrf, f"version {version}, PyTorch")
            prior = previous_score(client, name, previous, decisive) if previous else None
            if previous and (prior is None or prior.signature != d.pytorch[decisive].signature):
                log().info("re-scoring the previous champion, version %s, for a comparable BLEU", previous)
                old = load_version(name, previous, Path(tmp) / "previous")
                prior = rescore(old.translate_pytorch, test_sets, chrf, f"version {previous}, PyTorch")[decisive]
            d.decision = guard(decisive, d.pytorch[decisive], prior, previous, params.export.promotion_margin)
            deliver_ctranslate2(client, d, mv, model, test_sets, chrf)
    except DeliveryRejected as err:
        d.decision = f"rejected: {err}"
        reason = f"{err}; {restore_previous(client, name, version, previous)}"
        set_tags(
            client,
            name,
            version,
            {**common, **delivery_tags(d), "delivery.status": "rejected", "delivery.reason": reason},
        )
        publish(client, d, "rejected", params.mlflow.tracking_uri, report_url)
        raise DeliveryRejected(
            f"{name} version {version} as champion: {reason} (alias set by {d.alias_set_by})"
        ) from None

    backend = "ctranslate2-int8" if d.ctranslate2_note.startswith("exported") else "pytorch"
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    set_tags(
        client,
        name,
        version,
        {**common, **delivery_tags(d), "delivery.status": "delivered", "delivery.at": now, "delivery.backend": backend},
    )
    client.set_registered_model_tag(name, DELIVERED_TAG, version)
    publish(client, d, "delivered", params.mlflow.tracking_uri, report_url)
    if d.ctranslate2_note.startswith("rejected"):
        raise RuntimeError(
            f"{name} version {version} delivered with PyTorch only: CTranslate2 int8 {d.ctranslate2_note}"
        )
    return {"status": "delivered", "backend": backend, "previous": previous, "decision": d.decision}


@dataclass
class LoadedVersion:
    """A registered version downloaded to `root` and loaded as the pyfunc model users get (which checks the
    weights against the sha256 recorded at export)."""

    root: Path
    pyfunc: Any  # seq2seq.serving.Translator

    @property
    def translator(self) -> Any:
        """The loaded PyTorch model, tokenizer, decoding options and device (seq2seq.serving.LoadedTranslator)."""
        return self.pyfunc.translator

    @property
    def artifacts(self) -> dict[str, Path]:
        return self.pyfunc.artifacts

    @property
    def decoding(self):
        return self.translator.decoding.model_copy(update={"nbest": 1})

    def translate_pytorch(self, texts: list[str]) -> list[str]:
        """The version's own PyTorch model and decoding options, whatever else its artifacts hold."""
        from seq2seq.translate import translate_texts

        t = self.translator
        return [n[0].text for n in translate_texts(t.model, t.tokenizer, texts, self.decoding, t.device)]


def load_version(name: str, version: str, root: Path) -> LoadedVersion:
    """The version's files, checked against its registry tags, loaded with this installation's code."""
    from seq2seq.registry import load_checked_pyfunc

    model_dir, model = load_checked_pyfunc(f"models:/{name}/{version}", root)
    return LoadedVersion(model_dir, model.unwrap_python_model())


def set_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value[:5000])  # MLflow's limit on a tag value


def deliver_ctranslate2(client, d: Delivery, mv, model: LoadedVersion, test_sets, chrf: int) -> None:
    """Export a Transformer to CTranslate2 int8, score it, and upload it beside the checkpoint if it holds up."""
    from seq2seq.ctranslate2_export import translate_texts_ctranslate2
    from seq2seq.serving import CT2_INT8_DIR, directory_sha256, load_ctranslate2
    from seq2seq.transformer import Transformer

    t = model.translator
    if not isinstance(t.model, Transformer):
        d.ctranslate2_note = f"skipped: CTranslate2 runs Transformers, this is {d.family}; served with PyTorch"
        log().warning("%s", d.ctranslate2_note)
        return
    try:
        import ctranslate2  # noqa: F401
    except ModuleNotFoundError:
        d.ctranslate2_note = "skipped: ctranslate2 is not installed on this worker (pip install -e '.[ctranslate2]')"
        log().warning("%s", d.ctranslate2_note)
        return
    checkpoint = Path(model.artifacts["checkpoint"])
    with tempfile.TemporaryDirectory(prefix="ct2-") as tmp:
        upload = Path(tmp) / "upload"  # what goes into the version's artifacts: the export and its digest
        upload.mkdir()
        out = export_int8(checkpoint, Path(model.artifacts["tokenizer"]), upload / CT2_INT8_DIR)
        digest = directory_sha256(out)
        fast = load_ctranslate2(out, digest, "at export")
        opts, max_positions = model.decoding, t.model.cfg.max_positions
        d.ctranslate2 = rescore(
            lambda texts: translate_texts_ctranslate2(fast, t.tokenizer, texts, opts, max_positions),
            test_sets,
            chrf,
            f"version {d.version}, CTranslate2 int8",
        )
        off = {name: s.bleu - d.pytorch[name].bleu for name, s in d.ctranslate2.items()}
        if worst := [f"{name} {delta:+.2f}" for name, delta in off.items() if delta < -CT2_BLEU_TOLERANCE]:
            d.ctranslate2_note = (
                f"rejected: BLEU below PyTorch's by more than {CT2_BLEU_TOLERANCE} ({', '.join(worst)})"
            )
            log().error("%s", d.ctranslate2_note)
            return
        artifact_path = upload_ctranslate2(client, mv, out, digest, checkpoint.parent.relative_to(model.root))
        d.ctranslate2_note = (
            f"exported to the version's artifacts ({artifact_path}); BLEU at most {CT2_BLEU_TOLERANCE} below PyTorch's"
        )


def upload_ctranslate2(client, mv, out: Path, digest: str, parent: Path) -> str:
    """Upload the CTranslate2 export `out` into the version's artifacts under `parent`, with its digest written
    beside it, then record the digest as the version's tag (the loaders check both)."""
    from seq2seq.serving import CT2_INT8_SHA256, ct2_digest_file

    ct2_digest_file(out).write_text(digest + "\n", encoding="ascii")
    client.log_model_artifacts(model_id_of(mv), str(out.parent), parent.as_posix())
    client.set_model_version_tag(mv.name, mv.version, CT2_INT8_SHA256, digest)
    return f"{parent.as_posix()}/{out.name}"


def restore_previous(client, name: str, version: str, previous: str | None) -> str:
    """Move `champion` back to the previously delivered version (if it still points at `version`)."""
    from seq2seq.promote import current_champion

    if current_champion(client, name) != version:
        return "champion had already moved on; left as it is"
    if previous:
        client.set_registered_model_alias(name, CHAMPION, previous)
        return f"champion moved back to version {previous}"
    client.delete_registered_model_alias(name, CHAMPION)
    return "champion removed (no version was delivered before)"


def publish(client, d: Delivery, status: str, tracking_uri: str, report_url: str) -> None:
    """The run's markdown artifact, linked from the version's description."""
    markdown = report_markdown(d, status, version_link(tracking_uri, d.name, d.version))
    create_markdown_artifact(key="champion-delivery", markdown=markdown, description=f"{d.name} v{d.version}")
    link_report(client, d.name, d.version, report_url)


def version_link(tracking_uri: str, name: str, version: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        url = f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}"
        return f"[models:/{name}/{version}]({url})"
    return f"`models:/{name}/{version}`"
