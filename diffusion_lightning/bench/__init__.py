"""The benchmark package: ``make bench`` = ``python -m diffusion_lightning.bench`` (:mod:`.suite`) measures every
recipe through its own training step, sampling pipeline and bound (:mod:`.recipes` builds them from ``conf/``,
:mod:`.training` times them, :mod:`.diffusers` runs diffusers' recipe on the same U-Net layout) and writes
``bench/results.{json,md}``."""
