"""`python -m parclip.cli ...` (e.g. under torchrun), the same as `parclip ...`."""
from parclip.cli import main

raise SystemExit(main())
