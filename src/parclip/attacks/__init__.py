"""Attacks: everything that plants or builds a backdoor.

    triggers/     one small module per trigger (BadNet, Blended, WaNet, SIG, BadCLIP, ...), one interface (`Trigger`),
                  found by name: `get_trigger`, `build_triggers`, `list_triggers`
    poison.py     plant a trigger into a seeded share of an image–caption table (images + table + manifest)
    patch_opt.py  optimise a BadCLIP patch against a model and a target class (`PatchConfig`, `optimize_patch`)
    gallery.py    the catalogue: `parclip triggers list` and the PNG gallery of every trigger

A new trigger is a module in `triggers/` with a `@register`ed `Trigger` subclass, imported in `triggers/__init__.py`.
"""
