"""Evaluation: the metrics a cleaned or poisoned model is judged by.

    encode.py             encoding evaluation images with bad files counted and left out (shared)
    zero_shot.py          zero-shot classification on a labelled folder: clean top-1/top-5 and the attack success rate
    retrieval_metrics.py  image↔text R@k and the retrieval ASR as pure functions of embeddings
    retrieval.py          retrieval evaluation of a model on a Karpathy JSON or a caption table
    report.py             many results in one table and chart
    clip_benchmark.py     clip_benchmark's records, output names, model lists and prompt files
    embeddings.py         t-SNE maps of clean and triggered embeddings; the clean-vs-ASR trade-off plot

A new task (retrieval, robustness) or metric is a module here that returns a JSON-ready dict the way `evaluate` does.
"""
from .retrieval import evaluate_retrieval
from .zero_shot import attack_success_rate, evaluate, resolve_target, topk_correct, zero_shot_classifier

__all__ = ["evaluate", "evaluate_retrieval", "attack_success_rate", "resolve_target", "topk_correct",
           "zero_shot_classifier"]
