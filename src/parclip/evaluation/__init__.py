"""Evaluation: the metrics a cleaned or poisoned model is judged by.

    zero_shot.py  zero-shot classification on a labelled folder: clean top-1/top-5 and the attack success rate

A new task (retrieval, robustness) or metric is a module here that returns a JSON-ready dict the way `evaluate` does.
"""
from .zero_shot import attack_success_rate, evaluate, resolve_target, topk_correct, zero_shot_classifier

__all__ = ["evaluate", "attack_success_rate", "resolve_target", "topk_correct", "zero_shot_classifier"]
