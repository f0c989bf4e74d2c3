"""parclip: plant, remove and measure backdoors in CLIP models.

The heart is Perturb and Recover (PAR, Singh, Croce and Hein, arXiv 2412.00727): fine-tune a possibly poisoned CLIP with
the CLIP loss minus a thresholded term that pushes its embeddings away from a frozen copy of the poisoned model.

The package tells the story attack -> defend -> evaluate (docs/architecture.md):

    attacks/     triggers, poisoning, BadCLIP patch optimisation, the trigger gallery
    defences/    training-time augmentation and learning-rate schedules of the cleaning methods
    objectives   the losses (CLIP, PAR, BadCLIP's triplet term) as pure functions
    evaluation/  zero-shot accuracy, attack success rate, retrieval
    data/        caption tables, labelled folders, prompt templates, the Fashion-MNIST export
    models/      building models offline, safe checkpoint reading, export
    utils/       atomic file writing, argument checks, multi-process plumbing
    train, config, runs   the training loop, its configuration and run directories
    protocol/    the defence × attack benchmark's stages (the demo is one attack of it)
    demo, cli    the demo and the command line on top

The common entry points are importable from the top level: ``from parclip import create_model, par_loss, get_trigger``.
"""

__version__ = "0.1.0"

# name -> module, resolved on first use so that `import parclip` stays cheap (no torch). `train` is not here because
# it is also a module name (`parclip.train`).
_PUBLIC = {
    "create_model": "parclip.models", "get_tokenizer": "parclip.models", "load_state_dict": "parclip.models",
    "save_model": "parclip.models", "eval_transform": "parclip.models",
    "clip_loss": "parclip.objectives", "par_loss": "parclip.objectives",
    "get_trigger": "parclip.attacks.triggers", "build_triggers": "parclip.attacks.triggers",
    "list_triggers": "parclip.attacks.triggers", "trigger_generator": "parclip.attacks.triggers",
    "poison_csv": "parclip.attacks.poison", "evaluate": "parclip.evaluation",
    "TrainConfig": "parclip.config", "make_config": "parclip.config",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'parclip' has no attribute {name!r}")
