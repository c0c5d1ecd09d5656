"""``python -m kunlunbaize.cli …`` (e.g. under torchrun): the ``kunlun`` command."""

from kunlunbaize.cli import main

main()
