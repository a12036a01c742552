"""Crash-safe training checkpoints: atomic writes, resuming from the newest readable checkpoint with the record of the
best validation epoch, and publishing a run's weights when it ends.

- :class:`AtomicCheckpointSaver` is MONAI's CheckpointSaver whose files are written to a hidden temporary file, synced
  and renamed (MONAI turns ignite's atomic saving off), so a SIGKILL mid-write never leaves a truncated checkpoint;
  an older checkpoint is deleted only after the newer one is complete.
- :func:`latest_checkpoint` skips an unreadable newest checkpoint (0-byte, truncated) for the previous one, warning.
- :class:`BestMetricRecord` keeps the validator's best key metric, its epoch and the best-model saver's record in
  the trainer's checkpoints and restores them on resume, so a resumed run replaces ``model.pt`` only by a better epoch.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
import time

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from scripts.label_io import atomic_write, process_umask

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
    """When training completes, write the run's weights to ``path`` (atomically); ``path`` None does nothing.

    Custom: MONAI has no handler that writes the best weights to a fixed path when training ends.

    The best validation checkpoint (``best_checkpoint``) is published when this run wrote it (before a resume too,
    known from ``best_metric_record``), else the network's weights after the last epoch. A server that watches the
    file (MONAI Label reloads a model file whose modification time changed) uses the new weights at its next inference.
    """

    def __init__(
        self,
        path: str | None,
        network: torch.nn.Module,
        best_checkpoint: str | None = None,
        best_metric_record: BestMetricRecord | None = None,
    ):
        self.path, self.network, self.best_checkpoint = path, network, best_checkpoint
        self.best_metric_record = best_metric_record
        self._started_at = time.time()

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine) -> None:
        self._started_at = time.time()

    def _best_is_this_runs(self) -> bool:
        best = self.best_checkpoint
        if not (best and os.path.isfile(best)):
            return False
        restored = self.best_metric_record is not None and self.best_metric_record.restored_best_epoch is not None
        return restored or os.path.getmtime(best) >= self._started_at

    def _completed(self, engine) -> None:
        if not self.path:
            return
        best = self.best_checkpoint
        if self._best_is_this_runs():
            atomic_write(self.path, lambda temporary: shutil.copyfile(best, temporary))
            logger.info(f"published the best validation checkpoint {best} to {self.path}")
        else:
            network = self.network
            if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
                network = network.module
            state = {name: tensor.detach().cpu() for name, tensor in network.state_dict().items()}
            atomic_write(self.path, lambda temporary: torch.save(state, temporary))
            logger.info(f"published the weights of the last epoch to {self.path}")
        os.chmod(self.path, 0o644)  # readable like any weights file (the temporary file was private)
