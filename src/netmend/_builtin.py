"""Imports every module that registers a component. Add one line per new module."""
from .zoo import models  # noqa: F401
from .zoo import acasxu  # noqa: F401
from .data import datasets, triggers  # noqa: F401
from .data import wanet  # noqa: F401
from .defects import backdoor  # noqa: F401
from .defects import adversarial, wrong_predictions  # noqa: F401
from .defects import spurious, leakage  # noqa: F401  (leakage registers the blockmnist dataset via data.blockmnist)
from .defects import safety  # noqa: F401
from .defects import fairness  # noqa: F401
from .locate import simple  # noqa: F401
from .locate import probe  # noqa: F401
from .repair import finetune, prune  # noqa: F401
from .repair import clarc  # noqa: F401
from .repair import masked_tune  # noqa: F401
from .repair import pso  # noqa: F401  (CARE; imports locate.causal, which registers the causal localiser)
from .repair import rank_one, rectify  # noqa: F401  (rectify imports locate.attribution)
from .repair import property_tune  # noqa: F401
from . import methods  # noqa: F401
