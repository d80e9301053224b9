"""The thin Ray shell around the pure core: Ray Data readers/writers, ``<Verb>Stage`` actors and the
``TorchTrainer`` builder (:mod:`galgan_ray.ray_shell.train`).

Only modules in this package (and ``jobs/``) import ``ray``. Submodules are imported explicitly
(``from galgan_ray.ray_shell.train import build_trainer``) so that importing one stage does not pay for
the others.
"""
