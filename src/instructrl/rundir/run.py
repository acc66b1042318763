"""A stage's folder (``RunDir``; its layout: ``instructrl.rundir``) and what run.json records of a run."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from instructrl.config import PipelineConfig, dump_config, in_run, section
from instructrl.data.jsonl import nan_to_none
from instructrl.errors import UserError
from instructrl.rundir.files import content_hash, file_stamp, hub_snapshot_changed, trim_step_log, write_text_atomic
from instructrl.rundir.identity import comparable, diff, with_moved_keys
from instructrl.rundir.locks import hold, release


def given_or_earlier(given, default: Path, key: str, stage: str, earlier: str) -> str:
    """The path a user gave as ``key``, else ``default``, an earlier stage's output in this run,
    which must exist: else one line saying to run ``earlier`` first or to set ``key``."""
    if given is not None:
        return str(given)
    if not default.exists():
        raise UserError(f"{stage}: no {key} given and {default} does not exist; run {earlier} first or set {key}=PATH")
    return str(default)


class RunDir:
    """One stage's folder. Only the main process writes; every process may read."""

    def __init__(self, config: PipelineConfig, stage: str, sections: tuple[str, ...], is_main: bool = True, processes: int = 1):
        self.path = Path(config.run.dir) / stage
        self.stage = stage
        self.config = config
        self.identity = section(config, *sections)  # what must match for a run to be resumed
        self._defaults = section(PipelineConfig(), *sections)
        self.is_main = is_main
        self.processes = processes
        self._tb = None
        self._resume_step = 0  # TensorBoard events a killed run wrote past it are dropped

    # -- life cycle

    @property
    def done_file(self) -> Path:
        return self.path / "done.json"

    def is_done(self) -> bool:
        """The stage finished with this config. Raises if an input it recorded has changed since:
        its outputs no longer follow from its inputs, and rerunning would discard them."""
        done = self.read_record("done.json")
        if not (done is not None and self.matches(done["identity"])):
            return False
        changed = self.changed_inputs()
        if changed:
            raise UserError(f"{self.path} finished on inputs that have changed since: {', '.join(changed)}; "
                            f"pass --restart to run {self.stage} again on them ({self._in_pipeline}), or set run.dir to another folder")
        return True

    @property
    def _in_pipeline(self) -> str:
        return f"instructrl pipeline: --restart-from {'ppo' if self.stage.startswith('ppo') else self.stage}"

    def matches(self, saved: dict | None) -> bool:
        """Whether ``saved`` (an earlier run's identity) is this config's: it differs in no key (``config_changes``)."""
        return saved is not None and not self.config_changes(saved)

    def skip(self, restart: bool, log) -> bool:
        """Whether the stage has nothing to do (finished with this config and inputs, no --restart); says so in the log.
        A run of another config is refused here (``refuse_another_config``), before the stage loads its models and checks its sizes."""
        if self.is_main and self.path.exists():  # another run may be writing it: refuse now, not after loading the models
            hold(self.path)
        if restart:
            return False
        self.refuse_another_config()
        if not self.is_done():
            return False
        release(self.path)
        log(f"{self.stage}: {self.path} is complete with this config and inputs; nothing to do (--restart runs it again; {self._in_pipeline})")
        return True

    def changed_inputs(self) -> list[str]:
        """The inputs in lineage.json whose content differs now from when the stage ran (a missing one is not
        compared: a data file of the user's may have moved, and a stage rebuilds the world as it was; see ``missing_inputs``)."""
        changed = []
        for name, entry, path in self._recorded_inputs():
            if entry.get("commit"):  # a hub name
                now = hub_snapshot_changed(entry["path"], entry["commit"])
                if now:
                    changed.append(f"{name} ({entry['path']}: commit {entry['commit'][:12]}, now {now[:12]} in the Hugging Face cache)")
                continue
            if entry["sha256"] is None or not path.exists() or entry.get("stamp") == file_stamp(path):
                continue
            if content_hash(path) != entry["sha256"]:
                changed.append(f"{name} ({path})")
        return changed

    def missing_inputs(self, run_root: Path | None = None) -> list[str]:
        """The outputs of this run's earlier stages in lineage.json that no longer exist (``inputs_to_remake``), in words,
        each with the stage that makes it again."""
        return [f"{names} ({path}; `instructrl pipeline --restart-from {stage}` trains it and the stages after it again)"
                for names, path, stage in self.inputs_to_remake(run_root)]

    def inputs_to_remake(self, run_root: Path | None = None) -> list[tuple[str, Path, str]]:
        """The outputs of this run's earlier stages in lineage.json that no longer exist (a stage discarded by
        --restart and not trained again), each as its names, where it was and the stage that makes it. Not the
        world's files, which any stage rebuilds from the config as they were, nor the user's own files, in the run
        folder or not (moved, say). ``run_root``: the run folder, where this stage is a later pipeline round's
        (round2/), whose lineage records the run's own folders as ../sft/final (by their absolute paths before
        instructrl recorded them so)."""
        from instructrl.pipeline.rounds import PPO_STAGES, STAGES

        folders = [Path(os.path.abspath(folder)) for folder in (self.config.run.dir, run_root or self.config.run.dir)]
        gone: dict[tuple[Path, str], list[str]] = {}  # the names of each missing input (ppo's policy and reference are one)
        for name, entry, path in self._recorded_inputs():
            if entry["sha256"] is None or path.exists():  # a hub name, or there
                continue
            full = Path(os.path.abspath(path))
            stage = next((full.relative_to(folder).parts[0] for folder in folders if folder in full.parents), None)  # its writer's folder
            if stage in {*STAGES, *PPO_STAGES}:
                gone.setdefault((path, stage), []).append(name)
        return [(" and ".join(names), path, stage) for (path, stage), names in gone.items()]

    def _recorded_inputs(self) -> list[tuple[str, dict, Path]]:
        """Each input lineage.json records: its name, its entry, and where it is now (an input inside the run, in
        this run folder wherever it has moved: round2/../sft/final as sft/final); none before the stage has begun."""
        lineage = self.read_record("lineage.json")
        if lineage is None:
            return []
        return [(name, entry, Path(os.path.normpath(Path(self.config.run.dir) / entry["path"])) if entry.get("in_run") else Path(entry["path"]))
                for name, entry in lineage["inputs"].items()]

    def config_changes(self, saved: dict) -> str:
        """How this config differs from ``saved`` (an earlier run's identity), key by key (``diff``); empty where
        it is that run's. See ``comparable``."""
        now, then = comparable(self.identity, with_moved_keys(saved), self._defaults)
        return diff(then, now)

    def recorded_identity(self) -> dict | None:
        """The identity the folder's run was begun with: a finished run's in done.json, else identity.json's; None before any."""
        done = self.read_record("done.json")
        return done["identity"] if done is not None else self.read_record("identity.json")

    def recorded_changes(self) -> str:
        """How this config differs from the one the folder's run was begun with (``config_changes``); empty where it is that
        run's, or the folder holds none."""
        saved = self.recorded_identity()
        return self.config_changes(saved) if saved is not None else ""

    def refuse_another_config(self) -> None:
        """Refuse a folder holding a run of a different config: its checkpoints are never silently overwritten."""
        changed = self.recorded_changes()
        if changed:
            raise UserError(f"{self.path} holds a run of a different config ({changed}); "
                            f"set run.dir to another folder, or pass --restart to discard it ({self._in_pipeline})")

    @classmethod
    def as_recorded(cls, config: PipelineConfig, stage: str) -> RunDir:
        """``stage``'s folder in ``config``'s run.dir, its identity over the config sections its run recorded (those a stage
        records follow from its own section's keys): the run as its stage compares it, for a reader that does not work
        out the stage's sections (``instructrl pipeline --check``)."""
        saved = cls(config, stage, ()).recorded_identity() or {}
        return cls(config, stage, tuple(name for name in saved if name in PipelineConfig.model_fields))

    def read_record(self, name: str) -> dict | None:
        """The run record ``name`` (done.json, identity.json, lineage.json, run.json) in the folder, None where there
        is none. One that is not JSON, or not of the shape RunDir writes (``_misshapen``), is refused in one line
        naming it, and left as it is."""
        path = self.path / name
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8 text"
        except json.JSONDecodeError as err:
            problem = f"not valid JSON: {err.msg.removesuffix(' at')} at line {err.lineno} column {err.colno}"
        else:
            problem = _misshapen(name, record)
        if problem:
            raise UserError(f"{path} is damaged ({problem}); pass --restart to run {self.stage} again ({self._in_pipeline}), "
                            "or set run.dir to another folder")
        return record

    def start(self, restart: bool = False, log=None) -> None:
        """Check that the folder holds no other run, then make it (``restart``: empty) and write identity.json;
        ``record_start`` writes config.yaml and run.json once the stage's own checks have passed too.

        A folder holding a run of a different config is an error unless ``restart`` is set:
        its checkpoints are never silently overwritten. ``log``: told what a restart discards.
        The main process holds the folder from here until ``finish`` (``hold``); every process returns once it is ready.
        """
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hold(self.path)
        if not restart:  # --restart discards the folder unread: a damaged record in it is no reason to refuse
            self.refuse_another_config()
        if self.is_main:
            if restart and self.path.exists():
                if log is not None:
                    log(f"{self.stage}: --restart discards {self.path}: {self.contents()}")
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            if restart or self.read_record("identity.json") != self.identity:
                write_text_atomic(self.path / "identity.json", json.dumps(self.identity, indent=2))
        if self.processes > 1:  # the others must not look for checkpoints to resume from in a folder still being discarded
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    def record_start(self) -> None:
        """Write config.yaml and run.json as the run begins or resumes, after the last check that may refuse
        it (changed inputs, a checkpoint of another layout or process count): a refused resume records nothing."""
        if not self.is_main:
            return
        write_text_atomic(self.path / "config.yaml", dump_config(self.config))
        info, record = run_info(self.config.run.seed, self.processes), self.path / "run.json"
        first = self.read_record("run.json")
        if first is not None:  # an interrupted run resumed: its first start's record stays, each resume is added
            info = first | {"resumed": first.get("resumed", []) + [info]}
        write_text_atomic(record, json.dumps(info, indent=2))

    def contents(self) -> str:
        """What the folder holds, in words: a finished run, or an unfinished one and how far it got."""
        from instructrl.training.checkpoint import checkpoint_dirs

        if self.done_file.is_file():
            try:
                finished = self.read_record("done.json").get("finished", "done")
            except UserError:  # --restart discards it all the same
                finished = "done.json damaged"
            return f"a finished run ({finished})"
        checkpoints = checkpoint_dirs(self.path / "checkpoints")
        partial = sorted(self.path.glob("*.partial.jsonl"))  # collect's records so far
        if checkpoints:
            return f"an unfinished run, last checkpoint at step {int(checkpoints[-1].name[len('step-'):])}"
        if partial:
            return f"an unfinished run, {len(partial[0].read_text().splitlines())} records written"
        return "an unfinished run with no checkpoint"

    def finish(self, outputs: dict[str, Path]) -> None:
        if self.is_main:
            record = {"identity": self.identity, "outputs": {k: str(v) for k, v in outputs.items()}, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_text_atomic(self.done_file, json.dumps(record, indent=2))
        if self._tb is not None:
            self._tb.close()
        release(self.path)

    # -- records

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """One line of metrics.jsonl, in standard JSON (a NaN, e.g. a diverged loss, as null), and
        the same scalars in TensorBoard, where a NaN shows as one."""
        if not self.is_main:
            return
        with (self.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **nan_to_none(metrics)}, allow_nan=False) + "\n")
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"), purge_step=min(step, self._resume_step + 1))
        for key, value in metrics.items():
            self._tb.add_scalar(key, value, step)

    def write_lineage(self, inputs: dict[str, Path | str | None]) -> None:
        """Record each input (data file, parent checkpoint) with its content hash, before training:
        an interrupted run resumes only on the inputs it began with, else it would follow from neither.
        An input inside the run folder, or named from it (round2/../sft/final), is recorded relative to
        it and any other by its absolute path, so that the check holds from any working directory and in
        a moved or copied run folder;
        a hub name is recorded as given, with the commit of its snapshot in the Hugging Face cache (which
        the stage loaded)."""
        changed = self.changed_inputs()  # an interrupted run's record: --restart has removed any other
        if changed:
            raise UserError(f"{self.path} holds an unfinished run begun on inputs that have changed since: {', '.join(changed)}; "
                            f"pass --restart to run {self.stage} again from the start ({self._in_pipeline}), or set run.dir to another folder")
        if not self.is_main:
            return
        run_dir = str(self.config.run.dir)
        root = os.path.abspath(run_dir)
        entries = {}
        for name, value in inputs.items():
            if value is None:
                continue
            path = Path(value)
            exists = path.exists()
            full = os.path.abspath(path)
            if not exists:  # a hub name ("org/name"), not a path under the working directory
                from instructrl.models.base import hub_snapshot

                snapshot = hub_snapshot(str(value))
                place = {"path": str(value), "commit": snapshot and snapshot.name}
            elif in_run(value, run_dir):  # also as a later round names the run's folders (round2/../sft/final); a copy compares its own
                place = {"path": os.path.relpath(full, root), "in_run": True}
            else:
                place = {"path": full}
            entries[name] = place | {"sha256": content_hash(path) if exists else None, "stamp": file_stamp(path) if exists else None}
        write_text_atomic(self.path / "lineage.json", json.dumps({"stage": self.stage, "inputs": entries}, indent=2))

    def trim_metrics(self, resume_step: int) -> None:
        """Drop metric lines a killed run wrote past the checkpoint it resumes from (or cut in half), and
        its TensorBoard events past it (whatever steps this run logs at: log_every may have changed)."""
        self._resume_step = resume_step
        if self.is_main:
            trim_step_log(self.path / "metrics.jsonl", resume_step, keep_equal=True)


