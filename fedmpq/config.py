"""A federation's configuration: the keys, their defaults and meaning (:data:`DEFAULTS`,
:data:`HELP`), their checks (:func:`check_config`), config files, and the wiring from a
checked config to the model and the clients' training settings.

The same keys serve ``fedmpq simulate`` and ``fedmpq flower`` (each also a flag), config
files (YAML or JSON) and the Flower app's run config (:mod:`fedmpq.flower.config`).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import fedmpq_kernels as fk

from . import aggregate as agg_mod
from . import client as client_mod
from . import data as data_mod
from . import nn as qn

PAPER_BUDGETS = [2, 2, 4, 4, 4, 6, 6, 6, 8, 8]
DEFAULTS: Dict[str, Any] = dict(
    alg="fedmpq", dataset="digits", data_dir=None, model="small_cnn", alpha=0.5, n_clients=10,
    budgets=PAPER_BUDGETS, rounds=30, local_epochs=5, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4,
    **{"lambda": 1e-3}, threshold=2.0, sampling_rate=1.0, act_bits=4, scale_lr="lsq", classifier="quantized",
    seed=0, train_samples=None, aggregation="mean", device="cpu", cuda_graph=False, threads=None,
    memory_format="auto",
)
# Keys that only say where or how fast a run executes: a resumed run may change them, and
# runs that differ only in them are the same experiment.
EXECUTION_KEYS = ("device", "cuda_graph", "threads", "data_dir", "memory_format")
# Keys added after runs were saved whose default for new runs differs from what those runs did:
# with_defaults gives a saved config the value it ran with.
BEFORE_THE_KEY: Dict[str, Any] = {"memory_format": "contiguous"}
ALGS = client_mod.ALGORITHMS
CLASSIFIERS = ("quantized", "float")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
# memory_format auto: channels-last on the CPU from this image size up (measured on 8x8 digits,
# slower, and 28x28 / 32x32, faster: docs/BENCHMARKS.md)
CHANNELS_LAST_MIN_SIZE = 16
# No dataset can be split among more (at most 60000 training samples, 10 per client); the bound
# stops a typo's n_clients before budgets are expanded to that many (minutes, or out of memory).
MAX_CLIENTS = 100_000
MAX_THREADS = 4096
# The clients' generator keys take the seed mod 2^32 (fk.step_key), and a round's sampling seed,
# seed * 1000003 + round, must fit torch's 64-bit seed: a larger seed stopped the first round
# with a traceback.
MAX_SEED = 2**32 - 1
# torch keeps a device index in 8 bits: cuda:9999 became cuda:15 and cuda:200 cuda:-56, unsaid
MAX_CUDA_INDEX = 127
# The datasets that read files from data_dir (digits ships with scikit-learn: it reads no folder)
DATA_DIR_DATASETS = tuple(d for d in data_mod.DATASETS if d != "digits")

# One line per key for --help and the docs: what it is and what it may be (the default is
# added from DEFAULTS).
HELP: Dict[str, str] = {
    "alg": f"algorithm: {', '.join(ALGS)} (fp = float FedAvg; fp8 = every layer at 8 bits)",
    "dataset": f"dataset: {', '.join(data_mod.DATASETS)}",
    "data_dir": f"folder of the dataset's files, for {', '.join(DATA_DIR_DATASETS)} (digits reads none); "
                "none: the dataset's default location",
    "model": f"model: {', '.join(qn.models.MODELS)}",
    "alpha": "Dirichlet concentration of the non-iid split, a number > 0, or iid",
    "n_clients": f"number of clients, an integer in 1..{MAX_CLIENTS}",
    "budgets": "average-bit budget per client, comma-separated numbers in 1..8 (one per client, or one for all; "
               "spaces only beside a comma)",
    "rounds": "federation rounds, an integer >= 1",
    "local_epochs": "local epochs per round, an integer >= 1",
    "batch_size": "local batch size, an integer >= 1",
    "lr": "learning rate, a number > 0 that float32 holds (1.4e-45 to 3.4e38)",
    "momentum": "SGD and bit-plane momentum, in [0, 1) (below 1 - 2**-25, which float32 rounds to 1)",
    "weight_decay": "weight decay of fp's SGD, a number >= 0, at most 3.4e38 (the bit-plane optimizer has none)",
    "lambda": "group-lasso weight on the bit planes, a number >= 0 (at most 3.4e38)",
    "threshold": "precision reduction threshold theta in percent, in [0, 100)",
    "sampling_rate": "fraction of clients sampled per round, in (0, 1]",
    "act_bits": "activation bits on the clients: 1..8 or 16",
    "scale_lr": f"scale learning-rate rule: {', '.join(client_mod.SCALE_LR_RULES)} "
                "(lsq: lr/sqrt(n(2^N-1)) per layer; sgd: lr, the authors')",
    "classifier": f"the quantized clients' classifier: {', '.join(CLASSIFIERS)} (quantized: bit planes, the paper's; "
                  "float: a float layer trained by SGD and sent as float32, against its saturation)",
    "seed": f"seed of the split, the model's initialization, sampling and training, an integer in 0..{MAX_SEED}",
    "train_samples": "use a fixed subset of this many training samples (the same for every algorithm and seed); "
                     "none: the whole training set",
    "aggregation": f"server aggregation rule: {', '.join(agg_mod.RULES)} (coordinate-wise; median and "
                   f"trimmed_mean resist outlying clients)",
    "device": f"where clients train and the server evaluates: cpu, cuda or cuda:N (N in 0..{MAX_CUDA_INDEX})",
    "cuda_graph": "true: replay each client's local step from a CUDA graph captured per round (device cuda only; "
                  "a batch of another size runs eagerly); false: every step eagerly",
    "threads": "threads of one training process; none: fedmpq simulate and a SuperNode's client take the cores "
               "this process may use divided among the fedmpq processes training on this machine (counted every "
               "round, and on a SuperNode every local epoch); fedmpq flower gives each client all of them",
    "memory_format": f"layout of the models' activations: {', '.join(MEMORY_FORMATS)} (auto: channels_last on the "
                     f"CPU for images of {CHANNELS_LAST_MIN_SIZE}x{CHANNELS_LAST_MIN_SIZE} and larger, where a "
                     "ResNet-20 step is 13-23 percent faster so; contiguous for the 8x8 digits, whose steps it slows, "
                     "and on CUDA, where it has not been timed)",
}
assert set(HELP) == set(DEFAULTS)


def with_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A config saved by an earlier version (results.json, checkpoint.pt) with :data:`DEFAULTS`
    for the keys it lacks, or the value of :data:`BEFORE_THE_KEY` where the default for new
    runs is not what the run did: the saved run is the one these values describe."""
    return {**DEFAULTS, **BEFORE_THE_KEY, **saved}


