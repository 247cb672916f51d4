"""What a run leaves on disk and reads back.

- ``checkpoint.py``: writing, verifying, finding and loading checkpoints;
- ``writer.py``: writing them in the background, one at a time;
- ``checkpoint_files.py``: the hardened readers of a checkpoint's files (sizes,
  names, npz headers; nothing is ever unpickled);
- ``statecodec.py``: live objects (the scheduler, its archives and emitters) to
  JSON plus arrays and back, restricted to an allowlist of classes;
- ``statefit.py``: whether a stored state fits the fresh object it restores onto;
- ``rundir.py``: the run directory: atomic writes, fsync, the metrics file, its lock.
"""
