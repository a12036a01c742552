"""Crash-safe training checkpoints: atomic writes, resuming from the newest readable checkpoint with the record of the
best validation epoch, and publishing a run's weights when it ends.

- :class:`AtomicCheckpointSaver` is MONAI's CheckpointSaver whose files are written to a hidden temporary file, synced
  and renamed (MONAI turns ignite's atomic saving off), so a SIGKILL mid-write never leaves a truncated checkpoint;
  an older checkpoint is deleted only after the newer one is complete.
- :func:`latest_checkpoint` skips an unreadable newest checkpoint (0-byte, truncated) for the previous one, warning.
- :class:`BestMetricRecord` keeps the validator's best key metric, its epoch and the best-model saver's record in
  the trainer's checkpoints and restores them on resume, so a resumed run replaces ``model.pt`` only by a better epoch.
- :class:`PublishWeights` writes a run's weights to the served weights file when training ends, if a publish gate
  finds them not worse than the served ones, keeping the replaced weights.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import tempfile
import time

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from scripts.label_io import process_umask

logger = logging.getLogger(__name__)

RECORD_KEY = "best_validation"  # the BestMetricRecord's entry in the trainer's checkpoints
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".tmp-", ".partial"  # hidden: never matched by checkpoint file patterns
TEMPORARY_PATTERN = f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"


def _epoch(path: str) -> int:
    return int(path.rsplit("=", 1)[1].split(".")[0])


def readable_checkpoint(path: str) -> str | None:
    """None when ``path`` loads as a checkpoint, else the reason it does not."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, 0-byte file, unpickling error...
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def state_dict_of(checkpoint: dict) -> dict:
    """The network weights of a CheckpointSaver file (a bare state dict, or one under the key ``model``)."""
    return checkpoint["model"] if "model" in checkpoint and isinstance(checkpoint["model"], dict) else checkpoint


def latest_checkpoint(folder: str) -> str | None:
    """Newest readable ``checkpoint_epoch=N.pt`` written by the trainer's CheckpointSaver in ``folder``, or None.

    Custom: MONAI's CheckpointLoader loads a named file; finding the newest readable one is left to the user.

    An unreadable newer checkpoint is skipped with a warning naming it; when checkpoints exist but none is readable,
    :class:`RuntimeError` names them (delete them to start the run afresh). Temporary files of an interrupted
    :class:`AtomicDiskSaver` write are removed.
    """
    for temporary in glob.glob(os.path.join(folder, TEMPORARY_PATTERN)):  # a write killed before its rename
        logger.warning(f"removing {temporary}, left by a checkpoint write that was interrupted")
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
    candidates = sorted(glob.glob(os.path.join(folder, "*checkpoint_epoch=*.pt")), key=_epoch, reverse=True)
    unreadable = []
    for path in candidates:
        problem = readable_checkpoint(path)
        if problem is None:
            return path
        logger.warning(f"skipping unreadable checkpoint {path} ({problem}); trying the previous one")
        unreadable.append(path)
    if unreadable:
        raise RuntimeError(
            f"no readable checkpoint to resume from in {folder}: {', '.join(unreadable)} cannot be "
            "loaded; delete them to start this run afresh"
        )
    return None


class AtomicDiskSaver(DiskSaver):
    """ignite's DiskSaver writing each file atomically and synced, with the umask's permissions.

    ``filename`` fixes the file's name (``model.pt``) whatever name ignite asks for. Removing a file is deferred until
    the next file is saved: ignite removes the checkpoint it replaces before writing the new one.
    """

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, atomic=True, require_empty=False)
        self.filename = filename
        self._to_remove: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)
        if idist.get_rank() == self.save_on_rank:
            for name in self._to_remove:
                if name != (self.filename or filename) and (self.dirname / name).exists():
                    (self.dirname / name).unlink()
            self._to_remove.clear()

    def _save_func(self, checkpoint, path, func) -> None:
        handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX, dir=self.dirname)
        try:
            with os.fdopen(handle, "wb") as stream:
                func(checkpoint, stream, **self.kwargs)
                stream.flush()
                os.fsync(stream.fileno())
            os.chmod(temporary, 0o666 & ~process_umask())
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        try:  # make the rename itself durable
            folder = os.open(self.dirname, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except OSError:
            pass

    def remove(self, filename: str) -> None:
        if self.filename is None:  # a fixed name is replaced by the next save
            self._to_remove.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's CheckpointSaver (same arguments) writing every file through :class:`AtomicDiskSaver`.

    Not MONAI's CheckpointSaver alone: it writes in place, and a run stopped mid-write leaves a truncated checkpoint.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        final_filename: str | None = None,
        key_metric_filename: str | None = None,
        **kwargs,
    ):
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            final_filename=final_filename,
            key_metric_filename=key_metric_filename,
            **kwargs,
        )
        for checkpoint, filename in (
            (self._final_checkpoint, final_filename),
            (self._key_metric_checkpoint, key_metric_filename),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)

    def key_metric_record(self) -> list[tuple[float, str]]:
        """The key-metric saver's record of the files it keeps: (score, name) pairs, worst first."""
        if self._key_metric_checkpoint is None:
            return []
        return [(float(score), str(name)) for score, name in self._key_metric_checkpoint.state_dict()["_saved"]]

    def restore_key_metric_record(self, record: list) -> None:
        """Take ``record`` (as :meth:`key_metric_record` returns it): only a better score replaces those files."""
        self.load_state_dict({"_saved": [(float(score), str(name)) for score, name in record]})


