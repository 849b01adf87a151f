"""The ``fedmpq`` command: ``simulate`` (in this process, :mod:`fedmpq.simulate`), ``flower``
(Flower's simulation engine, :mod:`fedmpq.flower.simulation`) and ``compare``
(:func:`fedmpq.results.compare`). ``fedmpq`` alone runs the built-in default federation."""
from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

# Only the standard library at import time: the rest of fedmpq brings torch in (about 2 s), and
# the console script imports this module before it calls main, whose handler alone turns a
# Ctrl-C into one line. main imports the rest under that handler.


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line (no usage block) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"fedmpq: {message} (see {self.prog} --help)\n")


def _flag_type(key: str, parse, what: Optional[str] = None):
    """A flag parser whose error names the flag and what it may be (argparse would name the
    parsing function instead); ``what``: for a flag that is no config key (HELP's text else)."""
    from .config import HELP, ConfigError

    what = HELP[key] if what is None else what

    def typed(text: str):
        try:
            return parse(text)
        except (ConfigError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; {key}: {what}") from None
    typed.__name__ = key
    return typed


def _seconds(text: str) -> float:
    """A duration flag: a finite number of seconds > 0."""
    v = float(text)
    if not 0 < v < float("inf"):
        raise ValueError(text)
    return v


def _path(text: str) -> str:
    """A file or folder flag: an empty one (``--resume "$DIR"`` with DIR unset) is refused,
    not taken for the flag left out (which would start a new default run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path is not allowed")
    return text


def _config_flags(p: argparse.ArgumentParser, quiet: bool = True) -> None:
    from .config import (DEFAULTS, HELP, default_text, parse_alpha, parse_bool, parse_budgets, parse_optional_int,
                         parse_optional_path)

    p.add_argument("--config", metavar="FILE", type=_path, help="YAML (.yaml/.yml) or JSON (.json) file of config keys "
                                                             "(flags override it)")
    p.add_argument("--out", metavar="DIR", type=_path, help="results folder: results.json, rounds.csv, plots, checkpoint.pt "
                                                "(default: runs/<date>-<time>)")
    if quiet:  # fedmpq flower has no bars, and its round lines come from the ServerApp
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no per-round lines")
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if k == "budgets":
            parse = parse_budgets
        elif k == "alpha":
            parse = parse_alpha
        elif k in ("train_samples", "threads"):
            parse = parse_optional_int(k)
        elif k == "data_dir":
            parse = parse_optional_path
        elif isinstance(v, bool):
            parse = parse_bool(k)
        else:
            parse = type(v)
        # absent flags are not in args at all (default=SUPPRESS): a config file's value stays
        p.add_argument(flag, dest=k, default=argparse.SUPPRESS, type=_flag_type(k, parse), metavar=k.upper(),
                       help=f"{HELP[k]} (default: {default_text(v)})")


def _flags(args: argparse.Namespace) -> Dict[str, Any]:
    """The config keys given as flags (absent flags are not in ``args``)."""
    from .config import DEFAULTS

    return {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}


def _flag_config(args: argparse.Namespace) -> Dict[str, Any]:
    from .config import load_config_file

    cfg: Dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    cfg.update(_flags(args))
    return cfg


def _default_out(made: List[Path]) -> str:
    """runs/<date>-<time> (with -2, -3, ... where a run started in the same second has it),
    made now; the folders made go to ``made``, for main to remove if the run stops early."""
    from .federation import claim_new_folder

    name, folders = claim_new_folder(time.strftime("runs/%Y%m%d-%H%M%S"))
    made += folders
    return name


class Stopped(BaseException):
    """SIGTERM (what a job scheduler or ``kill`` sends) raised as an exception, so that a run
    stops the way Ctrl-C stops it: the plots brought up to date, a folder made for nothing
    removed, one line saying how to continue. Not an ``Exception``: nothing that leaves a
    failing client out of its round catches it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def _stopped_line(signum: int, out: Optional[str], total: Optional[int], resumable: bool) -> str:
    """What a run stopped by a signal says: where its rounds are and how to go on. ``total``:
    the rounds the stopped run was to reach (a resume may have raised the saved ones)."""
    name = _signal_name(signum)
    try:
        res = json.loads((Path(out) / "results.json").read_text()) if out else None
        done, saved = len(res["rounds"]), res["config"]["rounds"]
    except (OSError, ValueError, KeyError, TypeError):
        done = saved = 0
    if not done:
        return f"fedmpq: stopped by {name} before the first round ended"
    total = saved if total is None else total
    if done >= total:  # the signal came after the last round was written: nothing to go on with
        return f"fedmpq: stopped by {name} after its last round ({done} of {total}): the run is whole; results in {out}"
    line = f"fedmpq: stopped by {name} after {done} of {total} rounds; the results so far are in {out}"
    if resumable:  # the checkpoint holds the config results.json does: its rounds unless raised
        line += f"; continue with: fedmpq simulate --resume {out}" + (f" --rounds {total}" if total != saved else "")
    return line


def _die_by(signum: int) -> None:
    """Ends this process by ``signum`` itself (its default action), so that a shell loop or
    a scheduler sees a process the signal stopped and stops too (an exit status of 130
    does not stop a bash loop); also ends threads that would keep it alive."""
    sys.stdout.flush()
    sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _threads_left() -> List[threading.Thread]:
    """Threads other than this one that would keep the process alive after main returns."""
    return [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon and t.is_alive()]


def _parser() -> _Parser:
    """The command's flags (building them imports the config keys, and with them torch)."""
    ap = _Parser(prog="fedmpq", description="FedMPQ: mixed-precision quantized federated learning. "
                                            "`fedmpq` alone runs `fedmpq simulate` on its built-in default.")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser)
    sim = sub.add_parser("simulate", help="run a federation in one process",
                         description="Run a federation in one process; every config key is also a flag.")
    _config_flags(sim)
    sim.add_argument("--resume", metavar="DIR", type=_path, help="continue the run in DIR from its last checkpoint; flags may "
                                                     "change rounds (raise it to extend the run, or lower it to end "
                                                     "sooner, not below the rounds done; the run's config then "
                                                     "records the new rounds), device, cuda-graph, threads, "
                                                     "data-dir and memory-format")
    fl = sub.add_parser("flower", help="run the same federation through Flower's simulation engine "
                                       "(needs the flower extra)",
                        description="Run the federation on Flower's simulation engine (Ray); the same keys.")
    _config_flags(fl, quiet=False)
    fl.add_argument("--cpus", type=_flag_type("cpus", int, "CPUs Ray may use, an integer >= 1"), default=None,
                    metavar="N",
                    help="CPUs Ray may use; cpus // threads clients train at once (default: the cores this "
                         "process may use)")
    fl.add_argument("--round-timeout", type=_flag_type("round_timeout", _seconds, "seconds, a number > 0"),
                    default=600.0, metavar="S",
                    help="seconds a round's replies may take; a client that has not answered by then is left "
                         "out of the round (default: 600; long rounds, ResNet-20 on a CPU, need more)")
    cmp_ = sub.add_parser("compare", help="compare the results of several runs",
                          description="Compare runs: runs that differ only in the seed, or in where and how they "
                                      "ran (device, cuda-graph, threads, data-dir, memory-format), form one "
                                      "group; of two runs that also share the seed, the second is left out.")
    cmp_.add_argument("dirs", nargs="+", metavar="DIR", type=_path, help="run folders holding results.json")
    cmp_.add_argument("--plot", metavar="PNG", type=_path, help="write the accuracy curves (mean and min..max over seeds) "
                                                    "to this PNG, a new file: an existing one is refused, not "
                                                    "written over (needs matplotlib)")
    cmp_.add_argument("--last", type=int, default=5, metavar="N",
                      help="average the accuracy over this many last rounds, or all of a run's rounds where it has "
                           "fewer (default: 5)")
    cmp_.add_argument("--bits", action="store_true",
                      help="also print the bits per layer each budget's clients uploaded in the last round "
                           "(after their precision reduction)")
    return ap


