"""The thin Ray shell around the pure core. Only modules in this package (and ``jobs/``) import ``ray``.

The field job, one room per concern, in the order a run meets them:

- :mod:`~galgan_ray.ray_shell.job`: the job's config (:class:`FieldJobConfig`), connecting to Ray,
  building the Ray Data pipeline from the stages, and :func:`run_field` from inputs to summary;
- :mod:`~galgan_ray.ray_shell.reading`: the datasource, one read task per tile;
- :mod:`~galgan_ray.ray_shell.rows`: the rows that carry a tile between stages;
- :mod:`~galgan_ray.ray_shell.stages`: the thin ``<Verb>Stage`` actors over :mod:`galgan_ray.field`;
- :mod:`~galgan_ray.ray_shell.commit`: a tile's tables, then its ``_COMMITTED`` marker;
- :mod:`~galgan_ray.ray_shell.summary`: the run summary.

Training data-parallel with Ray Train is :mod:`~galgan_ray.ray_shell.train`. A run's outputs are read
without the shell (:mod:`galgan_ray.outputs`). Submodules are imported explicitly
(``from galgan_ray.ray_shell.job import run_field``) so that importing one does not pay for the others.
"""