class ConfigError(ValueError):
    """A bad configuration: the message is one line naming the problem."""


def _number(c: Dict[str, Any], key: str, lo: float, hi: float = math.inf, lo_open: bool = False,
            hi_open: bool = False, what: str = "") -> None:
    v = c[key]
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
    if not ok:
        raise ConfigError(f"{key} must be {what}, got {v!r}")
    c[key] = float(v)  # a file's 1 is recorded as the flag's 1.0: one setting in fedmpq compare


def _integer(c: Dict[str, Any], key: str, lo: int, what: str, optional: bool = False, hi: int = (1 << 63) - 1) -> None:
    v = c[key]
    if optional and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or v > hi:
        raise ConfigError(f"{key} must be {what}, got {v!r}")
    c[key] = int(v)


# The words a key whose value may be none takes for it, in a config file as on the command line.
# alpha has no empty word: none is an iid split, not the default Dirichlet(0.5), so an empty
# --alpha "$A" (A unset) must not quietly run another experiment.
_NONE_WORDS = {"alpha": ("iid", "none", "null"), "train_samples": ("none", "null", "auto", ""),
               "threads": ("none", "null", "auto", ""), "data_dir": ("none", "null", "")}


def default_text(v: Any) -> str:
    """A default as --help and the errors show it."""
    if v is None:
        return "none"
    if isinstance(v, bool):  # as the flags and files write it
        return "true" if v else "false"
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def check_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Complete ``cfg`` with :data:`DEFAULTS` and check every key; raises :class:`ConfigError`
    (one line naming the key and what it may be)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a configuration is a mapping of keys, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(DEFAULTS), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r} (known: {', '.join(DEFAULTS)})")
    for k, v in cfg.items():  # null is none, as the flags take it: only for the keys that may be none
        if v is None and k not in _NONE_WORDS:
            raise ConfigError(f"{k} must not be null (leave the key out for its default, {default_text(DEFAULTS[k])})")
    c = dict(DEFAULTS)
    c.update(cfg)
    for key, words in _NONE_WORDS.items():  # a config file's "iid" or "none", as the flags take them
        if isinstance(c[key], str) and c[key].strip().lower() in words:
            c[key] = None
    for key, choices in (("alg", ALGS), ("dataset", data_mod.DATASETS), ("model", qn.models.MODELS),
                         ("scale_lr", client_mod.SCALE_LR_RULES), ("aggregation", agg_mod.RULES),
                         ("classifier", CLASSIFIERS), ("memory_format", MEMORY_FORMATS)):
        if not isinstance(c[key], str) or c[key] not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {c[key]!r}")
    if c["data_dir"] is not None and not isinstance(c["data_dir"], str):
        raise ConfigError(f"data_dir must be a folder path (a string), got {c['data_dir']!r}")
    if c["data_dir"] is not None and c["dataset"] not in DATA_DIR_DATASETS:
        # it would be accepted, recorded and ignored: a typo'd folder or a forgotten --dataset unsaid
        raise ConfigError(f"data_dir is read only for {', '.join(DATA_DIR_DATASETS)}; dataset {c['dataset']} "
                          f"ships with scikit-learn and reads no folder, got data_dir {c['data_dir']!r} "
                          f"(leave it out, or give none)")
    _integer(c, "n_clients", 1, f"an integer in 1..{MAX_CLIENTS}", hi=MAX_CLIENTS)
    for key in ("rounds", "local_epochs", "batch_size"):
        _integer(c, key, 1, "an integer >= 1")
    _integer(c, "seed", 0, f"an integer >= 0, at most {MAX_SEED}", hi=MAX_SEED)
    _integer(c, "train_samples", 1, "an integer >= 1, or null for the whole training set", optional=True)
    # torch.set_num_threads takes a C int; no machine has more cores than this
    _integer(c, "threads", 1, f"an integer in 1..{MAX_THREADS}, or null for the default", optional=True, hi=MAX_THREADS)
    if c["alpha"] is not None:
        _number(c, "alpha", 0, lo_open=True, what="a finite number > 0 (or iid/null for an iid split)")
    budgets = c["budgets"]
    if isinstance(budgets, str):  # "2,4,8", as --budgets and Flower's run config take it
        budgets = parse_budgets(budgets)
    if isinstance(budgets, numbers.Real) and not isinstance(budgets, bool):
        budgets = [budgets] * c["n_clients"]
    elif isinstance(budgets, list) and len(budgets) == 1:  # --budgets 4: one for all
        budgets = budgets * c["n_clients"]
    if not isinstance(budgets, list) or len(budgets) != c["n_clients"]:
        raise ConfigError(f"budgets must list one budget per client ({c['n_clients']}), got {budgets!r}")
    for b in budgets:
        if (isinstance(b, bool) or not isinstance(b, numbers.Real) or not math.isfinite(b)
                or not fk.MIN_BITS <= b <= fk.MAX_BITS):
            raise ConfigError(f"every budget must be in {fk.MIN_BITS}..{fk.MAX_BITS}, got {b!r}")
    # 4.0 (a file's, or "4.0") is recorded as 4: one setting with 4 in fedmpq compare
    c["budgets"] = [int(b) if float(b).is_integer() else float(b) for b in budgets]
    for key in ("lambda", "weight_decay"):  # used in float32: beyond its range inf (steps skipped, or torch refusing)
        _number(c, key, 0, qn.optim.F32_MAX, what="a finite number >= 0 that float32 holds (at most 3.4e38)")
    # a percent: from 100 up every plane is at or below it, so every layer was pruned to 1 bit, silently
    _number(c, "threshold", 0, 100, hi_open=True, what="a percent in [0, 100)")
    # the bit-plane kernels step in float32: an lr it holds as 0 or inf, a momentum it holds as
    # 1, were refused by them at the first step (training stopped mid-run), not here
    _number(c, "lr", qn.optim.F32_LEAST, qn.optim.F32_MAX, what="a finite number > 0 that float32 holds (1.4e-45 to 3.4e38)")
    _number(c, "momentum", 0, qn.optim.MOMENTUM_MAX, hi_open=True,
            what="a number in [0, 1) (below 1 - 2**-25, which float32 rounds to 1)")
    _number(c, "sampling_rate", 0, 1, lo_open=True, what="a number in (0, 1]")
    if isinstance(c["act_bits"], bool) or c["act_bits"] not in fk.ALLOWED_BITS:
        raise ConfigError(f"act_bits must be {fk.MIN_BITS}..{fk.MAX_BITS} or {fk.FLOAT_BITS}, got {c['act_bits']!r}")
    c["act_bits"] = int(c["act_bits"])  # a file's 4.0: recorded as 4, one group with 4 in fedmpq compare
    # ASCII digits, no leading zero, an index torch can hold: torch refused cuda:007 and cuda:٣
    # with a traceback, and wrapped cuda:9999 round to another device
    m = re.fullmatch(r"cpu|cuda(?::(0|[1-9][0-9]{0,2}))?", c["device"]) if isinstance(c["device"], str) else None
    if m is None or (m.group(1) is not None and int(m.group(1)) > MAX_CUDA_INDEX):
        raise ConfigError(f"device must be cpu, cuda or cuda:N (N in 0..{MAX_CUDA_INDEX}, no leading zero), "
                          f"got {c['device']!r}")
    if not isinstance(c["cuda_graph"], bool):
        raise ConfigError(f"cuda_graph must be true or false, got {c['cuda_graph']!r}")
    if c["cuda_graph"] and not c["device"].startswith("cuda"):
        raise ConfigError(f"cuda_graph needs a CUDA device (device cuda or cuda:N), got device {c['device']}")
    return c


