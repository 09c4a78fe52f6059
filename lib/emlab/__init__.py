__version__ = "0.1.0"

from emlab.logs import choose_wait_policy as _choose_wait_policy  # noqa: E402
from emlab.logs import headless as _headless  # noqa: E402

_choose_wait_policy()  # before torch is imported: a busy machine gets passive OpenMP threads

if _headless():  # a papermill kernel of `emlab.notebooks run`: log lines and text progress bars in the make log
    from emlab.logs import setup_logging as _setup

    _setup()
