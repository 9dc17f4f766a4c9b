"""Frozen image features, encoded once: the augmented views of --cache-features, and the `encode` of
a method's fit.

A method whose image tower is frozen has `frozen_features(images)` and `forward(features=...)`. With
--cache-features V the loop encodes V augmented views of the training images before the first epoch
(view v drawn as epoch v's augmentation) and epoch e trains on view e mod V, so the image tower runs
V times, not once per epoch.
"""
import math

import torch

import data
import runs

# bytes of cached features kept on the device; more go to a memory-mapped file
CACHE_IN_MEMORY = 4 * 2**30

@torch.no_grad()
def encode_views(runner, items, seeds, folder, transform=None):
    """(V, n, ...) features of the images augmented with each of V epoch seeds (or in `transform`),
    through the frozen tower of runner.model (a train.Runner): on the device, or memory-mapped in
    `folder`."""
    transform = transform or data.train_transform(runner.preprocessing)
    loader = data.loader(items, transform, 100, train=False, workers=runner.workers,
                         device=runner.args.device)
    model = runner.model.eval()
    store = None  # (V, n, ...) once the first batch shows the features' shape
    with runs.progress(len(seeds) * len(items), f"encoding {len(seeds)} x {len(items)} images",
                       runner.rank) as bar:
        for v, seed in enumerate(seeds):
            loader.dataset.seed = seed
            for i, (images, _) in enumerate(loader):
                with runner.autocast():
                    x = model.frozen_features(images.to(runner.device, non_blocking=True))
                if store is None:
                    shape = (len(seeds), len(items), *x.shape[1:])
                    if math.prod(shape) * x.element_size() <= CACHE_IN_MEMORY:
                        store = torch.empty(shape, dtype=x.dtype, device=runner.device)
                    else:
                        path = folder / f"features.rank{runner.rank}.tmp"
                        store = torch.from_file(str(path), True, math.prod(shape),
                                                dtype=x.dtype).view(shape)
                        # the mapping lives until the run ends, and no file outlives it
                        path.unlink()
                # the loader keeps the items' order (train=False)
                first = i * loader.batch_size
                store[v, first:first + len(x)] = x.to(store.device)
                bar.update(len(x))
    return store

def batches(loader, cache, epoch, device):
    """This process's (inputs, labels): images, or view epoch % V of the cached features in the
    loader's order."""
    if cache is None:
        for images, labels in loader:
            yield (dict(images=images.to(device, non_blocking=True)),
                   labels.to(device, non_blocking=True))
        return
    labels = torch.tensor([y for _, y in loader.dataset.items])
    # (n, ...): every training image's features, augmented by this view's seed
    view = cache[epoch % len(cache)]
    for idx in torch.utils.data.BatchSampler(loader.sampler, loader.batch_size, loader.drop_last):
        yield dict(features=view[idx].to(device, non_blocking=True)), labels[idx].to(device)
