"""distft: fine-tune LLaMA-family models from one process to multi-node clusters.

`import distft` stays fast: heavy modules (torch, transformers, deepspeed) are imported by the
submodules that need them.

Layout: the repository keeps `conf/` (Hydra configs) and `launchers/` at its top level; a wheel
or `pip install .` ships them inside the package as `distft/conf` and `distft/launchers`
(pyproject.toml, `package-dir`). In a source checkout `distft.launchers` is the top-level folder,
bound below, and `distft.config.conf_dir()` finds `conf/` the same way.

Commands: `distft <command>` (distft/commands/). The package's search path includes that folder,
so the documented `python -m distft.<command>` forms (chat, compare, evaluate, export, ...) run
the same command modules without a file per command at this level; a name this folder has
(`distft.data`, `distft.plan`: packages with a `__main__`) is found here first.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _bind_checkout_launchers() -> None:
    here = _os.path.dirname(_os.path.abspath(__file__))
    top = _os.path.join(_os.path.dirname(here), "launchers")
    if "distft.launchers" in _sys.modules or _os.path.isdir(_os.path.join(here, "launchers")):
        return  # installed: the package's own copy
    if not _os.path.isfile(_os.path.join(top, "__init__.py")):
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("distft.launchers", _os.path.join(top, "__init__.py"),
                                                  submodule_search_locations=[top])
    module = importlib.util.module_from_spec(spec)
    _sys.modules["distft.launchers"] = module
    spec.loader.exec_module(module)


_bind_checkout_launchers()
__path__.append(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "commands"))