def _misshapen(name: str, record) -> str | None:
    """What makes ``record`` not the run record ``name`` as RunDir writes it, in words; None where nothing does."""
    if not isinstance(record, dict):
        return f"a JSON {_JSON_TYPES.get(type(record), type(record).__name__)}, where instructrl writes an object"
    if name == "done.json" and not isinstance(record.get("identity"), dict):
        return 'no "identity" object'
    if name == "run.json" and not isinstance(record.get("resumed", []), list):
        return '"resumed" is not a list'
    if name == "lineage.json":
        inputs = record.get("inputs")
        if not isinstance(inputs, dict):
            return 'no "inputs" object'
        for input_name, entry in inputs.items():
            if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and "sha256" in entry):
                return f'input {input_name!r} is not an object with a "path" and a "sha256"'
    return None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def run_info(seed: int, processes: int = 1) -> dict:
    """What run.json records of a run begun now (world.json of the world's build): ``seed``, the command
    line and working directory, the time, ``processes``, torch's threads and the versions."""
    import accelerate
    import torch
    import transformers

    from instructrl import __version__

    return {
        "seed": seed,
        "command": sys.argv,
        "cwd": os.getcwd(),  # what a relative -c or data path in the command is relative to
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "processes": processes,
        "torch_threads": torch.get_num_threads(),  # another count sums floats in another order: the numbers differ in their last digits
        "python": platform.python_version(),
        "instructrl": __version__,
        **_source_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def _source_revision() -> dict:
    """``git_commit`` and ``git_dirty`` (uncommitted changes to it) of instructrl's own source when it
    runs from a git checkout (an editable install); nothing for an installed package."""
    here = Path(__file__).resolve()
    package = here.parents[1]  # instructrl/, not this module's rundir/: git_dirty is of the whole source

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or a hung one
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # the package's files must be tracked: a site-packages inside a user's own repository is not a checkout of instructrl
    if not git("ls-files", "--error-unmatch", str(here.relative_to(package))):
        return {}
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {} if commit is None else {"git_commit": commit, "git_dirty": bool(changes)}
