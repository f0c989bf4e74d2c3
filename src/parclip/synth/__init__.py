"""Synthetic image–caption pairs: generators behind one interface (:mod:`parclip.synth.base`), and the loop that
writes their pairs as a caption table or shards (:mod:`parclip.synth.synthesize`).

Importing the package registers the ``diffusers`` generator (:mod:`parclip.synth.diffusers_gen`; diffusers itself is
imported only when one is loaded: ``pip install parclip[synth]``)."""
from .base import (CONDITIONINGS, Generator, GeneratorError, Prompt, generator_class, list_generators, load_generator,
                   register_generator)
from .diffusers_gen import DiffusersGenerator

__all__ = ["CONDITIONINGS", "Generator", "GeneratorError", "Prompt", "generator_class", "list_generators",
           "load_generator", "register_generator", "DiffusersGenerator"]
