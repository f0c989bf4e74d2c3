"""The protocol's settings: what every stage of the defence × attack benchmark (and the demo, its one-attack view)
trains and measures. The stages themselves are in :mod:`parclip.protocol.stages`; the method is described in
docs/defence_matrix.md.

Data: Fashion-MNIST as image–caption pairs (fashion templates), `parclip-rn-tiny` at 32 px, target class 'bag'.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from parclip.utils.checks import COUNT, NATURAL, POSITIVE

MODEL = "parclip-rn-tiny"  # a small ResNet CLIP at 32 px (tiny ViTs did not learn the patch triggers)
IMAGE_SIZE = 32
TARGET = "bag"
TEMPLATES = "fashion"

# ---- A: the clean foundation (4 epochs from scratch: 90.0 % clean top-1) ----
FOUNDATION = dict(objective="clip", model=MODEL, epochs=4, batch_size=256, lr=1e-3, lr_end=0.0,
                  warmup_fraction=0.05, schedule="cosine", wd=0.1)
# ---- B: planting by fine-tuning the foundation. Found by trials on badnet_rs (8 px), CLI runs, seed 0: 10 % of 20 000
# pairs, 3 epochs, cosine lr 3e-4 (5 % warm-up) -> ASR 93.6 %, clean top-1 89.5 % (foundation 90.0 %). Weaker recipes:
# 5 % / 3 ep / 3e-4 89.7 %, 10 % / 2 ep / 3e-4 91.0 %, 5 % / 3 ep / 5e-4 93.3 %, 2 % of 50 000 / 2 ep / 3e-4 88.6 %,
# 1 % of 50 000 / 1 ep / 1e-4 36.9 %. The high rate is the price of a tiny model and few steps at a fine-tuning lr. ----
PLANT = dict(n_pairs=20000, rate=0.10,
             train=dict(objective="clip", epochs=3, batch_size=256, lr=3e-4, lr_end=0.0, warmup_fraction=0.05,
                        schedule="cosine", wd=0.1),
             # One declared stronger recipe for the three attacks this one planted far below 90 % ASR, under 80 %
             # (clean top-1 / ASR under it: badnet 88.8 / 69.3, warped 89.3 / 20.9, water_patt 89.3 / 76.9); tried
             # once, not tuned. blended_rs (88.2 %) keeps the common recipe.
             by_attack={a: dict(epochs=5, lr=5e-4) for a in ("badnet", "warped", "water_patt")})
# Trigger parameters where they differ from the defaults scaled from 224 px: 8-px patches (a 2-px BadNet patch is
# not learned by a tiny CLIP at all, see docs/demo.md), and the same 8-px side for the optimised BadCLIP patch.
PATCH_SIDE = 8
TRIGGER_PARAMS = {"badnet_rs": {"patch_size": PATCH_SIDE}, "badnet": {"patch_size": PATCH_SIDE},
                  "badclip": {"patch_size": PATCH_SIDE}}  # badclip also gets patch=<the optimised PNG>
# PatchConfig overrides: a declared, small step count (the reference ran 7 800 steps at lr 1e-3 on a ViT-B/32)
BADCLIP_PATCH = dict(steps=300, batch_size=64, patch_size=PATCH_SIDE, lr=1e-2)
# ---- C: cleaning ----
CLEAN = dict(epochs=2, batch_size=256, schedule="cosine", warmup_fraction=0.05, warmup=None, lr_end=0.0, wd=1e-4,
             beta1=0.9, beta2=0.98, eps=1e-8, bn_mode="frozen", logit_scale="frozen")  # the same for every defence
DEFENCES: dict[str, dict | None] = {
    "none": None,                                          # the planted model, not cleaned
    "clip": dict(objective="clip", augment="none"),        # plain CLIP fine-tuning
    "clip_aug": dict(objective="clip", augment="par"),     # + PAR's one-sided noise and CutOut, no perturbation term
    "cleanclip": dict(objective="cleanclip"),              # CLIP loss + in-modal term (AutoAugment, EDA)
    "roclip": dict(objective="roclip", roclip_pool_size=8192),  # NN caption swap in epoch 2 (K = 2), cross-aug
    "par": dict(objective="par", augment="par", tau=2.0),  # Perturb and Recover
}
# How the demo's table and the docs name each defence.
LABELS = {"none": "poisoned", "clip": "fine-tuning", "clip_aug": "fine-tuning + PAR aug", "cleanclip": "CleanCLIP",
          "roclip": "RoCLIP", "par": "PAR"}
# Default: one fixed rate for every defence, 1e-4 (a third of the planting lr; the first regime check looked at
# badnet_rs on the test folder at 3e-5, 1e-4 and 3e-4 and kept it, so it is not blind to the test set);
# `--curves lr` shows every defence at 3e-5, 1e-4 and 3e-4, `--lr-grid` chooses per cell on the validation split.
BASE_LR = 1e-4
LR_SCALE: dict[str, float] = {}  # per-defence factor on the cleaning lr (1 when absent)
# ---- D: trade-off curves, one knob varied on the first attack (or --curve-attacks), everything else as in C. The
# matrix's own settings are one point of each curve (that cleaning run is shared, not trained twice). ----
CURVES: dict[str, dict] = {
    "tau": dict(knob="tau", defences=["par"], values=[0.5, 1.0, 2.0, 3.0, 4.0]),  # τ = 0 is clip_aug (w·0)
    "lr": dict(knob="lr", defences=["clip", "clip_aug", "cleanclip", "roclip", "par"], values=[3e-5, 1e-4, 3e-4]),
}
VAL_IMAGES = 2000
MAX_VAL_DROP = 2.0
# ---- The defender's protocol (docs/par_recovery.md): every setting chosen without the trigger. The defender keeps
# the last DEFENDER["val_pairs"] of its clean pairs for validation (images no model has seen: the train-side split
# above was part of the foundation's pre-training, which flatters the planted model by 2-3 points), cleans on the
# rest with a 4-epoch budget and picks each cell's rate from the grid by the rule SELECTION_RULES["defender"]. ----
DEFENDER = dict(lr_grid=[1e-4, 3e-4, 1e-3], epochs=4, val_pairs=2000)
# How a grid picks a cell's rate on the validation split (docs/defence_matrix.md and docs/par_recovery.md § 2):
SELECTION_RULES = {
    # knows the trigger: each defence's best case
    "trigger": f"val: the lowest ASR among the rates with clean top-1 >= min(planted, best of grid) - {MAX_VAL_DROP:g}",
    # knows no trigger: push as hard as the clean-accuracy budget allows
    "defender": f"val: the highest rate with clean top-1 >= planted - {MAX_VAL_DROP:g} (none: the rate with the best "
                "clean top-1)",
}
# ---- Synthetic clean pairs (docs/synthetic.md): a generator of the measured family (docs/synth_quality.md) trained on
# the foundation's pre-training pairs only (train.csv: no defender pair, no triggered image), then `synthetic` pairs
# of the class names × the fashion templates. Cleaning on them uses the same budget, grid and rule; the defender's
# labelled validation stays real (it chooses the rate). ----
SYNTH = dict(family="pca-gauss", n=10000, chunk_size=2000)
EVAL = dict(templates=TEMPLATES, target=TARGET, batch_size=500, trigger_after_crop=False)
# Fields that do not change what is computed: left out of the specs that decide whether a stage is reused.
NOT_IN_SPEC = {"output_dir", "name", "workers", "memory_gib", "progress", "log_every", "save_every", "resume",
               "device"}


@dataclass
class Settings:
    """Everything a stage needs; picklable, so the same object goes to worker processes.

    `out` holds the cleaning runs and the cells, `cache` the stages every matrix shares (data, foundation, planted
    models). `lr_grid` empty: every defence cleans at `lr` × LR_SCALE; else the rate is chosen per cell on the
    validation split by the rule SELECTION_RULES[`select`] ("trigger": the defence's best case; "defender": a rule
    that needs no trigger). `defences` and `trigger_params` start as DEFENCES and TRIGGER_PARAMS (the demo's `--tau` and
    `--trigger-param` change them; a changed value changes the stage's spec, so the stage is recomputed)."""
    out: str
    cache: str
    seed: int = 0
    smoke: bool = False
    lr: float = BASE_LR
    lr_grid: list[float] = field(default_factory=list)
    select: str = "trigger"
    workers: int = 1
    progress: bool = False
    target: str = TARGET
    data: dict = field(default_factory=lambda: dict(holdout=10000, n_train=None, n_test=None))
    foundation: dict = field(default_factory=lambda: dict(FOUNDATION))
    plant: dict = field(default_factory=lambda: copy.deepcopy(PLANT))
    clean: dict = field(default_factory=lambda: dict(CLEAN))
    defences: dict = field(default_factory=lambda: copy.deepcopy(DEFENCES))
    trigger_params: dict = field(default_factory=lambda: copy.deepcopy(TRIGGER_PARAMS))
    patch: dict = field(default_factory=lambda: dict(BADCLIP_PATCH))
    curves: dict = field(default_factory=lambda: copy.deepcopy(CURVES))
    val_images: int = VAL_IMAGES
    defender_val: int = DEFENDER["val_pairs"]
    badclip_side: int = PATCH_SIDE
    synthetic: int = 0  # > 0: clean on this many synthetic pairs (SYNTH) instead of the real clean pairs

    def __post_init__(self):
        NATURAL.check("protocol: seed", self.seed)
        NATURAL.check("protocol: synthetic", self.synthetic)
        NATURAL.check("protocol: workers", self.workers)
        COUNT.check("protocol: val_images", self.val_images)
        COUNT.check("protocol: defender_val", self.defender_val)
        for lr in [self.lr, *self.lr_grid]:
            POSITIVE.check("protocol: lr", lr)
        if self.select not in SELECTION_RULES:
            raise ValueError(f"protocol: select {self.select!r}; choose one of {', '.join(SELECTION_RULES)}")
        if not (isinstance(self.badclip_side, int) and 1 <= self.badclip_side < IMAGE_SIZE):
            raise ValueError(f"--badclip-side {self.badclip_side}: a patch side in pixels, 1 to {IMAGE_SIZE - 1} "
                             f"(protocol: badclip_side)")
        # the optimised patch and the trigger that pastes it have one side
        self.patch["patch_size"] = self.badclip_side
        self.trigger_params["badclip"] = dict(self.trigger_params.get("badclip", {}), patch_size=self.badclip_side)
        if self.smoke:  # a few hundred images, one epoch per stage, small batches: tests the plumbing, says nothing
            self.data = dict(holdout=256, n_train=1024, n_test=300)
            self.foundation.update(epochs=1, batch_size=64)
            self.plant.update(n_pairs=512)
            self.plant["train"].update(epochs=1, batch_size=64)
            self.clean.update(epochs=1, batch_size=64)
            self.patch.update(steps=5, batch_size=32)
            self.val_images = 200
            self.defender_val = 64
            self.synthetic = min(self.synthetic, 512)
            for c in self.curves.values():  # two points each, one of them the matrix's own setting (a shared run)
                c["values"] = [v for v in c["values"] if v in (1.0, 2.0, 1e-4, 3e-4)]
        unknown = set(self.defences) - set(DEFENCES)
        if unknown:
            raise ValueError(f"protocol: unknown defence(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(DEFENCES)}")

    @classmethod
    def defender(cls, **values) -> "Settings":
        """The defender's protocol (DEFENDER): its grid, its rule, its budget; `values` as for Settings."""
        s = cls(**{"lr_grid": list(DEFENDER["lr_grid"]), "select": "defender", **values})
        if not s.smoke:  # the smoke size keeps its one epoch
            s.clean["epochs"] = DEFENDER["epochs"]
        return s

    def eval_spec(self) -> dict:
        """How models are measured: EVAL with this run's target (part of every measuring stage's spec)."""
        return dict(EVAL, target=self.target)
