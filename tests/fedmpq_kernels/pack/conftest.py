"""The packing family's backend cases, with cpu-gfni (its kernels have a GFNI level); and
every pack test starts with clean range-check words: a GPU pack_codes call ORs all its
codes (valid ones too) into its device's word for the bit-width until a check reads it, so a
test that names the OR of its own codes must not see an earlier test's (the first H200 run
saw 0xf where a test's codes OR to 0x8)."""
import pytest

from fedmpq_kernels.pack import _common
from tests.fedmpq_kernels.conftest import _cases, enter_case


@pytest.fixture(params=_cases(gfni=True))
def backend(request):
    """The shared ``backend`` fixture's cases and cpu-gfni."""
    yield from enter_case(request.param)


@pytest.fixture(autouse=True)
def _clean_status_words():
    for words in _common._STATUS.values():
        words.zero_()
    yield
