"""``python -m kunlunbaize.lm_eval ARGS``: lm-evaluation-harness's own command line, with KunlunBaize registered.

The plain ``lm_eval`` command never imports :mod:`kunlunbaize`, so transformers does not know
``model_type = "kunlunbaize"`` there and an exported folder cannot be loaded. This runs lm-eval's CLI entry
point (same arguments, same output) after registering the model; on a machine without CUDA it adds
``--device cpu`` unless a device is given (lm-eval defaults to ``cuda``).
"""

from __future__ import annotations

import sys

PROG = "python -m kunlunbaize.lm_eval"


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line on ``argv`` (default: this process's arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"{PROG}: lm-evaluation-harness is not installed ({e}); "
                         "install it with pip install -e '.[eval]' (or pip install lm-eval)") from None
    try:
        from . import hf  # registers with transformers' Auto classes
    except ImportError as e:
        raise SystemExit(f"{PROG}: {e}") from None
    del hf
    import torch

    if not torch.cuda.is_available() and not any(a == "--device" or a.startswith("--device=") for a in args) \
            and not any(a in ("-h", "--help", "ls", "validate") for a in args):
        args += ["--device", "cpu"]
    sys.argv = [PROG, *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
