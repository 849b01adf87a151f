"""The server's round loop, whatever carries the payloads (:func:`federate`): sample the
clients, make their downloads, let a transport train them, aggregate, evaluate, record the
round and checkpoint it. :mod:`fedmpq.simulate` carries the payloads in this process,
:mod:`fedmpq.flower` over Flower; both hand :func:`federate` a :data:`Transport`.

Results: ``results.json`` (``{"config": {...}, "rounds": [{"round", "accuracy",
"accuracy_train_mode", "train_accuracy", "bytes_up", "bytes_down", "float32_bytes", "bits":
{client: [per layer]}, "mean_bits": {client: x}, "assigned_mean_bits": {client: x},
"seconds", "quant_seconds", "reported", "aggregated", "threads"}, ...], "threads": n}``);
``threads``: the torch threads of the training (at the start, and per round); ``reported``:
the clients whose uploads arrived, ``aggregated``: those of them the server aggregated (the
rest were refused, with a logged reason); ``bits``/``mean_bits``: what each aggregated client
uploaded (after its precision reduction); ``assigned_mean_bits``: the mean bit-width each
client is given for the next round (after reassignment; empty for ``fp``);
``train_accuracy``: the mean last-epoch train accuracy of the aggregated clients (None when
none was); ``quant_seconds``: the round's quantization work (binarize and encode the downloads,
decode, the bit-plane optimizer, precision reduction and encode on the clients,
aggregation). :func:`fedmpq.results.write_results` writes them with ``rounds.csv`` after every
round, and the plots as often as :class:`PlotPacer` lets them.
"""
from __future__ import annotations

import json
import logging
import os

try:
    import fcntl
except ImportError:  # not on Windows: no folder lock
    fcntl = None  # type: ignore[assignment]
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import data as data_mod
from . import server as server_mod
from .config import EXECUTION_KEYS, ConfigError, model_builder, resolve_device, with_defaults
from .progress import progress as _progress
from .results import replace_whole, write_plots, write_results

log = logging.getLogger("fedmpq")

# A transport trains the sampled clients of one round: (round, {client: download bytes}) ->
# ({client: upload bytes}, {client: its train accuracy}, client-side quantization seconds).
# A client that fails is left out of the uploads (the transport logs why).
Transport = Callable[[int, Dict[int, bytes]], Tuple[Dict[int, bytes], Dict[int, float], float]]


def _mean_of(values: Dict[int, float], clients) -> Optional[float]:
    """The mean of ``values`` over ``clients`` (a round's aggregated clients: a client whose
    upload the server left out trained a model the round did not use), or None for none."""
    got = [values[k] for k in clients if k in values]
    return sum(got) / len(got) if got else None


def sample_clients(c: Dict[str, Any], round_: int) -> List[int]:
    """The clients sampled in ``round_`` (seeded by the config's seed and the round)."""
    g = torch.Generator().manual_seed(c["seed"] * 1_000_003 + round_)
    m = max(1, round(c["sampling_rate"] * c["n_clients"]))
    return sorted(torch.randperm(c["n_clients"], generator=g)[:m].tolist())


class PlotPacer:
    """Draws a run's plots (:func:`fedmpq.results.write_plots`) in at most ``share`` of its
    wall time. A drawing costs about 0.15 s on 2 cores and a round of the default digits run
    0.8 s, so drawing after every round took 12 % of that run's time; a ResNet-20 round
    takes a minute, and its plots are still drawn after every round.

    Draws after the first round, after the last, after any round that ends at least
    ``cost / share`` seconds after the last drawing ended (``cost``: that drawing's time), and
    from :meth:`flush` when the round loop is left early (an error, Ctrl-C), so the plots on
    disk always end up showing every round ``results.json`` holds, and only those (a round
    counts once :meth:`round_done` says it is written). ``clock``: seconds, for tests;
    ``share``: :attr:`SHARE` unless given."""

    SHARE = 0.05

    def __init__(self, results: Dict[str, Any], outdir: Path, share: Optional[float] = None,
                 clock: Callable[[], float] = time.perf_counter):
        share = self.SHARE if share is None else share
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.results, self.outdir, self.share, self.clock = results, outdir, share, clock
        self.next_at: Optional[float] = None  # None: nothing drawn yet
        self.stale = False
        self.written = len(results["rounds"])  # the rounds results.json holds

    def round_done(self, last: bool) -> None:
        """The results' rounds, the last one added included, are written (results.json);
        ``last``: the run's final round."""
        self.written, self.stale = len(self.results["rounds"]), True
        if last or self.next_at is None or self.clock() >= self.next_at:
            self.draw()

    def draw(self) -> None:
        """Draws the written rounds now, and sets when the next drawing is due."""
        t0 = self.clock()
        write_plots(dict(self.results, rounds=self.results["rounds"][:self.written]), self.outdir)
        t1 = self.clock()
        self.next_at, self.stale = t1 + (t1 - t0) / self.share, False

    def flush(self) -> None:
        """Draws the rounds not drawn yet; a failure is logged (at INFO: the stop may have
        cut a drawing, or matplotlib's import, short), not raised: it runs while another
        exception leaves the round loop, which it must not hide."""
        if self.stale:
            try:
                self.draw()
            except Exception as e:
                log.info("the plots could not be brought up to date: %s: %s", type(e).__name__, e)


