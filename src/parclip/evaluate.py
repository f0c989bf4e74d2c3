"""Import path of parclip 0.1 for zero-shot evaluation, kept working: the code lives in :mod:`parclip.evaluation`."""
from parclip.evaluation import *  # noqa: F401,F403
from parclip.evaluation import __all__  # noqa: F401