class BestMetricRecord:
    """The validator's best key metric and epoch and the best-model saver's record, kept across a resume.

    Custom: MONAI saves neither the best metric nor its epoch in the trainer's checkpoints, so a resumed run would
    replace ``model.pt`` with a worse epoch.

    Listed in the trainer's CheckpointSaver ``save_dict`` (under :data:`RECORD_KEY`) it is saved in every checkpoint;
    attached to the trainer it restores itself from ``resume_checkpoint`` when training starts. A checkpoint written
    before this record existed is resumed with a warning that ``model.pt`` may be replaced by a worse epoch.
    ``best_model_saver`` None (disabled on other ranks than 0) restores only the validator's state.
    """

    def __init__(self, evaluator, best_model_saver: AtomicCheckpointSaver | None, resume_checkpoint: str | None):
        self.evaluator, self.best_model_saver, self.resume_checkpoint = evaluator, best_model_saver, resume_checkpoint
        self.restored_best_epoch: int | None = None  # epoch of the best checkpoint written before the resume

    def state_dict(self) -> dict:
        state = self.evaluator.state
        saved = self.best_model_saver.key_metric_record() if self.best_model_saver is not None else []
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "saved": saved,
        }

    def load_state_dict(self, state: dict) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        if self.best_model_saver is not None:
            self.best_model_saver.restore_key_metric_record(state["saved"])
        self.restored_best_epoch = int(state["best_metric_epoch"]) if state["saved"] else None

    def attach(self, trainer) -> None:
        if self.resume_checkpoint:
            trainer.add_event_handler(Events.STARTED, self._restore)

    def _restore(self, trainer) -> None:
        checkpoint = torch.load(self.resume_checkpoint, map_location="cpu", weights_only=True, mmap=True)
        if RECORD_KEY not in checkpoint:
            logger.warning(
                f"{self.resume_checkpoint} holds no record of the best validation epoch (written by an "
                "older version): model.pt may be replaced by a worse epoch"
            )
            return
        self.load_state_dict(checkpoint[RECORD_KEY])
        state = self.evaluator.state
        logger.info(
            f"restored the best validation record from {self.resume_checkpoint}: "
            f"{state.best_metric:.4f} at epoch {state.best_metric_epoch}"
        )


