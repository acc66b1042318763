"""A stage's run directory: resolved config, seed, metrics, TensorBoard events, lineage.

    runs/<name>/<stage>/
        config.yaml      the resolved pipeline config the stage ran with
        run.json         seed, command line and working directory, versions (instructrl's git commit in a
                         checkout), start time, number of processes and of torch's CPU threads; a resumed
                         run's starts under "resumed"
        metrics.jsonl    one JSON object per logged step
        tb/              TensorBoard events of the same metrics
        lineage.json     the data and parent checkpoint this stage used, with content hashes (a hub
                         name: its cached snapshot's commit); a stage whose inputs changed since
                         is neither skipped nor resumed but refused
        checkpoints/     resumable training state (step-NNNNNNNN/)
        final/           the stage's output checkpoint (save_pretrained folder)
        done.json        written last: the stage finished
    runs/<name>/.<stage>.lock   held by the one process writing the stage (``hold``); says which
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import filecmp
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from instructrl.config import MOVED_KEYS, PipelineConfig, dump_config, section, spelt_in_run
from instructrl.data.jsonl import complete_lines, nan_to_none, temp_beside
from instructrl.errors import UserError


def _files(path: Path) -> list[tuple[str, Path]]:
    """(name, file) of a file, or (relative path, file) of each file in a folder, sorted."""
    path = Path(path)
    if path.is_file():
        return [(path.name, path)]
    return [(str(f.relative_to(path)), f) for f in sorted(p for p in path.rglob("*") if p.is_file())]


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file contents (sorted)."""
    digest = hashlib.sha256()
    for name, file in _files(path):
        digest.update(name.encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def file_stamp(path: Path) -> list:
    """The (name, size, mtime) of a file or of a folder's files: an unchanged stamp spares a re-hash."""
    return [[name, f.stat().st_size, f.stat().st_mtime_ns] for name, f in _files(path)]


def hub_snapshot_changed(name: str, commit: str) -> str | None:
    """The commit of hub name ``name``'s snapshot in the Hugging Face cache now (what loaders read), where
    a file it shares with snapshot ``commit`` differs, or ``commit``'s is no longer cached to compare;
    else None, as where ``name`` is not cached. A commit that changed only files no loader fetched
    (the model card) changes nothing."""
    from instructrl.models.base import hub_snapshot

    now = hub_snapshot(name)
    if now is None or now.name == commit:
        return None
    then = now.parent / commit
    if not then.is_dir():
        return now.name
    for file in then.rglob("*"):
        same = now / file.relative_to(then)
        # the cache links each snapshot's files to blobs named by their content; copies where it cannot link
        if file.is_file() and same.is_file() and file.resolve() != same.resolve() and not filecmp.cmp(file, same, shallow=False):
            return now.name
    return None


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader or a crash never sees half of it."""
    tmp = temp_beside(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def replace_dir(src: Path, dest: Path) -> None:
    """Move folder ``src`` to ``dest``, replacing what was there, never leaving ``dest`` half-written."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    if old.exists():
        shutil.rmtree(old)


def copy_dir(src: Path, dest: Path, copy_function=shutil.copy2) -> None:
    """Copy folder ``src`` to ``dest`` (``copy_function=os.link``: as hard links), replacing what
    was there only once the copy is complete."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=copy_function)
    replace_dir(tmp, dest)


_held: dict[str, int] = {}  # lock file -> the descriptor by which this process holds it


def hold(folder: Path) -> None:
    """Make this process the one writer of ``folder`` until ``release(folder)`` or its exit: another
    process that would write it (a second ``instructrl pipeline`` on the run) stops with one line naming
    this one, before it writes anything. An flock, which the kernel drops when its holder dies, kill -9
    included, so that it never goes stale; on a file beside the folder, as --restart empties the folder."""
    lock = _lock_file(folder)
    if lock in _held:  # a stage run again in this process (after an error, in a test)
        return
    fd = _take(lock, folder)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M"), "command": _command_line()}).encode())
    _held[lock] = fd


@contextlib.contextmanager
def rewriting(folder: Path):
    """Hold ``folder`` (``hold``) while the caller rewrites it, which no stage of its run may be running to read
    (the world): while another process holds one, stop with the one line ``hold`` gives, before anything is written."""
    run = Path(folder).parent
    run.mkdir(parents=True, exist_ok=True)  # where the lock files lie
    hold(folder)
    try:
        for lock in sorted([*run.glob(".*.lock"), *run.glob("*/.*.lock")]):  # the run's stages, and its later rounds'
            if os.path.realpath(lock) not in _held:  # this process's own stage (pretrain --restart rebuilds the world)
                os.close(_take(str(lock), lock.with_name(lock.name[1 : -len(".lock")]), f"cannot rewrite {folder}, which the run's stages read: "))
        yield
    finally:
        release(folder)


def _take(lock: str, folder: Path, why: str = "") -> int:
    """A descriptor of lock file ``lock`` that holds it; else one line naming the process that holds ``folder``."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise UserError(f"{why}{folder} is in use by another instructrl process ({holder}); wait for it to finish or stop it") from None
    return fd


def release(folder: Path) -> None:
    """Let another process write ``folder`` (see ``hold``)."""
    _let_go(_lock_file(folder))


def _let_go(lock: str) -> None:
    fd = _held.pop(lock, None)
    if fd is not None:
        os.close(fd)  # the kernel drops the flock with its last descriptor


def releases_on_error(stage):
    """Decorates a stage's function: if it fails, the folders it took (``hold``) are let go. The caller
    may live on (a notebook, a test), and another process must then be able to run the stage."""
    @functools.wraps(stage)
    def run(*args, **kwargs):
        before = set(_held)
        try:
            return stage(*args, **kwargs)
        except BaseException:
            for lock in set(_held) - before:
                _let_go(lock)
            raise
    return run


def _lock_file(folder: Path) -> str:
    folder = Path(folder)
    return os.path.realpath(folder.with_name(f".{folder.name}.lock"))


def _holder(fd: int) -> str:
    """Who holds a lock file, as its holder wrote it: "pid N, started ..., `command`"."""
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0))
        return f"pid {info['pid']}, started {info['started']}, `{info['command']}`"
    except (ValueError, KeyError, TypeError):  # the holder is writing it this instant
        return "pid unknown"


