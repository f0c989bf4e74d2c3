"""Synthetic image–caption pairs: generators behind one interface (:mod:`parclip.synth.base`).

Importing the package registers the small class-conditional families trained on a caption table (``pca-gauss``,
``cvae``; :mod:`parclip.synth.fit` trains them), so ``load_generator("cvae:FOLDER")`` works."""
from .base import CONDITIONINGS, Generator, Prompt, generator_class, list_generators, load_generator, register_generator
from .cvae import CVAEGenerator
from .fit import DEFAULT_FAMILY, FAMILIES, train_generator
from .pca_gauss import PCAGaussGenerator
from .stored import GeneratorFileError

__all__ = ["CONDITIONINGS", "Generator", "Prompt", "generator_class", "list_generators", "load_generator",
           "register_generator", "CVAEGenerator", "PCAGaussGenerator", "GeneratorFileError", "DEFAULT_FAMILY",
           "FAMILIES", "train_generator"]