class PublishWeights:
    """When training completes, write the run's weights to ``path`` if they are not worse than the weights there.

    Custom: MONAI has no handler that writes the best weights to a fixed path when training ends, and MONAI Label
    none that checks them first.

    The candidate is the best validation checkpoint (``best_checkpoint``) when this run wrote it (before a resume too,
    known from ``best_metric_record``), else the network's weights after the last epoch. With a ``gate``
    (:class:`scripts.publish_gate.PublishGate`) the candidate and the weights at ``path`` are measured on the gate's
    reference set and the candidate is published only when the gate allows it; without one it is always published.
    The replaced weights are kept in ``previous/`` beside ``path`` (the newest ``keep_previous``), and
    ``publish_record.json`` there says what was decided and why (:mod:`scripts.published_weights`); the decision and
    its figures are in the train log too. ``runs_cap`` (:class:`scripts.run_folders.RunsCap`) then prunes older runs.
    ``path`` None does nothing. A server that watches the file (MONAI Label reloads a model file whose modification
    time changed) uses new weights at its next inference.
    """

    def __init__(
        self,
        path: str | None,
        network: torch.nn.Module,
        best_checkpoint: str | None = None,
        best_metric_record: BestMetricRecord | None = None,
        gate=None,
        keep_previous: int = 2,
        runs_cap=None,
    ):
        self.path, self.network, self.best_checkpoint = path, network, best_checkpoint
        self.best_metric_record, self.gate, self.runs_cap = best_metric_record, gate, runs_cap
        self.keep_previous = keep_previous
        self._started_at, self._reference_logged = time.time(), False
        self.decision = None  # the last GateDecision (or None without a gate)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_STARTED, self._first_epoch_started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._started_at = time.time()
        self._reference_logged = False

    def _first_epoch_started(self, engine) -> None:
        """Load the reference set as the round starts (after every STARTED handler, so the log file has it)."""
        if self._reference_logged or not self.path or self.gate is None:
            return
        self._reference_logged = True
        reference = self.gate.reference()
        counts = ", ".join(f"{len(names)} {role}" for role, names in reference.items()) or "no"
        engine.logger.info(f"publish gate: reference set of {counts} studies; the weights are published to "
                           f"{self.path} only if not worse on it")  # fmt: skip

    def _best_is_this_runs(self) -> bool:
        best = self.best_checkpoint
        if not (best and os.path.isfile(best)):
            return False
        restored = self.best_metric_record is not None and self.best_metric_record.restored_best_epoch is not None
        return restored or os.path.getmtime(best) >= self._started_at

    def _candidate(self) -> tuple[str, dict, object]:
        """(description, state dict, writer of the file to publish) of this run's weights."""
        best = self.best_checkpoint
        if self._best_is_this_runs():
            state = state_dict_of(torch.load(best, map_location="cpu", weights_only=True))
            return f"the best validation checkpoint {best}", state, lambda temporary: shutil.copyfile(best, temporary)
        network = self.network
        if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            network = network.module
        state = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
        return "the weights of the last epoch", state, lambda temporary: torch.save(state, temporary)

    def _served(self, engine) -> dict | None:
        if not os.path.isfile(self.path):
            return None
        try:
            return state_dict_of(torch.load(self.path, map_location="cpu", weights_only=True))
        except Exception as error:  # noqa: BLE001 - unreadable served weights are replaced by any candidate
            engine.logger.warning(f"publish gate: the served weights {self.path} cannot be read ({error})")
            return None

    def _completed(self, engine) -> None:
        if not self.path:
            return
        from scripts import published_weights
        from scripts.publish_gate import GateDecision

        source, candidate, write = self._candidate()
        started = time.time()
        if self.gate is None:
            decision = GateDecision(True, "published unchecked (no publish gate configured)")
        else:
            try:
                decision = self.gate.decide(self._served(engine), candidate)
            except Exception as error:  # noqa: BLE001 - weights that could not be checked are not published
                logger.exception("publish gate failed")
                decision = GateDecision(False, f"the publish gate failed ({type(error).__name__}: {error})")
        self.decision = decision
        for line in _figure_lines(decision):
            engine.logger.info(f"publish gate: {line}")
        if decision.publish:
            kept = published_weights.publish(self.path, write, self.keep_previous)
            engine.logger.info(f"published {source} to {self.path} ({decision.reason})"
                               + (f"; the replaced weights are kept as {kept}" if kept else ""))  # fmt: skip
        else:
            engine.logger.warning(f"kept the served weights {self.path}: {source} not published, {decision.reason}")
        entry = {
            "time": published_weights.now_iso(),
            "decision": "published" if decision.publish else "kept",
            "reason": decision.reason,
            "run": os.path.dirname(os.path.abspath(self.best_checkpoint)) if self.best_checkpoint else None,
            "candidate": source,
            "weights": os.path.abspath(self.path),
            "rule": "publish only if no reference figure is worse than the served weights' by more than its tolerance",
            "tolerances": dict(self.gate.tolerances) if self.gate is not None else None,
            **_finite(decision.as_dict()),
            "gate_seconds": round(time.time() - started, 2),
        }
        del entry["publish"]
        published_weights.write_record(self.path, entry)
        if self.runs_cap is not None:
            done = self.runs_cap.apply(started_at=self._started_at)
            if done["removed_runs"] or done["pruned_runs"]:
                engine.logger.info(
                    f"runs cap: freed {done['freed_bytes'] / 2**20:.0f} MiB (weights of {len(done['pruned_runs'])} "
                    f"older runs, {len(done['removed_runs'])} run folders removed)"
                )


def _finite(value):
    """``value`` with NaN and infinite floats as None and floats rounded (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    if isinstance(value, float):
        return round(value, 5) if math.isfinite(value) else None
    return value


def _figure_lines(decision) -> list[str]:
    """The decision's figures as log lines: figure, served, candidate."""
    lines = []
    for figure, candidate in decision.candidate.items():
        served = decision.served.get(figure)
        served_text = f"{served:.4f}" if served is not None else "-"
        lines.append(f"{figure}: served {served_text}, candidate {candidate:.4f}")
    return lines