def resolve_device(c: Dict[str, Any]) -> torch.device:
    """The torch device of a checked config; :class:`ConfigError` when it does not exist here
    (before any training)."""
    try:
        dev = torch.device(c["device"])
    except RuntimeError as e:  # what check_config let through and this torch still refuses: one line
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {c['device']!r} ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ""
            if os.environ.get("CUDA_VISIBLE_DEVICES") == "":  # what Ray gives a worker that asked for no GPU
                why = (" (CUDA_VISIBLE_DEVICES is empty here, which hides every GPU; in a Flower simulation give "
                       "its clients num-gpus or set RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1)")
            raise ConfigError(f"device {c['device']} was asked for, but this torch ({torch.__version__}) sees no "
                              f"CUDA device{why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {c['device']} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's core count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_threads(c: Dict[str, Any]) -> int:
    """Threads for one training process that takes a fixed share (each of ``fedmpq flower``'s
    clients: Ray trains ``cpus // threads`` of them at once): the config's ``threads``, else
    the cores this process may use. ``fedmpq simulate`` and a SuperNode's client, without the
    setting, count the trainers beside them instead (:func:`fedmpq.trainers.share_cores`)."""
    if c["threads"] is not None:
        return c["threads"]
    return available_cores()


def load_data(c: Dict[str, Any]) -> Tuple[data_mod.Dataset, List[torch.Tensor]]:
    """The dataset of a checked config (its ``train_samples`` subset) and the clients' parts
    of it. Raises :class:`fedmpq.data.MissingDatasetError`, or :class:`ConfigError` when its
    files are not what they should be or it cannot be split as asked (e.g. more clients than
    samples)."""
    try:
        ds = data_mod.load(c["dataset"], c["data_dir"])
    except data_mod.MissingDatasetError:
        raise
    except (ValueError, OSError, data_mod.UnsafePickleError) as e:  # files that are there but are not the dataset
        raise ConfigError(f"dataset {c['dataset']}: {e}") from None
    whole = ds.num_train
    try:
        ds = data_mod.subset(ds, c["train_samples"])
        parts = data_mod.partition(ds.train_y, c["n_clients"], c["alpha"], c["seed"])
    except data_mod.PartitionError as e:
        raise ConfigError(_split_advice(c, e, whole)) from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return ds, parts


def _split_advice(c: Dict[str, Any], e: data_mod.PartitionError, whole: int) -> str:
    """A split that cannot be made, said in the keys that can change it (partition's own
    message names its min_size, which is no config key)."""
    if c["train_samples"] is None:
        samples, more = f"the {e.n} {c['dataset']} training samples", ""
    else:
        samples = f"the {e.n} training samples (train_samples={c['train_samples']})"
        more = ", or raise train_samples (--train-samples)" if c["train_samples"] < whole else ""
    if not e.draws:
        return (f"n_clients={c['n_clients']} clients of at least {e.min_size} samples each need "
                f"{c['n_clients'] * e.min_size}, more than {samples}: lower n_clients (--n-clients){more}")
    tried = (f"each of the first {e.draws} draws left {e.short} or more clients with fewer, so more draws would not "
             "help" if e.hopeless else f"none of {e.draws} draws did; in the best, the smallest client had {e.best}")
    return (f"alpha={c['alpha']:g} with n_clients={c['n_clients']}: no Dirichlet split of {samples} gives every client "
            f"at least {e.min_size} samples ({tried}): raise alpha (--alpha; iid splits evenly) or lower n_clients "
            f"(--n-clients){more}")


CONFIG_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", "": "json"}


def _refuse_duplicates(path: str, pairs) -> Dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice is refused (json keeps the last one
    unsaid: rounds 1 then rounds 2 ran 2 rounds)."""
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ConfigError(f"config file {path}: key {k!r} given twice")
        out[k] = v
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """A YAML (``.yaml``/``.yml``, any case, needs PyYAML) or JSON (``.json``, or no suffix:
    ``--config <(...)``) config file as a dict; a file with another suffix, or that is missing,
    not a file, unreadable, not a mapping or gives a key twice raises :class:`ConfigError`
    naming it."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a directory")
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    kind = CONFIG_SUFFIXES.get(p.suffix.lower())
    if kind is None:  # a .toml or .txt was read as JSON, and its error spoke of JSON syntax
        raise ConfigError(f"config file {path}: config files must be YAML (.yaml/.yml) or JSON (.json), "
                          f"got suffix {p.suffix!r}")
    if kind == "yaml":
        try:
            import yaml
        except ImportError:
            raise ConfigError("a YAML config needs PyYAML (pip install pyyaml); or use JSON") from None

        class Loader(yaml.SafeLoader):  # a key given twice refused; 1e-3 read as a number (below)
            def construct_mapping(self, node, deep=False):
                # PyYAML keeps the last of a key given twice, unsaid; a merge (<<) may still be overridden
                if isinstance(node, yaml.MappingNode):
                    seen = set()
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = self.construct_object(key_node, deep=True)
                        try:
                            again = key in seen
                            seen.add(key)
                        except TypeError:  # an unhashable key: SafeLoader's own error says so
                            continue
                        if again:
                            raise ConfigError(f"config file {path}: key {key!r} given twice "
                                              f"(line {key_node.start_mark.line + 1})")
                return super().construct_mapping(node, deep)

        # YAML 1.1 reads 1e-3 (no dot) as a string: read it as YAML 1.2 does
        Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                     re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                     list("-+0123456789."))
        try:
            cfg = yaml.load(text, Loader=Loader)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            raise ConfigError(f"config file {path} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    else:
        try:
            cfg = json.loads(text, object_pairs_hook=lambda pairs: _refuse_duplicates(path, pairs))
        except json.JSONDecodeError as e:
            # a file without a suffix is read as JSON: say so, in case it holds YAML
            unsuffixed = "" if p.suffix else "; a config file without a suffix is read as JSON (YAML needs .yaml/.yml)"
            raise ConfigError(f"config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg}){unsuffixed}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {path} must hold a mapping of config keys, got {type(cfg).__name__}")
    return cfg


def parse_budgets(text: str) -> List[Any]:
    """``"2,4,8"`` -> ``[2, 4, 8]`` (``"2.5"`` stays a float; spaces beside a comma are
    dropped); raises :class:`ConfigError`."""
    if not text.strip():
        raise ConfigError("budgets must be comma-separated numbers, got an empty string")
    out = []
    for b in text.split(","):
        b = b.strip()
        if not b:  # "4,,8" was read as 4,8: a budget left out, unsaid
            raise ConfigError(f"budgets must be comma-separated numbers, got {text!r}: an empty place in the list")
        if any(ch.isspace() for ch in b):  # "2.5 4" was read as 2.54: a comma is the only separator
            raise ConfigError(f"budgets must be comma-separated numbers, got {text!r}: {b!r} holds a space "
                              f"(separate budgets with commas)")
        try:
            v = float(b) if any(ch in b for ch in ".eEn") else int(b)
        except ValueError:
            raise ConfigError(f"budgets must be comma-separated numbers, got {text!r}") from None
        if not math.isfinite(v):
            raise ConfigError(f"every budget must be in {fk.MIN_BITS}..{fk.MAX_BITS}, got {b!r}")
        out.append(v)
    return out


def parse_alpha(text: str) -> Optional[float]:
    """``"iid"``/``"none"`` -> None (no Dirichlet split), else the number; raises
    :class:`ConfigError` (an empty text too: it is no word for iid)."""
    if text.strip().lower() in _NONE_WORDS["alpha"]:
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"alpha must be a number or iid, got {text!r}") from None


