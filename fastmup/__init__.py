"""fastmup: μP (Maximal Update Parametrization) with fused multi-tensor optimizers.

``import fastmup as mup`` works for code written for ``mup`` 1.0: the same
modules (``shape``, ``infshape``, ``init``, ``layer``, ``optim``,
``coord_check``) and the same names at top level.
"""
from fastmup import _kernels_path  # noqa: F401  (makes fastmup.kernels importable from a source tree)
from fastmup.infshape import *  # noqa: F401,F403
from fastmup.shape import *  # noqa: F401,F403
from fastmup.depth import *  # noqa: F401,F403
from fastmup.init import *  # noqa: F401,F403
from fastmup.layer import *  # noqa: F401,F403
from fastmup.optim import *  # noqa: F401,F403
from fastmup import infshape, shape, init, layer, optim, coord_check  # noqa: F401
from fastmup import depth  # noqa: F401
from fastmup import arch, schedule, sharpness  # noqa: F401

name = "fastmup"
__version__ = "0.1.0"