def _release(made: List[Path]) -> None:
    if made:  # only claim_new_folder makes them, so federation is imported already
        from .federation import release_folder
        release_folder(made)


def main(argv: Optional[List[str]] = None) -> int:
    """The ``fedmpq`` command; returns its exit status (2: a bad flag, config or dataset).
    A run (or ``compare``) stopped by Ctrl-C or SIGTERM says one line, then, as the command
    (``argv`` None), ends the process by that signal; called with ``argv``, it returns 128 +
    the signal. That holds from main's first line on, the imports of torch and the flags'
    parsing included."""
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("simulate", "compare", "flower")
    if argv and argv[0] not in commands and not argv[0].startswith("-"):
        # simulate takes no positional argument: a first word is a command, mistyped ("fedmpq
        # compar c1" said "unrecognized arguments: compar c1", as if simulate had been meant)
        near = difflib.get_close_matches(argv[0], commands, n=1)
        hint = f" (did you mean {near[0]}?)" if near else " (did you mean --help?)" if argv[0] == "help" else ""
        print(f"fedmpq: unknown command {argv[0]!r}{hint}; the commands are {', '.join(commands)}, and "
              "`fedmpq` alone or with flags runs simulate", file=sys.stderr)
        return 2
    if not argv or argv[0] not in (*commands, "-h", "--help"):
        argv = ["simulate"] + argv  # `fedmpq` alone runs the built-in default federation
    cmd = argv[0]  # known before the flags are parsed: a Ctrl-C may come first
    made: List[Path] = []  # a dated results folder made for this run
    out: Optional[str] = None
    cfg: Optional[Dict[str, Any]] = None
    sigterm = None
    if threading.current_thread() is threading.main_thread():
        sigterm = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        # Here, under the handler below, not at the top of the module (see there)
        from . import data as data_mod
        from . import simulate
        from .config import ConfigError, check_config
        from .federation import prepare_out, resumed_config, trained_nothing
        from .heap import keep_freed_memory
        from .progress import log_through_bars
        from .results import bits_table, compare

        try:
            args = _parser().parse_args(argv)
        except SystemExit as e:  # --help (0) or a bad flag (2, already said in one line)
            return int(e.code or 0)
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        if cmd == "simulate" and args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            print(f"fedmpq: --resume {args.resume} continues the run in that folder; leave out --out "
                  f"(or give the same folder)", file=sys.stderr)
            return 2
        if cmd == "simulate" and args.resume and args.config:
            print(f"fedmpq: --resume {args.resume} continues the run with its saved config; leave out --config "
                  f"(give what may change as flags: rounds, device, cuda-graph, threads, data-dir, memory-format)",
                  file=sys.stderr)
            return 2
        try:
            if cmd == "compare":
                print(compare(args.dirs, args.plot, args.last))
                if args.bits:
                    print()
                    print(bits_table(args.dirs, warn=False))  # compare said which runs it left out
                return 0
            keep_freed_memory()  # a round's tensors reuse the heap, not fresh pages (fedmpq.heap)
            if cmd == "flower":
                try:
                    from .flower import simulation as flower_sim
                except ImportError as e:
                    v = sys.version_info
                    if v < (3, 11):  # no flwr release that the flower extra takes (>= 1.42) installs there
                        raise ConfigError(f"fedmpq flower needs Flower 1.42 or newer, which needs Python 3.11 or "
                                          f"newer; this is Python {v[0]}.{v[1]} (fedmpq simulate runs the same "
                                          f"federation in one process) ({e})") from None
                    raise ConfigError(f"fedmpq flower needs Flower: pip install -e \".[flower]\" ({e})") from None
                cfg = check_config(_flag_config(args))
                out = args.out or _default_out(made)
                flower_sim.check(cfg, args.cpus)  # a missing dataset or CUDA stops here, not in Flower
                prepare_out(out)  # and a results folder that cannot be written
                print(f"fedmpq: results in {out}", file=sys.stderr)
                res = flower_sim.run(cfg, out=out, cpus=args.cpus, round_timeout=args.round_timeout)
            else:
                if args.resume:
                    cfg = resumed_config(args.resume, _flags(args))  # the run's own values, flags over them
                    out = args.resume
                else:
                    cfg = _flag_config(args)
                    out = args.out or _default_out(made)
                cfg = check_config(cfg)
                ready = None
                if not args.quiet:
                    logging.getLogger("fedmpq").setLevel(logging.INFO)
                    log_through_bars(logging.getLogger("fedmpq"))

                    def ready():  # said once nothing can stop the run before training (one line if it is stopped)
                        print(f"fedmpq: results in {out}", file=sys.stderr)
                res = simulate.run(cfg, out=out, resume=bool(args.resume), progress=not args.quiet, ready=ready)
            last = res["rounds"][-1] if res["rounds"] else None
            if trained_nothing(res):
                # every client failed or was left out in every round: the model is the initial one,
                # and a run that trained nothing is not a success (the rounds' warnings say why)
                print(f"fedmpq: no client's upload was aggregated in any of the {len(res['rounds'])} rounds: the "
                      f"global model is untrained (the warnings above say why); results in {out}", file=sys.stderr)
                return 1
            if last:
                print(f"final accuracy {last['accuracy']:.4f} after {last['round']} rounds; results in {out}")
            return 0
        except (ConfigError, data_mod.MissingDatasetError) as e:
            print(f"fedmpq: {e}", file=sys.stderr)
            return 2
    except (KeyboardInterrupt, Stopped) as e:  # no traceback of whatever was running
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        if cmd == "compare":  # no run and no rounds; a table already printed stays (_die_by flushes it)
            print(f"fedmpq: compare stopped by {_signal_name(signum)}", file=sys.stderr)
        else:
            total = cfg.get("rounds") if isinstance(cfg, dict) else None
            print(_stopped_line(signum, out, total, resumable=cmd == "simulate"), file=sys.stderr)
        left = _threads_left()
        if ((argv_given is None or (cmd == "flower" and left))
                and threading.current_thread() is threading.main_thread()):
            # The command dies by the signal (see _die_by); so does a process whose other
            # threads would keep it alive: Flower's ServerApp thread is not a daemon and would
            # wait out the round's timeout (600 s) for replies that will not come. The files
            # it wrote are whole (replace_whole) and the kernel drops its lock; its folder is
            # not released under it (no finally runs), a lone run's is.
            if not left:
                _release(made)
            _die_by(signum)
        return 128 + signum  # in-process: the shell's status for a process the signal stopped
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        _release(made)  # only while empty: a run stopped before its first round leaves nothing


if __name__ == "__main__":
    sys.exit(main())
