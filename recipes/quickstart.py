"""Quickstart: a small timm ResNet on scikit-learn's handwritten digits (1,797 images, 10 classes).

The data ships with scikit-learn and is written once as JPEGs, so this runs anywhere, CPU included:
    accelerate-launch --config_file accelerate_config.yaml recipes/quickstart.py   (`make demo`; or `accelerate launch ...`)
Measured on a 2-core CPU (no GPU): see the README, "The two commands".
"""

from trainer import Data, Logging, Model, Phase, Recipe, run

RECIPE = Recipe(
    name="quickstart",
    model=Model(arch="resnet18"),
    data=Data(
        path="builtin:digits",
        val_fraction=0.2,  # seeded stratified 80/20 split
        mean=(0.5, 0.5, 0.5),  # not ImageNet photos: centre the ink/paper range instead
        std=(0.5, 0.5, 0.5),
    ),
    seed=0,
    phases=(
        Phase(
            name="main",
            epochs=15,
            batch_size_per_device=64,
            optimizer="adamw",
            lr_per_256=4e-3,
            weight_decay=0.05,
            warmup_epochs=1,
            label_smoothing=0.1,
            ema_decay=0.99,  # ~100-step horizon: a short run needs a short EMA
            ema_warmup=True,  # ...that does not start out averaging the random init
            res_px=32,
            eval_res_px=32,
            eval_crop_fraction=1.0,  # the digits fill the frame: no centre crop
            crop_scale=(0.6, 1.0),  # mild crops; small crops cut digits in half
            hflip_prob=0.0,  # a mirrored 2 is not a 2
            checkpoint_every_steps=0,
        ),
    ),
    logging=Logging(project="imgcls-quickstart", log_every_steps=10),
)

if __name__ == "__main__":
    run(RECIPE)
