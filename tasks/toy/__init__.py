"""Toy worlds with ground truth (seeds 002-004): 2-D data sources, reference GAN trainers,
ground-truth scores, and a random-Fourier-feature descriptor that lets the audit see 2-D points.

Modules: `worlds` (data sources and their truth), `score` (modes covered, quality, reverse KL),
`rff` (descriptor `rff`), `generators` (generators `toy:WORLD`), `trainers` (GAN, BiGAN,
InvertGAN, LOGAN lol1/lol2 and the pair-wise gradient penalty). Only `trainers` imports torch.
"""
