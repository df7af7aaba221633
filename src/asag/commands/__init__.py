"""Sub-commands of the ``asag`` tool.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``func`` to a function
``run(args) -> int``. Errors meant for the user are raised as :class:`asag.errors.AsagError`.
"""

from asag.commands import benchmark, config, convert, data, demo, export, plot, predict, train, visualize
from asag.commands import eval as eval_

COMMANDS: list = [demo, train, eval_, plot, predict, export, convert, config, data, visualize, benchmark]
