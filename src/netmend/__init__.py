"""netmend: repair trained PyTorch networks without retraining — localise, edit, verify."""
__version__ = "0.1.0"

import os as _os
import signal as _signal
import sys as _sys


def _stopped_while_loading(signum, _frame):
    """Ctrl-C or SIGTERM while the libraries load (seconds on a busy machine): nothing is written yet, so one line
    and the exit code, not a traceback from inside torch's import (cli.main puts the usual handlers back)."""
    _sys.stderr.write("netmend: interrupted\n" if signum == _signal.SIGINT else "netmend: terminated\n")
    _os._exit(130 if signum == _signal.SIGINT else 143)


if _os.path.basename((getattr(_sys, "argv", None) or [""])[0]) == "netmend":    # the command-line program
    for _sig in (_signal.SIGINT, _signal.SIGTERM):
        if _signal.getsignal(_sig) not in (_signal.SIG_IGN, None):
            _signal.signal(_sig, _stopped_while_loading)

# Load the registered components first: importing the `netmend.repair` subpackage binds the name
# `repair` on this package, and the public function below must win over it.
from . import _builtin  # noqa: E402,F401
from .api import RepairResult, defect_for, evaluate, load_model, locate, repair  # noqa: E402,F401
from .defects.user import backdoor, fairness, wrong_predictions  # noqa: E402,F401
from .edit import Edit  # noqa: E402,F401
from .errors import NetmendError  # noqa: E402,F401
from .sites import Site, Sites  # noqa: E402,F401
