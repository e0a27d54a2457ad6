"""Runs the tests/mpi modules on real MPI ranks, each run bounded and killed as a process group."""

import glob

import pytest
from helpers import ROOT, run_mpi_pytest

MODULES = sorted(glob.glob(str(ROOT / "tests" / "mpi" / "test_*.py")))


@pytest.mark.parametrize("module", [m.rsplit("/", 1)[-1] for m in MODULES])
def test_mpi_module_on_two_ranks(module):
    run_mpi_pytest(2, f"tests/mpi/{module}", timeout=300)
