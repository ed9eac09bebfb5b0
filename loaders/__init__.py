"""Data loading, in layers that import only downward (nothing here imports `trainer`):

- `headers`: the structural check of one encoded image (its size, or why the decoder would fail);
- `sources`, `hf`, `digits`: where samples come from (ImageFolder, Hugging Face datasets, the
  embedded digits) as (encoded bytes, label) pairs; `screening`: the check of a source before
  training; `order`: sample order and augmentation draws as pure functions of (seed, epoch, rank);
- `recovery`: what the loaders do when a file fails only in the decoder;
- `dali`: the DALI train and eval pipelines and their loaders; `scan`: `check-data`'s full scan.
"""

# ImageNet's per-channel mean and std of RGB in [0, 1]: the default normalisation of recipes and loaders.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# TrainAugment.auto_augment and Phase.auto_augment: off, AutoAugment's ImageNet policy, TrivialAugment-Wide.
AUTO_AUGMENT_POLICIES = ("", "imagenet", "trivial")
