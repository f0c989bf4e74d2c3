"""Import path of parclip 0.1 for the triggers, kept working: the code lives in :mod:`parclip.attacks.triggers`."""
from parclip.attacks.triggers import *  # noqa: F401,F403
from parclip.attacks.triggers import __all__  # noqa: F401
