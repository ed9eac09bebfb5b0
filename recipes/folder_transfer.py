"""Transfer learning on your own ImageFolder: a new head on a frozen pretrained backbone, then the top
stages unfrozen with a lower backbone LR and early stopping. Made for 100 to 100,000 photos: the
schedule and the EMA follow the phase's number of updates (`ema_horizon`), and early stopping waits
until the schedule is three quarters done (`early_stop_after`). bench/transfer.py measures it against a
plain 20-epoch fine-tune from the same EfficientNet-Lite0 weights (digits at 64 px): +46.0 points of
val top-1 on 145 images in 0.63x the wall time, +8.1 points on 1,438 in 0.48x (docs/benchmarks.md).

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
            head="mlp:512",  # features → 512 → classes, ReLU and dropout between
            head_dropout=0.2,
            freeze="backbone",  # only the head trains: fast, and safe for small folders
            freeze_bn_stats=True,  # keep ImageNet BatchNorm statistics while the backbone is frozen
            # A head on frozen features converges in a few hundred updates at most, and the fine-tune
            # trains it further: on a small folder each more epoch here is mostly a val pass.
            epochs=2,
            # 32, not 64: a folder of 150 photos then still makes ~5 updates an epoch (a 100,000-photo
            # folder makes 3,000 either way)
            batch_size_per_device=32,
            optimizer="adamw",
            lr_per_256=8e-3,  # 1e-3 at batch 32: a new head on frozen features takes a high LR
            weight_decay=0.01,
            warmup_epochs=0.5,
            label_smoothing=0.1,
            res_px=224,
            crop_scale=(0.35, 1.0),  # milder crops than ImageNet's 0.08: objects fill these photos
            rotate_deg=15,  # hand-held photos are rarely level
            keep_best_k=1,
        ),
        Phase(
            name="finetune",
            init="phase:head",  # best of the head phase (EMA if better); the MLP head is kept
            freeze="stages:2",  # stem + first 2 stages frozen: the top stages and the head train ...
            unfreeze_at=(2,),  # ... and from epoch 2 one more stage
            backbone_lr_mult=0.5,  # the backbone at half the head's LR: 0.1 leaves a small folder's few updates nothing to learn with
            # BatchNorm keeps the ImageNet statistics the head was trained on (Keras's fine-tuning advice):
            # letting them follow the folder threw away most of the head phase (digits at 64 px: 73 % val
            # top-1 after 3 head epochs, 41 % after the first fine-tuning epoch; 85.8 % at the end against 98.1 %)
            freeze_bn_stats=True,
            epochs=8,
            batch_size_per_device=32,
            optimizer="adamw",
            lr_per_256=4e-3,  # 5e-4 at batch 32 for the head, 2.5e-4 for the backbone
            weight_decay=0.02,
            warmup_epochs=1,
            label_smoothing=0.1,
            ema_decay=0.9998,  # the longest horizon, for folders of 100,000 photos ...
            ema_horizon=0.1,  # ... shorter ones average over the last ~10 % of the phase's updates
            ema_warmup=True,  # and the EMA follows the weights from the first update
            # The EMA differs from the model late in the phase: scored (a val pass each, which on a small
            # folder costs more than its epoch's training) from three quarters on, as early stopping.
            ema_eval_after=0.75,
            res_px=224,
            crop_scale=(0.35, 1.0),
            color_jitter=0.2,
            rotate_deg=15,
            blur_prob=0.1,  # out-of-focus phone photos (sigma 0.1-2.0 px)
            # Leaves, skin and cells have no "up": add --set phases.1.vflip_prob=0.5 (and phases.0); not
            # the default, since cats and dogs do. Plants: hue=0.02 (skin: leave 0, colour is diagnostic).
            early_stop_patience=3,  # stop when best val top-1 (model or EMA) stalls 3 epochs ...
            early_stop_after=0.75,  # ... once the cosine is three quarters down
            early_stop_metric="best_top1",
            keep_best_k=1,
        ),
    ),
    logging=Logging(project="folder-transfer"),
)

if __name__ == "__main__":
    run(RECIPE)