def damaged_record(path: Path) -> Optional[str]:
    """The first record of a ``torch.save`` file (a zip) whose bytes fail their CRC-32, or
    None (none does, or it is no zip: ``torch.load`` then says so). torch.save writes a
    CRC-32 per record and torch.load never checks them: a bit flipped in a tensor's bytes (on
    disk, in a copy) loaded as a silently different weight."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError):  # no zip (truncated, random bytes): torch.load's turn
        return None


def resumed_config(out, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``cfg`` completed for resuming the run in folder ``out``: the keys it leaves out take
    the checkpoint's values, and a key added since the run was saved the value it ran with
    (:func:`fedmpq.config.with_defaults`), not today's default."""
    return {**with_defaults(read_checkpoint(Path(out) / "checkpoint.pt")["config"]), **cfg}


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """A checkpoint written by :func:`federate`; :class:`ConfigError` naming the file when it
    is missing, truncated, damaged (a record failing its CRC-32) or not one (never torch's
    advice to unpickle it unsafely)."""
    if not path.is_file():
        raise ConfigError(f"nothing to resume: {path} does not exist")
    bad = damaged_record(path)
    if bad is not None:
        raise ConfigError(f"{path} is damaged: its record {bad} fails its CRC-32 check (changed on disk or in a "
                          "copy); resume from a good copy of the run's folder")
    try:
        with warnings.catch_warnings():  # torch's warning about a pickle it refuses: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, weights_only=True)
    except Exception as e:  # truncated, random bytes, another pickle: all one answer
        kind = "truncated or corrupted" if isinstance(e, (OSError, EOFError, RuntimeError)) else "not readable"
        raise ConfigError(f"{path} is not a fedmpq checkpoint ({kind}: {type(e).__name__})") from None
    if not (isinstance(state, dict) and {"config", "server", "rounds"} <= set(state)
            and isinstance(state["config"], dict)):
        raise ConfigError(f"{path} is not a fedmpq checkpoint (it lacks config, server or rounds)")
    try:
        rounds = json.loads(state["rounds"])
    except (TypeError, ValueError):
        rounds = None
    if not isinstance(rounds, list):  # json.loads raised mid-resume
        raise ConfigError(f"{path} is not a fedmpq checkpoint (its rounds are not a JSON list)")
    # Each row a round's record, numbered 1..n: an edited row was a traceback mid-resume, after
    # results.json had been written over with it; n the rounds the model has had (since
    # 2026-12-06; older checkpoints lack it)
    for i, row in enumerate(rounds):
        if not (isinstance(row, dict) and row.get("round") == i + 1 and not isinstance(row.get("round"), bool)
                and isinstance(row.get("accuracy"), (int, float)) and not isinstance(row.get("accuracy"), bool)):
            raise ConfigError(f"{path} is not a fedmpq checkpoint (its row {i + 1} is not round {i + 1}'s record)")
    done = state.get("round", len(rounds))
    if isinstance(done, bool) or not isinstance(done, int) or done != len(rounds):
        raise ConfigError(f"{path} is not a fedmpq checkpoint (its model has had {done!r} rounds, its rows "
                          f"record {len(rounds)})")
    return state


def trained_nothing(results: Dict[str, Any]) -> bool:
    """Whether a run's rounds aggregated no upload at all (every client failed or was left out
    in every round): its model is the initial one, not a result."""
    return bool(results["rounds"]) and not any(row.get("aggregated") for row in results["rounds"])


