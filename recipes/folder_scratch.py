"""The baseline for recipes/folder_transfer.py: a ResNet-18 trained from scratch on the same folder.

    accelerate launch recipes/folder_scratch.py --data ~/leaf_disease
"""

from trainer import Data, Logging, Model, Phase, Recipe, run

RECIPE = Recipe(
    name="folder_scratch",
    model=Model(arch="resnet18", drop_rate=0.2),
    data=Data(path="", val_fraction=0.2),
    seed=0,
    phases=(
        Phase(
            name="main",
            epochs=60,  # from scratch needs far longer than fine-tuning
            batch_size_per_device=64,
            optimizer="adamw",
            lr_per_256=2e-3,
            weight_decay=0.05,
            warmup_epochs=3,
            schedule="cosine",
            label_smoothing=0.1,
            mixup_alpha=0.2,  # small folders overfit: mix images
            cutmix_alpha=1.0,
            res_px=160,  # smaller than 224: from scratch, speed matters more than detail
            res_px_end=224,
            res_ramp_epochs=(10, 45),
            eval_res_px=224,
            crop_scale=(0.25, 1.0),
            random_erasing=0.25,
            ema_decay=0.999,
            early_stop_patience=10,
            keep_best_k=1,
        ),
    ),
    logging=Logging(project="folder-scratch"),
)

if __name__ == "__main__":
    run(RECIPE)
