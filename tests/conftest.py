"""Test-wide setup. Without a GPU, Triton kernels run in its interpreter: the variable
must be set before anything imports triton."""
import hashlib
import os
import signal
import tempfile
from pathlib import Path

# torch.compile's caches know an op by its name, not by its schema or autograd rule
# (pytorch/pytorch#144344): after a change to fedmpq's ops, a warm cache replays graphs of
# the old ops. The tests' compile cache is keyed on the files that define them.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _kernels = Path(__file__).resolve().parents[1] / "fedmpq_kernels"
    _key = hashlib.sha256()
    for _f in sorted(_kernels.glob("*/ops.py")) + [_kernels / "_library.py"]:
        _key.update(_f.read_bytes())
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"fedmpq-tests-inductor-{_key.hexdigest()[:16]}")

# The fedmpq command keeps freed memory in the heap (fedmpq.heap), process-wide: in-process CLI
# tests would switch this process's allocator at whichever test ran first, and pass it on to
# every process started after. glibc's own here; tests/fedmpq/test_heap.py tests the setting.
os.environ.setdefault("FEDMPQ_MALLOC", "system")

# Started in the background of a script (`pytest &`, CI's sanitizer run) or under nohup, this
# process has SIGINT ignored, and every process it starts inherits that: the Ctrl-C tests'
# children would never see their signal (a fedmpq run then went on to its last round). Their
# parent gets the handler a terminal's pytest has; a child starts with the default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _reduction_tickets_back_at_zero():
    """After each test, every kept reduction workspace's ticket is zero again
    (tests/tickets.py): the test that leaves one fails at teardown, naming the workspace."""
    yield
    from tests.tickets import tickets_left

    left = tickets_left()
    if left:
        pytest.fail("a kernel left its reduction ticket set (the next launch on that stream would read "
                    "unwritten slots): " + "; ".join(left), pytrace=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "early(*keys): the test takes the outcome of these tests/early.py jobs, "
                                       "started beside the suite once collection ends")


def pytest_collection_finish(session):
    """The early jobs of the tests collected start now, in the tests' order (tests/early.py)."""
    if session.config.option.collectonly:
        return
    from tests import early

    try:  # the tests that skip or xfail(run=False) by their marks take no job
        from _pytest.skipping import evaluate_skip_marks
    except ImportError:  # pytest's own module moved: start every marked test's jobs
        evaluate_skip_marks = lambda item: None  # noqa: E731
    early.start(k for item in session.items if item.get_closest_marker("early") and not evaluate_skip_marks(item)
                for mark in item.iter_markers("early") for k in mark.args)


def pytest_sessionfinish(session):
    from tests import early

    early.stop()
