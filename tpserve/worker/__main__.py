"""``mpirun -n TP python -m mpi4py -m tpserve.worker ...``: one tensor-parallel rank."""

import sys

from tpserve.worker.main import main

sys.exit(main())
