"""`parclip train`: its flags are TrainConfig's (parclip.config), the loop is parclip.train."""
from __future__ import annotations

from parclip.config import CONFIG_ARGS
from parclip.utils.flags import Command


def _cmd_train(args) -> int:
    from parclip.config import config_from_args
    from parclip.train import train

    run = train(config_from_args(args))
    print(f"model: local-dir:{run / 'model'}")
    return 0


TRAIN = Command(
    "train", "fine-tune a CLIP: --objective par|cleanclip|roclip (clean) or clip (plain / plant)", run=_cmd_train,
    args=CONFIG_ARGS,
    description="One training loop for every defence (PAR, CleanCLIP, RoCLIP) and plain CLIP training.\n\n"
    "Options come from defaults < the defence's recipe < --preset < --config YAML < flags (YAML\n"
    "keys are the flag names). The defaults are PAR's reference settings; --objective cleanclip,\n"
    "roclip and clip bring their own recipes (`parclip defences list` prints them).\n"
    "Multi-GPU / multi-node: launch with torchrun or srun. Re-running with the same --name resumes.\n\n"
    "A flag that open_clip_train also has means what it means there (--lr the peak rate, --warmup\n"
    "whole steps, tables tab-separated with columns filepath and title, --val-data image-caption\n"
    "pairs); open_clip_train's flags that parclip does not support are refused with the reason\n"
    "(docs/compatibility.md: Coming from open_clip_train).",
    epilog="""examples:
  # PAR on one GPU or CPU
  parclip train --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv --name par1
  # the same on 8 GPUs (global batch 8 x 512), then resume it after a crash with the same command
  torchrun --nproc_per_node 8 -m parclip train --config par.yaml --name par8
  # the baselines: CleanCLIP with its recipe, RoCLIP
  parclip train --objective cleanclip --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv
  parclip train --objective roclip --roclip-every 2 --model ViT-B-32-quickgelu --pretrained poisoned.pt --train-data cc3m.csv
  # plain CLIP fine-tuning baseline / plant a backdoor on a poisoned table
  parclip train --objective clip --model RN50-quickgelu --pretrained clean.pt --train-data poisoned/poisoned.csv
""")
