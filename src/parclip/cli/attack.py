"""`parclip attack ACTION`: build attacks; optimize-patch (BadCLIP, parclip.attacks.patch_opt)."""
from __future__ import annotations

import dataclasses

from parclip.attacks.patch_config import PatchConfig
from parclip.cli.common import MODEL_ARGS, _load_model
from parclip.utils.flags import Command, Fields


def _attack_optimize_patch(args) -> int:
    from parclip.attacks.patch_opt import optimize_patch
    from parclip.models import get_tokenizer
    from parclip.utils.flags import dataclass_from_args

    cfg = dataclass_from_args(PatchConfig, args)  # checked here: a bad flag fails before the model is loaded
    args.device = cfg.device  # what _load_model reads (the generated flags default to None)
    model, preprocess, device = _load_model(args)
    result = optimize_patch(model, preprocess, get_tokenizer(args.model), dataclasses.replace(cfg, device=device),
                            model_name=args.model, checkpoint=args.pretrained)
    info = result.info
    print(f"patch {info['patch_size']}x{info['patch_size']} for {info['target']!r} -> {result.path} "
          f"(sidecar {result.json_path}); final loss {info['final_loss']:.4f} (mean of the last "
          f"{info['final_loss_window']} steps {info['final_loss_mean']:.4f}); {info['n_clean_rows']} images used, "
          f"{info['n_excluded_target_rows']} target rows excluded")
    print(f"use it as the trigger badclip: get_trigger('badclip', image_size={info['image_size']}, "
          f"patch='{result.path}', patch_size={info['patch_size']})")
    return 0


ATTACK = Command("attack", "build attacks: optimize-patch (BadCLIP)", actions=(
    Command("optimize-patch", "optimise a BadCLIP patch against a frozen model and a target class",
            run=_attack_optimize_patch,
            description="Optimise a patch pasted at the image centre so that the (frozen, eval-mode) model embeds "
            "patched images near the target: InfoNCE to target captions + weighted triplet (pull towards target "
            "images, or the target's text embedding without --target-images; push from the same clean image). "
            "Trains on the rows of --data whose captions do NOT mention the target. Writes a lossless PNG and a JSON "
            "sidecar (same name, .json). Use the result with the trigger badclip (patch=PATH). Defaults follow the "
            "BadCLIP reference run; the objective and its differences from the reference: docs/badclip_patch.md.",
            args=(MODEL_ARGS, Fields(PatchConfig, required=("out",)))),
))
