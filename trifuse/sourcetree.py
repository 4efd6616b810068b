"""Running from a source checkout, where trifuse's subpackages sit at the repository root.

The repository keeps ``kernels/``, ``engine/``, ``export/`` and ``bench/`` at its root and
the build maps them into ``trifuse.*``. With the root on ``sys.path`` (``python -m pytest``
or ``python -c`` in a clone) those folders would also be importable under their bare names,
and a tool that probes for another package of that name (transformers imports
``kernels`` to look for Hugging Face's kernel hub) would import ours a second time,
registering the ``trifuse::`` ops twice. Each folder's ``__init__`` therefore hands a
bare-name import to :func:`stand_aside`, which loads the package of that name found
elsewhere on ``sys.path`` (Hugging Face's ``kernels``, say) or, if there is none, leaves an
empty module with no version and no attributes, which such probes read as absent.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types


class _Absent(types.ModuleType):
    def __getattr__(self, attr):
        raise AttributeError(f"{self.__name__!r} here is trifuse's source folder, not a package of that name; "
                             f"use 'trifuse.{self.__name__}' (no other {self.__name__!r} is installed)")


def stand_aside(name: str, init_file: str) -> None:
    """Replace ``sys.modules[name]`` (our folder imported by its bare name) with the real one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return
    sys.modules[name] = _Absent(name)
