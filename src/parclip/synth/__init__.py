"""Synthetic image–caption pairs: generators behind one interface (:mod:`parclip.synth.base`)."""
from .base import CONDITIONINGS, Generator, Prompt, generator_class, list_generators, load_generator, register_generator

__all__ = ["CONDITIONINGS", "Generator", "Prompt", "generator_class", "list_generators", "load_generator",
           "register_generator"]
