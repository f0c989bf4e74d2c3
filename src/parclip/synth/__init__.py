"""Synthetic image–caption pairs: generators behind one interface (:mod:`parclip.synth.base`), the small
class-conditional families trained on a caption table (:mod:`parclip.synth.fit`), and the loop that writes their pairs
as a caption table or shards (:mod:`parclip.synth.synthesize`).

Importing the package registers every generator kind: ``pca-gauss`` and ``cvae`` (``load_generator("cvae:FOLDER")``)
and ``diffusers`` (:mod:`parclip.synth.diffusers_gen`; diffusers itself is imported only when one is loaded:
``pip install parclip[synth]``)."""
from .base import (CONDITIONINGS, Generator, GeneratorError, Prompt, generator_class, list_generators, load_generator,
                   register_generator)
from .cvae import CVAEGenerator
from .diffusers_gen import DiffusersGenerator
from .fit import DEFAULT_FAMILY, FAMILIES, train_generator
from .pca_gauss import PCAGaussGenerator
from .stored import GeneratorFileError

__all__ = ["CONDITIONINGS", "Generator", "GeneratorError", "Prompt", "generator_class", "list_generators",
           "load_generator", "register_generator", "CVAEGenerator", "DiffusersGenerator", "PCAGaussGenerator",
           "GeneratorFileError", "DEFAULT_FAMILY", "FAMILIES", "train_generator"]
