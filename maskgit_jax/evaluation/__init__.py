"""Sample-quality metrics: FID, Inception Score, precision/recall, rejection sampling.

`inception` holds the FID Inception-v3 network and its loader, `metrics` the numpy/scipy
arithmetic, `rejection` classifier-based rejection sampling; `maskgit_jax.evaluate` is the
command line that ties them to a pretrained model.
"""
