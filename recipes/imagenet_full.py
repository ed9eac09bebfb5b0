"""ImageNet-1k, ResNet-50, three phases: 20% subset at low resolution, stronger augmentation, full data.

    accelerate launch --multi_gpu --num_processes 8 recipes/imagenet_full.py --data /mnt/imagenet

`--data` is the usual ImageNet folder: train/n01440764/*.JPEG ... and val/n01440764/*.JPEG.
ImageNet arrives with train/ in class folders (ILSVRC2012_img_train.tar holds one tar per wnid) but
val/ flat, 50,000 ILSVRC2012_val_000xxxxx.JPEG files with the labels in a separate file. Lay it out as

    /mnt/imagenet/train/n01440764/n01440764_10026.JPEG ...   (1,000 class folders, 1,281,167 images)
    /mnt/imagenet/val/ILSVRC2012_val_00000001.JPEG ...       (flat, as distributed)

then link val/ into class folders with one command, from either label file:

    python -m trainer prepare-imagenet /mnt/imagenet/val --labels LOC_val_solution.csv   # the Kaggle copy
    python -m trainer prepare-imagenet /mnt/imagenet/val \
        --labels ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt       # the devkit (reads data/meta.mat)

It makes val/<wnid>/ILSVRC2012_val_*.JPEG as hard links (symlinks across filesystems; nothing is
copied, the flat files stay and training reads only the class folders), refuses a folder that does not
match the label file, and changes nothing when run again. On a read-only mount, pass
--out /writable/imagenet/val and symlink /mnt/imagenet/train beside it. The bundle, `eval`, the report
and the Space then name the classes ("tench" for n01440764) from timm's ImageNet metadata.

Hyperparameters come from three published recipes, named beside each value: FFCV's ResNet-50
configs (short SGD schedules with progressive 160→192 px training), timm's ResNet-strikes-back A3
(LAMB, BCE, Mixup/CutMix, RandAugment m6, 160 px train / 224 px test, 78.1% in 100 epochs) and
NVIDIA's ResNet-50 v1.5 (SGD, label smoothing 0.1, cosine, ~77% in 90 epochs).

TARGETS, NOT RESULTS (not yet measured with this code; 8×A100-class GPUs, bf16, channels_last):
| phase          | data | epochs | val top-1 target | GPU-hours target |
| lowres_subset  | 20%  | 16     | 60-65%           | ~0.5             |
| stronger_aug   | 20%  | 16     | 66-70%           | ~1               |
| full           | 100% | 40     | 78-79%           | ~8               |
"""

from trainer import Data, Logging, Model, Phase, Recipe, run

GLOBAL_BATCH = 1024  # 8 GPUs × 128; LRs below are per 256 images and scale with the real batch

RECIPE = Recipe(
    name="imagenet_full",
    model=Model(
        arch="resnet50",  # timm's ResNet-50 (v1.5: stride in the 3x3 conv, as NVIDIA's)
        channels_last=True,  # NHWC: the fast path for convolutions on tensor-core GPUs
        drop_path_rate=0.05,  # RSB A3 uses 0.05 stochastic depth for ResNet-50
    ),
    data=Data(
        decode_device="auto",  # nvJPEG on the GPU ("mixed") when there is one
        loader_threads=6,  # DALI CPU threads per GPU for the parts nvJPEG leaves on the host
    ),
    seed=0,
    phases=(
        Phase(
            name="lowres_subset",
            subset=0.2,  # 20% of every class (stratified): fast, cheap exploration of the schedule
            epochs=16,  # FFCV's shortest ResNet-50 config is 16 epochs
            batch_size_per_device=128,
            optimizer="sgd",  # FFCV and NVIDIA: SGD with momentum (timm's "sgd" is Nesterov)
            lr_per_256=0.5,  # FFCV rn50 configs: 0.5 per 256 with a short warmup
            momentum=0.9,
            weight_decay=5e-5,  # FFCV rn50 configs
            warmup_epochs=2,  # FFCV peaks the LR at epoch 2
            schedule="cosine",
            label_smoothing=0.1,  # FFCV and NVIDIA both use 0.1
            res_px=128,  # progressive resizing, FFCV-style, started lower for the subset
            res_px_end=160,
            res_ramp_epochs=(2, 13),  # FFCV ramps from early epochs to ~3 before the end
            eval_res_px=224,  # FFCV/RSB: train low, test at 224 (train-test resolution discrepancy)
            eval_crop_fraction=0.875,
            checkpoint_every_steps=1000,
            keep_best_k=1,
        ),
        Phase(
            name="stronger_aug",
            init="phase:lowres_subset",  # best weights of phase 1 (EMA if it scored better)
            subset=0.2,  # same 20% (the same seeded list): the augmentation is what changes
            epochs=16,
            batch_size_per_device=128,
            optimizer="lamb",  # RSB A3: LAMB
            lr_per_256=1e-3,  # RSB A3: 8e-3 at batch 2048 = 1e-3 per 256
            weight_decay=0.02,  # RSB A3
            warmup_epochs=1,
            schedule="cosine",
            bce_loss=True,  # RSB A3: binary cross-entropy, target threshold 0.2
            mixup_alpha=0.1,  # RSB A3: Mixup 0.1 ...
            cutmix_alpha=1.0,  # ... and CutMix 1.0, switching with probability 0.5
            rand_augment_layers=2,  # RSB A3: RandAugment, 2 ops ...
            rand_augment_magnitude=18,  # ... at magnitude 6 of timm's 10 = 18 on our 0-30 scale
            res_px=160,  # RSB A3 trains at 160 px; ramp to 192 (FFCV's end resolution)
            res_px_end=192,
            res_ramp_epochs=(2, 13),
            eval_res_px=224,
            eval_crop_fraction=0.95,  # RSB A3 tests at 224 with crop 0.95
            checkpoint_every_steps=1000,
            keep_best_k=1,
        ),
        Phase(
            name="full",
            init="phase:stronger_aug",
            subset=1.0,  # the whole training set
            epochs=40,  # FFCV: 40 epochs ≈ 75.6% from scratch; here it starts from phase 2
            batch_size_per_device=128,
            optimizer="sgd",
            lr_per_256=0.256,  # NVIDIA ResNet-50 v1.5: 0.256 per 256 ...
            momentum=0.875,  # ... momentum 0.875 ...
            weight_decay=3.0517578125e-05,  # ... weight decay 1/32768 ...
            warmup_epochs=2,  # (NVIDIA warms up 8 epochs from scratch; these weights are trained)
            schedule="cosine",  # ... cosine ...
            label_smoothing=0.1,  # ... label smoothing 0.1
            ema_decay=0.9998,  # timm's ImageNet EMA default
            rand_augment_layers=2,  # keep RSB A3's RandAugment on the full data
            rand_augment_magnitude=18,  # RSB A3 m6 (of 10), on our 0-30 scale
            res_px=192,  # FFCV's end resolution, ramping to the standard 224
            res_px_end=224,
            res_ramp_epochs=(0, 30),
            eval_res_px=224,
            eval_crop_fraction=0.875,  # NVIDIA: resize 256, centre crop 224
            checkpoint_every_steps=2000,
            keep_best_k=2,
        ),
    ),
    logging=Logging(project="imagenet-full", log_every_steps=50),
)

if __name__ == "__main__":
    run(RECIPE)
