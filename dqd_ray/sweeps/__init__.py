"""Hyperparameter sweeps with Ray Tune: the sweep file (:mod:`.file`), the
trial (:mod:`.trial`: bundles, the trainable, its report sink) and the
launcher (:mod:`.launcher`: run, resume, dry run, results)."""