def _command_line() -> str:
    """This process's command, as typed: ``instructrl ...`` however the CLI was started (python -m, torchrun)."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path("python")
    name = "instructrl" if "instructrl" in (program.name, program.parent.name) else program.name
    return shlex.join([name, *sys.argv[1:]])


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
        if not (self.done_file.is_file() and self.matches(json.loads(self.done_file.read_text()).get("identity"))):
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
        """Whether ``saved`` (an earlier run's identity) is this config's; see ``comparable``."""
        if saved is None:
            return False
        now, then = comparable(self.identity, _with_moved_keys(saved), self._defaults)
        return now == then

    def skip(self, restart: bool, log) -> bool:
        """Whether the stage has nothing to do (finished with this config and inputs, no --restart); says so in the log."""
        if self.is_main and self.path.exists():  # another run may be writing it: refuse now, not after loading the models
            hold(self.path)
        if restart or not self.is_done():
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
        """The outputs of this run's earlier stages in lineage.json that no longer exist (a stage discarded by
        --restart and not trained again), each with the stage that makes it again. Not the world's files, which
        any stage rebuilds from the config as they were, nor the user's own files, in the run folder or not (moved, say).
        ``run_root``: the run folder, where this stage is a later pipeline round's (round2/), whose lineage records
        the run's own folders as ../sft/final (by their absolute paths before instructrl recorded them so)."""
        from instructrl.pipeline import PPO_STAGES, STAGES

        folders = [Path(os.path.abspath(folder)) for folder in (self.config.run.dir, run_root or self.config.run.dir)]
        gone: dict[tuple[Path, str], list[str]] = {}  # the names of each missing input (ppo's policy and reference are one)
        for name, entry, path in self._recorded_inputs():
            if entry["sha256"] is None or path.exists():  # a hub name, or there
                continue
            full = Path(os.path.abspath(path))
            stage = next((full.relative_to(folder).parts[0] for folder in folders if folder in full.parents), None)  # its writer's folder
            if stage in {*STAGES, *PPO_STAGES}:
                gone.setdefault((path, stage), []).append(name)
        return [f"{' and '.join(names)} ({path}; `instructrl pipeline --restart-from {stage}` trains it and the stages after it again)"
                for (path, stage), names in gone.items()]

    def _recorded_inputs(self) -> list[tuple[str, dict, Path]]:
        """Each input lineage.json records: its name, its entry, and where it is now (an input inside the run, in
        this run folder wherever it has moved: round2/../sft/final as sft/final); none before the stage has begun."""
        lineage = self.path / "lineage.json"
        if not lineage.is_file():
            return []
        return [(name, entry, Path(os.path.normpath(Path(self.config.run.dir) / entry["path"])) if entry.get("in_run") else Path(entry["path"]))
                for name, entry in json.loads(lineage.read_text())["inputs"].items()]

    def start(self, restart: bool = False, log=None) -> None:
        """Check that the folder holds no other run, then make it (``restart``: empty) and write identity.json;
        ``record_start`` writes config.yaml and run.json once the stage's own checks have passed too.

        A folder holding a run of a different config is an error unless ``restart`` is set:
        its checkpoints are never silently overwritten. ``log``: told what a restart discards.
        The main process holds the folder from here until ``finish`` (``hold``).
        """
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hold(self.path)
        saved = self.path / "identity.json"
        previous = json.loads(saved.read_text()) if saved.is_file() else None
        if previous is not None and not restart:
            now, then = comparable(self.identity, _with_moved_keys(previous), self._defaults)
            if now != then:
                changed = _diff(then, now)
                raise UserError(
                    f"{self.path} holds a run of a different config ({changed}); "
                    f"set run.dir to another folder, or pass --restart to discard it ({self._in_pipeline})"
                )
        if not self.is_main:
            return
        if restart and self.path.exists():
            if log is not None:
                log(f"{self.stage}: --restart discards {self.path}: {self.contents()}")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if previous != self.identity or restart:
            write_text_atomic(saved, json.dumps(self.identity, indent=2))

    def record_start(self) -> None:
        """Write config.yaml and run.json as the run begins or resumes, after the last check that may refuse
        it (changed inputs, a checkpoint of another layout or process count): a refused resume records nothing."""
        if not self.is_main:
            return
        write_text_atomic(self.path / "config.yaml", dump_config(self.config))
        info, record = run_info(self.config.run.seed, self.processes), self.path / "run.json"
        if record.is_file():  # an interrupted run resumed: its first start's record stays, each resume is added
            first = json.loads(record.read_text())
            info = first | {"resumed": first.get("resumed", []) + [info]}
        write_text_atomic(record, json.dumps(info, indent=2))

    def contents(self) -> str:
        """What the folder holds, in words: a finished run, or an unfinished one and how far it got."""
        from instructrl.training.checkpoint import checkpoint_dirs

        if self.done_file.is_file():
            return f"a finished run ({json.loads(self.done_file.read_text()).get('finished', 'done')})"
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
            elif full.startswith(root + os.sep) or spelt_in_run(str(value), run_dir):
                # the second: a later round names the run's folders from its own (round2/../sft/final); a copy compares its own
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


