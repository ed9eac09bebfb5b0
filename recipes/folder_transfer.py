"""Transfer learning on your own ImageFolder: a new head on a frozen pretrained backbone, then the top
stages unfrozen with a lower backbone LR and early stopping.

    accelerate launch recipes/folder_transfer.py --data ~/leaf_disease
    accelerate launch recipes/folder_transfer.py --data ~/cats_vs_dogs --set model.arch=convnext_tiny

Pretrained weights are loaded offline: from `model.pretrained_file` (a .safetensors/.pth file) or
from the Hugging Face cache that timm fills when it downloads them on a connected machine.
Compare with recipes/folder_scratch.py on the same folder.
"""

from trainer import Data, Logging, Model, Phase, Recipe, run

RECIPE = Recipe(
    name="folder_transfer",
    model=Model(arch="resnet50", pretrained_file=""),
    data=Data(path="", val_fraction=0.2),  # --data; one folder is split 80/20 (stratified, seeded)
    seed=0,
    phases=(
        Phase(
            name="head",
            init="pretrained",  # ImageNet weights for model.arch; the classifier is new
            head="mlp:512",  # 2048 → 512 → classes, ReLU and dropout between
            head_dropout=0.2,
            freeze="backbone",  # only the head trains: fast, and safe for small folders
            freeze_bn_stats=True,  # keep ImageNet BatchNorm statistics while the backbone is frozen
            epochs=5,
            batch_size_per_device=64,
            optimizer="adamw",
            lr_per_256=2e-3,
            weight_decay=0.01,
            warmup_epochs=1,
            label_smoothing=0.1,
            res_px=224,
            crop_scale=(0.35, 1.0),  # milder crops than ImageNet's 0.08: objects fill these photos
            keep_best_k=1,
        ),
        Phase(
            name="finetune",
            init="phase:head",  # best of the head phase (EMA if better); the MLP head is kept
            freeze="stages:2",  # stem + first 2 stages frozen: the top 2 stages and the head train ...
            unfreeze_at=(4,),  # ... and from epoch 4 one more stage
            backbone_lr_mult=0.1,  # differential LR: the backbone learns 10x slower than the head
            freeze_bn_stats=True,
            epochs=15,
            batch_size_per_device=64,
            optimizer="adamw",
            lr_per_256=5e-4,
            weight_decay=0.02,
            warmup_epochs=1,
            label_smoothing=0.1,
            ema_decay=0.999,
            res_px=224,
            crop_scale=(0.35, 1.0),
            color_jitter=0.2,
            early_stop_patience=4,  # stop when best val top-1 (model or EMA) stalls 4 epochs
            early_stop_metric="best_top1",
            keep_best_k=1,
        ),
    ),
    logging=Logging(project="folder-transfer"),
)

if __name__ == "__main__":
    run(RECIPE)
