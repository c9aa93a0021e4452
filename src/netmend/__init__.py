"""netmend: repair trained PyTorch networks without retraining — localise, edit, verify."""
__version__ = "0.1.0"

# Load the registered components first: importing the `netmend.repair` subpackage binds the name
# `repair` on this package, and the public function below must win over it.
from . import _builtin  # noqa: E402,F401
from .api import RepairResult, defect_for, evaluate, load_model, locate, repair  # noqa: E402,F401
from .defects.user import backdoor, fairness, wrong_predictions  # noqa: E402,F401
from .edit import Edit  # noqa: E402,F401
from .errors import NetmendError  # noqa: E402,F401
from .sites import Site, Sites  # noqa: E402,F401