def same_run(state: Dict[str, Any], outdir: Path) -> None:
    """Refuse a checkpoint that is not the one of the run whose results.json is in ``outdir``
    (another run's, or an older one of this run, copied there): it replaced that results.json
    with its own, silently. The checkpoint is written before results.json, so it may be one
    round ahead; the configs may differ only in the keys a resume may change. No results.json
    (a kill before the first round's): nothing to compare."""
    p = outdir / "results.json"
    try:
        res = json.loads(p.read_text())
        rows, cfg = res["rounds"], res["config"]
        mine = [(r["round"], r["accuracy"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return  # not there or not readable: the checkpoint alone says what was run
    theirs = [(r["round"], r["accuracy"]) for r in json.loads(state["rounds"])]
    free = set(EXECUTION_KEYS) | {"rounds"}
    a, b = with_defaults(state["config"]), with_defaults(cfg) if isinstance(cfg, dict) else {}
    differ = sorted(k for k in set(a) | set(b) if k not in free and a.get(k) != b.get(k))
    if differ or theirs[:len(mine)] != mine or len(theirs) - len(mine) not in (0, 1):
        what = (f"its {differ[0]} is {a.get(differ[0])!r}, results.json's {b.get(differ[0])!r}" if differ else
                f"it holds {len(theirs)} rounds, results.json {len(mine)}" if theirs[:len(mine)] == mine or
                len(theirs) < len(mine) else "its rounds' accuracies are not results.json's")
        raise ConfigError(f"{outdir / 'checkpoint.pt'} is not the checkpoint of the run in {p}: {what} (another "
                          "run's, or an older one, copied there?); resuming would write over that run's results")


def resumable(saved: Dict[str, Any], c: Dict[str, Any], done: int, where: Path) -> None:
    """Refuse to resume a run of config ``saved`` (``done`` rounds recorded) as ``c``: only
    ``rounds`` (not below ``done``) and the execution keys may change; a key ``saved`` lacks
    (added since) counts as its default. The error names the key."""
    saved = with_defaults(saved)
    for k in c:
        if k in EXECUTION_KEYS or k == "rounds":
            continue
        if k not in saved or saved[k] != json.loads(json.dumps(c[k])):
            raise ConfigError(f"{where} was written with {k}={saved.get(k)!r}, this run asks for {k}={c[k]!r}: "
                              f"a resumed run may change only rounds, {', '.join(EXECUTION_KEYS)}")
    if c["rounds"] < done:
        raise ConfigError(f"{where} already holds {done} rounds; rounds={c['rounds']} cannot resume it "
                          f"(give rounds >= {done} to extend it)")


def prepare_out(out: Optional[str], refuse_held: bool = True) -> Optional[Path]:
    """Create the results folder (and its parents) before any training; :class:`ConfigError`
    when it is a file, lies under a file, or cannot be created or written, and, with
    ``refuse_held``, when it already holds a run (:func:`refuse_a_held_folder`; federate
    checks that itself, under the folder's lock)."""
    if not out:
        return None
    outdir = Path(out)
    if refuse_held:
        refuse_a_held_folder(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        # this process's own name: two runs started at once each probe their own (one's unlink
        # made the other's fail as "cannot be created or written")
        probe = outdir / f".fedmpq-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise ConfigError(f"--out {out} is a file, not a folder") from None
    except NotADirectoryError:
        raise ConfigError(f"--out {out} lies under a file, not a folder") from None
    except OSError as e:
        raise ConfigError(f"--out {out} cannot be created or written: {e.strerror or e}") from None
    return outdir


# What a run writes into its folder besides results.json and checkpoint.pt (results.py)
RUN_FILES = ("rounds.csv", "accuracy.png", "bits.png")


def refuse_what_blocks_a_run_file(outdir: Path) -> None:
    """:class:`ConfigError` when something that is not a file (a folder) sits where a run
    writes one of its files or their temporaries (``results.json``, ``checkpoint.pt.tmp``,
    ...): the first round trained, then its rename failed with a traceback."""
    for f in ("results.json", "checkpoint.pt", *RUN_FILES):
        for name in (f, f + ".tmp"):
            p = outdir / name
            if p.exists() and not p.is_file():
                raise ConfigError(f"--out {outdir} holds {name}, which is not a file, where a run writes its "
                                  f"{f}; give another --out or move it first")


def refuse_a_held_folder(outdir: Path) -> None:
    """:class:`ConfigError` when ``outdir`` holds a run (``results.json`` or
    ``checkpoint.pt``), or any other file a run writes there (``rounds.csv``, the plots: a
    user's own file of that name), which a new run would overwrite, or a folder where a run
    writes a file (:func:`refuse_what_blocks_a_run_file`)."""
    refuse_what_blocks_a_run_file(outdir)
    held = [f for f in ("results.json", "checkpoint.pt") if (outdir / f).is_file()]
    if held:
        raise ConfigError(f"--out {outdir} already holds a run ({' and '.join(held)}); give another --out, "
                          f"continue it with fedmpq simulate --resume {outdir}, or remove it first")
    other = [f for f in RUN_FILES if (outdir / f).exists()]
    if other:
        raise ConfigError(f"--out {outdir} already holds {' and '.join(other)}, which a run writes there; "
                          f"give another --out or move {'them' if len(other) > 1 else 'it'} first")


LOCK_NAME = ".fedmpq.lock"


class FolderLock:
    """The results folder held by one run at a time: an exclusive ``flock`` on
    ``outdir/.fedmpq.lock`` from before the checkpoint is read until the run ends. Two runs
    given the same ``--out`` side by side (or the same ``--resume``) would otherwise both
    pass the checks before either wrote, and write over each other; the second is refused
    at once. The kernel drops the lock with the process, even on SIGKILL, so a killed run
    never leaves a stale lock (the file stays: removing it would race with the next run's
    lock). ``outdir`` None, or a system without ``fcntl``: nothing to hold."""

    def __init__(self, outdir: Optional[Path]):
        self._file = None
        if outdir is None or fcntl is None:
            return
        try:
            # not through a symbolic link: the run's pid was written into the file it pointed to
            f = os.fdopen(os.open(outdir / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644),
                          "a+")
        except OSError as e:  # e.g. a folder of that name, or a symbolic link
            raise ConfigError(f"--out {outdir}: its lock file {LOCK_NAME} cannot be opened: {e.strerror or e}") from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise ConfigError(f"{outdir} is being written by another fedmpq run right now"
                              f"{f' (process {holder})' if holder.isdigit() else ''}; give another --out, or "
                              "resume it once that run has ended") from None
        except OSError as e:  # a file system without locks (some network mounts): run unguarded
            f.close()
            log.warning("%s cannot be locked (%s): nothing stops another run from writing there too",
                        outdir, e.strerror or e)
            return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the lock
            self._file = None


def claim_new_folder(base: str) -> Tuple[str, List[Path]]:
    """A results folder no other run has: ``base``, else ``base-2``, ``base-3``, ... Made
    here, and ``mkdir`` is atomic, so runs started in the same second (``runs/<date>-<time>``,
    several runs side by side on one machine) never share one. Returns its name and the
    folders made for it, parents first (:func:`release_folder` removes them while empty).
    :class:`ConfigError` when it cannot be made."""
    made: List[Path] = []
    parent = Path(base).parent
    k = 1
    try:
        for _ in range(1000):
            missing = [p for p in [parent, *parent.parents] if not p.exists()]
            parent.mkdir(parents=True, exist_ok=True)
            made += [p for p in reversed(missing) if p not in made]
            name = base if k == 1 else f"{base}-{k}"
            try:
                Path(name).mkdir()
            except FileExistsError:
                k += 1
                continue
            except FileNotFoundError:  # a stopped run's release_folder took the empty parent just now
                continue
            made.append(Path(name))
            return name, made
        raise OSError(f"no free name after {k} tries")
    except OSError as e:
        release_folder(made)
        raise ConfigError(f"the results folder {base} cannot be made: {e.strerror or e} (give --out DIR)") from None


def release_folder(made: List[Path]) -> None:
    """Removes the folders :func:`claim_new_folder` made, last first, where they are still
    empty but for the run's lock file (a run that stopped before writing anything leaves
    nothing behind)."""
    for p in reversed(made):
        try:
            if [f.name for f in p.iterdir()] == [LOCK_NAME]:
                (p / LOCK_NAME).unlink()  # the folder was made for this run alone: no other holder
            p.rmdir()  # only ever removes an empty folder
        except OSError:
            return


def federate(c: Dict[str, Any], ds: data_mod.Dataset, num_samples: Dict[int, int], budgets: Dict[int, float],
             transport: Transport, out: Optional[str] = None, resume: bool = False,
             progress: bool = True, threads=None, ready: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """The server's round loop, whatever carries the payloads: sample, prepare the downloads,
    let ``transport`` train the clients, aggregate, evaluate on ``ds``'s test set, record the
    round and checkpoint it. ``num_samples``/``budgets``: |D_k| and beta_k of every client
    0..n_clients-1; ``threads``: the threads each training process uses, an int or a
    function giving this round's (recorded in the results, per round when a function).
    ``resume``: continue ``out``'s checkpoint (only ``rounds``, to extend it, and the
    execution keys may differ). ``ready``: called once every check has passed (the device, the
    results folder, the checkpoint to resume), before the first round; ``fedmpq simulate``
    says there where the results go. Used by :func:`fedmpq.simulate.run` (in-process) and by
    the Flower app."""
    device = resolve_device(c)
    outdir = prepare_out(out, refuse_held=False)
    lock = FolderLock(outdir)
    try:
        if outdir is not None and not resume:
            refuse_a_held_folder(outdir)  # under the lock: a run that ended just now counts too
        state, done = None, []
        if resume and outdir is None:
            raise ConfigError("resume needs the results folder of the run to continue (out)")
        if resume:  # no checkpoint there is an error, not a fresh run over that folder's results
            state = read_checkpoint(outdir / "checkpoint.pt")
            same_run(state, outdir)
            refuse_what_blocks_a_run_file(outdir)  # a resumed run writes the same files
            done = json.loads(state["rounds"])  # a list: read_checkpoint checked it
            resumable(state["config"], c, len(done), outdir / "checkpoint.pt")
        torch.manual_seed(c["seed"])  # the global model's initialization
        build = model_builder(c, ds)
        srv = server_mod.Server(c["alg"], build, budgets=budgets, num_samples=num_samples, seed=c["seed"],
                                rule=c["aggregation"], device=device)
        results: Dict[str, Any] = {"config": c, "threads": threads() if callable(threads) else threads, "rounds": []}
        start = 1
        if state is not None:
            try:
                srv.load_state(state["server"])
            except ValueError as e:  # another model or clients (an older version's, edited): not a traceback mid-round
                raise ConfigError(f"{outdir / 'checkpoint.pt'} does not fit this run: {e}") from None
            results["rounds"] = done
            start = len(done) + 1
        if ready is not None:  # every check passed, the checkpoint's state too
            ready()
        test_x, test_y = ds.test_x.to(device), ds.test_y.to(device)  # once, not per round
        rounds = range(start, c["rounds"] + 1)
        if state is not None and outdir is not None and not rounds:
            # Nothing left to run: the files still say what the checkpoint holds (a kill
            # between the checkpoint and results.json of the last round left one round out),
            # and the checkpoint the config they say (--rounds lowered to end the run sooner: a
            # later plain --resume ran on to the old number)
            if state["config"] != c:
                replace_whole(outdir / "checkpoint.pt",
                              lambda p: torch.save({**state, "config": json.loads(json.dumps(c))}, p), durable=True)
            write_results(results, outdir)
        bar = _progress(rounds, progress, "rounds")
        plots = PlotPacer(results, outdir) if outdir is not None else None
        try:
            for r in bar:
                t0 = time.perf_counter()
                sampled = sample_clients(c, r)
                td = time.perf_counter()
                downloads = srv.downloads(r, sampled)  # binarize + encode
                td = time.perf_counter() - td
                uploads, train_acc, quant = transport(r, downloads)
                used = threads() if callable(threads) else threads
                uploads = dict(sorted(uploads.items()))  # aggregate in client order, whatever order replies came in
                report = srv.aggregate(r, uploads)
                acc = srv.evaluate(test_x, test_y)
                row = dict(round=r, accuracy=acc, accuracy_train_mode=srv.evaluate_train_mode(test_x, test_y, seed=r),
                           train_accuracy=_mean_of(train_acc, report["reported"]),
                           bytes_up=sum(len(u) for u in uploads.values()),
                           bytes_down=sum(len(d) for d in downloads.values()),
                           float32_bytes=srv.float32_bytes() * (len(uploads) + len(downloads)),
                           bits={str(k): v for k, v in report["bits"].items()},
                           mean_bits={str(k): v for k, v in report["mean_bits"].items()},
                           assigned_mean_bits={str(k): v for k, v in report.get("assigned_mean_bits", {}).items()},
                           reported=sorted(uploads), aggregated=sorted(report["reported"]), threads=used,
                           seconds=time.perf_counter() - t0, quant_seconds=quant + report["seconds"] + td)
                results["rounds"].append(row)
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(acc=f"{acc:.3f}")
                log.info("round %d: accuracy %.4f, up %d B, down %d B, %.1f s", r, acc, row["bytes_up"],
                         row["bytes_down"], row["seconds"])
                if outdir is not None:
                    ckpt = {"config": json.loads(json.dumps(c)), "server": srv.state(),
                            "rounds": json.dumps(results["rounds"]), "round": r}
                    replace_whole(outdir / "checkpoint.pt", lambda p: torch.save(ckpt, p), durable=True)  # never half a checkpoint
                    write_results(results, outdir, plots=False)
                    plots.round_done(last=r == c["rounds"])
        except BaseException:
            if plots is not None:
                plots.flush()  # the plots show every round results.json holds
            raise
        return results
    finally:
        lock.release()