def parse_optional_path(text: str) -> Optional[str]:
    """A folder, or ``none`` (-> None), as the other keys whose default is none take it."""
    return None if text.strip().lower() in _NONE_WORDS["data_dir"] else text


def parse_bool(key: str):
    """A flag parser for a true/false key (true/false, yes/no, on/off, 1/0, any case)."""
    def parse(text: str) -> bool:
        t = text.strip().lower()
        if t in ("true", "yes", "on", "1"):
            return True
        if t in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key} must be true or false, got {text!r}")
    return parse


def parse_optional_int(key: str):
    """A flag parser for an integer key that may be ``none`` (-> None)."""
    def parse(text: str) -> Optional[int]:
        if text.strip().lower() in _NONE_WORDS[key]:
            return None
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} must be an integer or none, got {text!r}") from None
    return parse


def channels_last(c: Dict[str, Any], image_size: int) -> bool:
    """Whether a checked config's models run channels-last on images of ``image_size``
    (``memory_format``; auto: on the CPU, from :data:`CHANNELS_LAST_MIN_SIZE` up)."""
    mf = c["memory_format"]
    return mf == "channels_last" or (mf == "auto" and not c["device"].startswith("cuda")
                                     and image_size >= CHANNELS_LAST_MIN_SIZE)


def model_builder(c: Dict[str, Any], ds: data_mod.Dataset) -> Callable[..., Any]:
    """``build(quantized, bits=8, act_bits=None)`` for the config's model on ``ds``'s inputs
    (channels-last as :func:`channels_last` says)."""
    kw = dict(num_classes=ds.num_classes, in_channels=ds.in_channels, channels_last=channels_last(c, ds.image_size))
    if c["model"] == "small_cnn":
        kw["image_size"] = ds.image_size

    def build(quantized: bool, bits=8, act_bits: Optional[int] = None):
        if quantized:
            return qn.build(c["model"], quantized=True, bits=bits, act_bits=act_bits or c["act_bits"],
                            float_classifier=c["classifier"] == "float", **kw)
        return qn.build(c["model"], quantized=False, act_bits=act_bits, **kw)

    return build


def train_config(c: Dict[str, Any]) -> client_mod.TrainConfig:
    """The clients' :class:`fedmpq.client.TrainConfig` of a checked configuration."""
    return client_mod.TrainConfig(alg=c["alg"], lr=c["lr"], momentum=c["momentum"], weight_decay=c["weight_decay"],
                                  lam=c["lambda"], threshold=c["threshold"], local_epochs=c["local_epochs"],
                                  scale_lr=c["scale_lr"], batch_size=c["batch_size"], seed=c["seed"],
                                  device=c["device"], cuda_graph=c["cuda_graph"])
