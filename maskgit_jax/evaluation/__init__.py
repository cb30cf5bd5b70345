"""Sample-quality metrics: FID, Inception Score, precision/recall, rejection sampling.

`inception` holds the FID Inception-v3 network and its loader, `metrics` the numpy/scipy
arithmetic (FID incl. its fast exact low-rank form, IS, P/R, the one `report`, statistics
files ours and ADM's), `samples` which labels and rows each process samples and their
Inception outputs, `reference_sets` the features of reference images (an eval split, an ADM
batch), `rejection` classifier-based rejection sampling, `in_training` the metrics during
training and `reconstruction_metrics` the tokenizer's. `maskgit_jax.evaluate` is the command
line that ties them to a pretrained model.
"""
