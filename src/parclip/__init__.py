"""parclip: plant, remove and measure backdoors in CLIP models.

The heart is Perturb and Recover (PAR, Singh, Croce and Hein, arXiv 2412.00727): fine-tune a possibly poisoned CLIP with
the CLIP loss minus a thresholded term that pushes its embeddings away from a frozen copy of the poisoned model.

Modules, in dependency order (arrows point to what a module may import):
    cli -> {train, evaluate, poison, demo} -> {objectives, augment, schedule, distributed, data, triggers, models}
"""

__version__ = "0.1.0"
