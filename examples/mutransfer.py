"""μTransfer demo: the best learning rate stays put across widths under μP.

The same as ``python -m fastmup.demo mutransfer``; all the code lives in
:mod:`fastmup.demo.mutransfer` (models in :mod:`fastmup.demo.models`, data in
:mod:`fastmup.demo.tasks`).  Needs scikit-learn, matplotlib, pandas and tqdm.

    python examples/mutransfer.py                  # full run, a few minutes on 2 CPU cores
    python examples/mutransfer.py --quick          # smoke run
    python examples/mutransfer.py --models mlp --widths 64,256,1024 --steps 200 --seeds 2
"""
import os
import sys

try:
    import fastmup  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastmup.demo.mutransfer import main

if __name__ == "__main__":  # required: the sweep runs in spawned worker processes
    main(prog="python examples/mutransfer.py")
