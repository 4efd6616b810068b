"""``trifuse run``: moved to :mod:`engine.pipelines.run`; this name stays for ``trifuse/cli.py``'s import."""

from .pipelines.run import __doc__, add_arguments, run  # noqa: F401