def trim_step_log(path: Path, resume_step: int, keep_equal: bool) -> None:
    """Keep the lines of a JSONL step log up to ``resume_step``; drop a half-written last line."""
    if not path.is_file():
        return
    kept = [line for line, record in complete_lines(path) if record["step"] < resume_step or (keep_equal and record["step"] == resume_step)]
    write_text_atomic(path, "".join(line + "\n" for line in kept))


def _with_moved_keys(saved: dict) -> dict:
    """An identity recorded before a key moved to another section (``MOVED_KEYS``), with the key where it is
    now: in its new section where the identity holds that section (collect's, rm's and ppo's hold collect),
    else left out, as a key no longer part of the identity."""
    saved = copy.deepcopy(saved)
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        if isinstance(saved.get(old_section), dict) and old_key in saved[old_section]:
            value = saved[old_section].pop(old_key)
            if isinstance(saved.get(new_section), dict):
                saved[new_section].setdefault(new_key, value)
    return saved


def comparable(current: dict, saved: dict, defaults: dict) -> tuple[dict, dict]:
    """``current`` and ``saved`` identities reduced to what both versions of instructrl know: a
    key only ``saved`` has is one no longer part of an identity, and a key only ``current`` has
    counts once it is off its default (an option added since leaves finished runs finished)."""
    now, then = {}, {}
    for key in current:  # in its order, which a message listing the changed keys keeps
        if key not in saved and current[key] == defaults.get(key, object()):
            continue
        a, b = current[key], saved.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            a, b = comparable(a, b, defaults.get(key) if isinstance(defaults.get(key), dict) else {})
        now[key], then[key] = a, b
    return now, then


def _diff(old: dict, new: dict, prefix: str = "") -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _diff(a, b, f"{prefix}{key}.")
            if inner:
                changes.append(inner)
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return ", ".join(changes)


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
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or a hung one
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    # the package's files must be tracked: a site-packages inside a user's own repository is not a checkout of instructrl
    if not git("ls-files", "--error-unmatch", Path(__file__).name):
        return {}
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--", ".")
    return {} if commit is None else {"git_commit": commit, "git_dirty": bool(changes)}
