"""Make ``fastmup.kernels`` importable when running from a source checkout.

An installed fastmup has the top-level ``kernels/`` directory packaged as
``fastmup.kernels`` (``package_dir`` in setup.py).  In a plain checkout used
through ``PYTHONPATH=.`` there is no such subpackage on disk, so register the
directory under that name instead of installing a top-level ``kernels`` module.
"""
import importlib.util
import os
import sys

_NAME = "fastmup.kernels"


def _register_source_kernels() -> None:
    if _NAME in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # an installed package: the regular import system finds it
    source = os.path.join(os.path.dirname(here), "kernels", "__init__.py")
    if not os.path.exists(source):
        return
    spec = importlib.util.spec_from_file_location(
        _NAME, source, submodule_search_locations=[os.path.dirname(source)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module
    spec.loader.exec_module(module)


_register_source_kernels()
