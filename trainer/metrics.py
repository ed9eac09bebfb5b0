"""Classification metrics over gathered predictions: top-k accuracy, counted once per real sample."""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, autocast) -> dict[str, float]:
    """Top-1/top-5 and loss of `model` on `loader`, across all processes.

    Each rank scores its shard; `gather_for_metrics` collects (top-5, label, loss) from all ranks and
    the padding that keeps batch counts equal (label -1) is dropped, so each sample counts once.
    """
    was_training = model.training
    model.eval()
    top_k, labels_all, losses = [], [], []
    for images, labels in loader:
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        loss = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        gathered = accelerator.gather_for_metrics((logits.topk(k, dim=1).indices, labels, loss))
        top_k.append(gathered[0])
        labels_all.append(gathered[1])
        losses.append(gathered[2])
    model.train(was_training)
    top_k, labels_all, losses = torch.cat(top_k), torch.cat(labels_all), torch.cat(losses)
    real = labels_all >= 0
    top_k, labels_all, losses = top_k[real], labels_all[real], losses[real]
    hits = top_k == labels_all[:, None]
    n = max(int(real.sum()), 1)
    return {
        "top1": float(hits[:, 0].sum()) / n,
        "top5": float(hits.any(dim=1).sum()) / n,
        "loss": float(losses.sum()) / n,
        "samples": int(real.sum()),
    }
